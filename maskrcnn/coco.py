"""COCO instances files, read for training and evaluation: checked, cleaned and indexed.

This module imports no torch: the converter (:mod:`maskrcnn.convert`) applies the same
cleaning rules with the memory of a plain Python process.

- :func:`load_coco` reads a file (local or ``s3://``) and :func:`index_coco` indexes it:
  one record per image, its annotations cleaned. Training and evaluation share one set of
  rules (:func:`clean_annotation`); what it drops is counted by reason.
- :func:`image_uri` says where a ``file_name`` is, and refuses one that leaves the image
  root (``outside_root``): such an image is never read.
- What comes back from the labelling tools is read here too, with their quirks undone
  (:func:`from_labelling_tools`, :func:`match_categories`).

Decoding a record into a training example is :mod:`maskrcnn.data`'s.
"""

from __future__ import annotations

import json
import math
import os
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

from maskrcnn import keypoints, masks, output, storage
from maskrcnn.errors import UserError


class DatasetError(UserError):
    """A dataset that cannot be used (missing file, no images, a defect that cannot be
    cleaned). Names the file and, where there is one, the image or annotation id."""


@dataclass
class CocoIndex:
    gt: dict[str, Any]  # the COCO JSON cleaned by the training rules: what evaluation scores against
    classes: list[str]  # label i+1 -> classes[i]; label 0 is background
    category_ids: list[int]  # label i+1 -> category_ids[i]
    records: list[dict[str, Any]]
    dropped: Counter = field(default_factory=Counter)  # annotations not trained on, by reason
    keypoints: keypoints.KeypointSpec | None = None  # the categories' keypoint names and skeleton


def load_coco(annotations: str, image_root: str, like: list[dict] | None = None) -> CocoIndex:
    """Index a COCO instances file (local or s3://) whose ``file_name``s are under ``image_root``
    (see :func:`index_coco`); with ``like``, its categories are matched to those by name
    (:func:`match_categories`)."""
    gt = from_labelling_tools(_read(annotations))
    if like is not None:
        match_categories(gt, like, annotations, categories(gt, annotations))
    return index_coco(gt, annotations, image_root)


def index_coco(gt: dict[str, Any], annotations: str, image_root: str | None) -> CocoIndex:
    """Index a COCO instances dict read from ``annotations``; ``file_name`` is a path under
    ``image_root``, or (``image_root`` None) the image's URI.

    One set of rules serves training and evaluation, as in detectron2: an annotation that
    training drops (unknown image or category, bad box, no valid polygon) is dropped from
    the evaluation ground truth too, and counted in ``dropped``. Crowd regions are kept
    for evaluation, as COCO defines them, but not trained on (torchvision's references).
    Structural defects that no rule can clean raise :class:`DatasetError`.
    """
    images_by_id = _checked_images(gt, annotations)
    cats = categories(gt, annotations)
    spec = keypoints.spec_of(cats, annotations)
    label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
    kept, dropped = [], Counter()
    by_image: dict[int, list] = {image_id: [] for image_id in images_by_id}
    for ann in _checked_annotations(gt, annotations):
        reason, clean = clean_annotation(ann, images_by_id.get(ann["image_id"]), label_of, spec)
        if reason:
            dropped[reason] += 1
            continue
        kept.append(clean)
        if clean["iscrowd"]:
            dropped["crowd"] += 1
        else:
            by_image[clean["image_id"]].append(
                training_annotation(clean, images_by_id[clean["image_id"]], label_of, spec)
            )
    records = [
        {
            "image_id": img["id"],
            **_where(img["file_name"], image_root),
            "width": img["width"],
            "height": img["height"],
            # COCO's sizes and coordinates are the stored pixels; Parquet labels' images say theirs
            "orientation": img.get("orientation", output.STORED),
            "annotations": json.dumps(by_image[img["id"]]),
            **({"num_keypoints": len(spec)} if spec else {}),
        }
        for img in gt["images"]
    ]
    return CocoIndex(
        gt=dict(gt, categories=cats, annotations=kept),
        classes=[c["name"] for c in cats],
        category_ids=[c["id"] for c in cats],
        records=records,
        dropped=dropped,
        keypoints=spec,
    )


def _where(file_name: str, image_root: str | None) -> dict[str, str]:
    """A record's ``uri``; and ``error`` where ``file_name`` leaves the image root, an image never read."""
    if image_root is None:
        return {"uri": file_name}
    uri = image_uri(image_root, file_name)
    return {"uri": uri} if uri else {"uri": file_name, "error": OUTSIDE_ROOT}


def _read(annotations: str) -> dict[str, Any]:
    if not storage.exists(annotations):
        raise DatasetError(f"annotation file not found: {annotations}")
    try:
        gt = json.loads(storage.read_text(annotations))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{annotations} is not valid JSON: {err}") from err
    if not isinstance(gt, dict) or not gt.get("images"):
        raise DatasetError(f"{annotations} lists no images")
    return gt


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_images(gt: dict, path: str) -> dict[int, dict]:
    images: dict[int, dict] = {}
    for i, img in enumerate(gt["images"]):
        check_image(img, i, path)
        if img["id"] in images:
            raise DatasetError(f"{path}: image id {img['id']}: the id is used twice")
        images[img["id"]] = img
    return images


def check_image(img: Any, i: int, path: str) -> None:
    """Raise :class:`DatasetError` unless ``img``, the ``i``-th of ``path``'s images, has
    what training needs: an integer id, a file name, a positive width and height."""
    where = f"{path}: image id {img.get('id')}" if isinstance(img, dict) else f"{path}: image #{i}"
    if not isinstance(img, dict) or not _is_int(img.get("id")):
        raise DatasetError(f"{where}: needs an integer 'id'")
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        raise DatasetError(f"{where}: needs a 'file_name'")
    if not all(_is_int(img.get(k)) and img[k] > 0 for k in ("width", "height")):
        raise DatasetError(f"{where}: 'width' and 'height' must be positive integers")


def categories(gt: dict, path: str) -> list[dict]:
    """A COCO file's categories, checked and sorted by id; named by id where it has none."""
    if not gt.get("categories"):  # e.g. torchvision's gallery files: name them by id
        ids = sorted(
            {
                a["category_id"]
                for a in gt.get("annotations") or []
                if isinstance(a, dict) and _is_int(a.get("category_id"))
            }
        )
        return [{"id": i, "name": f"category_{i}"} for i in ids]
    seen = set()
    for c in gt["categories"]:
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{path}: category {c!r:.60}: needs an integer 'id' and a 'name'")
        if c["id"] in seen:
            raise DatasetError(f"{path}: category id {c['id']}: the id is used twice")
        seen.add(c["id"])
    return sorted(gt["categories"], key=lambda c: c["id"])


def _checked_annotations(gt: dict, path: str) -> Iterator[dict]:
    """Each annotation, after the checks no cleaning can fix (:func:`check_annotation`)."""
    seen: set[int] = set()
    for i, ann in enumerate(gt.get("annotations") or []):
        check_annotation(ann, i, path, seen)
        yield ann


def check_annotation(ann: Any, i: int, path: str, seen: set[int]) -> None:
    """Raise :class:`DatasetError` unless ``ann`` has the keys every COCO reader needs, and an
    id not in ``seen`` (pycocotools indexes by id, so a repeat would silently replace); adds it."""
    if not isinstance(ann, dict) or not _is_int(ann.get("id")):
        raise DatasetError(f"{path}: annotation #{i}: needs an integer 'id'")
    where = f"{path}: annotation id {ann['id']}"
    for key in ("image_id", "category_id"):
        if not _is_int(ann.get(key)):
            raise DatasetError(f"{where}: {key!r} must be an integer, got {ann.get(key)!r:.40}")
    if ann["id"] in seen:
        raise DatasetError(f"{where}: the id is used twice")
    seen.add(ann["id"])


def clean_annotation(
    ann: dict, img: dict | None, label_of: dict[int, int], spec: keypoints.KeypointSpec | None = None
) -> tuple[str | None, dict]:
    """``(reason, None)`` for an annotation to drop, else ``(None, cleaned copy)``: only the
    valid parts of a polygon, ``iscrowd`` as 0/1, ``area`` computed when missing, and
    ``keypoints`` checked when the dataset has them (missing ones are all unlabelled)."""
    if img is None:
        return "unknown_image", {}
    if ann["category_id"] not in label_of:
        return "unknown_category", {}
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(_finite(v) for v in box)):
        return "invalid_box", {}
    if _clipped(box, img) is None:
        return "degenerate_box", {}
    segm = ann.get("segmentation")
    if isinstance(segm, list):  # keep the valid parts, as detectron2 does (each part checked once)
        segm = [part for part in segm if masks.valid_polygon(part)]
        if not segm:
            return "invalid_segmentation", {}
    else:
        try:
            masks.check_segmentation(segm, img["height"], img["width"])
        except masks.InvalidSegmentation:
            return "invalid_segmentation", {}
    if spec and "keypoints" in ann and not keypoints.valid(ann["keypoints"], len(spec)):
        return "invalid_keypoints", {}
    area = ann.get("area")
    if not _finite(area) or area < 0:
        area = masks.area(masks.to_rle(segm, img["height"], img["width"]))
    return None, dict(ann, segmentation=segm, area=area, iscrowd=int(bool(ann.get("iscrowd", 0))))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _clipped(box: list[float], img: dict) -> list[float] | None:
    """COCO ``[x, y, w, h]`` -> ``[x0, y0, x1, y1]`` inside the image, or None if under a pixel."""
    x, y, w, h = box
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(img["width"]), x + w), min(float(img["height"]), y + h)
    return [x0, y0, x1, y1] if x1 - x0 >= 1 and y1 - y0 >= 1 else None


def training_annotation(ann: dict, img: dict, label_of: dict[int, int], spec: keypoints.KeypointSpec | None) -> dict:
    out = {
        "box": _clipped(ann["bbox"], img),
        "label": label_of[ann["category_id"]],
        "segmentation": ann["segmentation"],
    }
    if spec:
        out["keypoints"] = ann.get("keypoints") or [0] * (3 * len(spec))
    return out


OUTSIDE_ROOT = "outside_root"  # a file_name with ".." past the image root, or absolute


# ---------------------------------------------------------------- what comes back from the labelling tools

LOCAL_FILES = "/data/local-files/?d="  # how Label Studio's local storage names a file under its document root


def image_uri(root: str, file_name: str) -> str | None:
    """Where a COCO file's image is: ``file_name`` under ``root``; None where the name leaves
    ``root`` (``..`` past it, or an absolute path), an image that is then never read. Files
    written by labelling tools are read as they come: an ``s3://`` URI (Label Studio's S3
    storage) is the image itself, and Label Studio's local-storage URL
    ``/data/local-files/?d=PATH`` names PATH (percent-decoded) under ``root``, which is then
    Label Studio's document root."""
    if storage.is_s3(file_name):
        return file_name
    if file_name.startswith(LOCAL_FILES):
        file_name = urllib.parse.unquote(file_name[len(LOCAL_FILES) :])
    if storage.is_s3(root) or root.startswith("file://"):
        return None if file_name.startswith("/") or ".." in file_name.split("/") else storage.join(root, file_name)
    base = os.path.normpath(root)
    inside = os.path.normpath(os.path.join(base, file_name)).startswith(base.rstrip(os.sep) + os.sep)
    return storage.join(root, file_name) if inside else None


def from_labelling_tools(gt: dict[str, Any]) -> dict[str, Any]:
    """A COCO dict with CVAT's one departure from COCO undone: CVAT's COCO 1.0 export (made
    by Datumaro) writes every mask shape as ``iscrowd: 1`` with an uncompressed RLE, though
    a person drew it as one object; such annotations carry CVAT's ``attributes`` (always
    ``occluded``), which a crowd region from COCO itself never has, and are trained on."""
    for ann in gt.get("annotations") or []:
        if (
            isinstance(ann, dict)
            and ann.get("iscrowd")
            and isinstance(ann.get("attributes"), dict)
            and "occluded" in ann["attributes"]
            and isinstance(ann.get("segmentation"), dict)
            and isinstance(ann["segmentation"].get("counts"), list)
        ):
            ann["iscrowd"] = 0
    return gt


def match_categories(gt: dict[str, Any], like: list[dict], path: str, own: list[dict]) -> None:
    """Renumber a COCO dict's categories (and its annotations' ``category_id``) to the ids of
    the categories ``like`` with the same names: a labelling tool numbers classes its own way
    (Label Studio from 0, CVAT from 1 in its label order). A class ``like`` lacks is an error;
    an annotation of an id the file does not list stays unknown (and is dropped)."""
    by_name = {c["name"]: c for c in like}
    missing = [c["name"] for c in own if c["name"] not in by_name]
    if missing:
        raise UserError(f"{path}: categories {missing[:3]} are not among the training set's {sorted(by_name)[:8]}")
    new_id = {c["id"]: by_name[c["name"]]["id"] for c in own}
    for ann in gt.get("annotations") or []:
        if isinstance(ann, dict) and isinstance(ann.get("category_id"), int):
            ann["category_id"] = new_id.get(ann["category_id"], -1)
    gt["categories"] = [dict(c) for c in like]
