"""COCO instances JSON -> training records -> decoded, augmented examples.

Indexing (:func:`load_coco`) runs on the driver and only reads the JSON. Fetching,
decoding and augmentation (:func:`load_example`) run in Ray Data CPU tasks for training,
and in the workers for evaluation. Bad annotations are dropped and counted when indexing;
bad images become rows with ``error`` set, which the training loop counts and skips.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskrcnn import images, masks, storage


class DatasetError(RuntimeError):
    """A dataset that cannot be used at all (missing file, no images). Names the path."""


@dataclass
class CocoDataset:
    gt: dict[str, Any]  # the COCO JSON, with `categories` filled in when it had none
    classes: list[str]  # label i+1 -> classes[i]; label 0 is background
    category_ids: list[int]  # label i+1 -> category_ids[i]
    records: list[dict[str, Any]]
    dropped: Counter = field(default_factory=Counter)  # annotation problems found while indexing

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1


def _categories(gt: dict) -> list[dict]:
    if gt.get("categories"):
        return sorted(gt["categories"], key=lambda c: c["id"])
    ids = sorted({a["category_id"] for a in gt.get("annotations", [])})
    return [{"id": i, "name": f"category_{i}"} for i in ids]


def _training_annotation(ann: dict, img: dict, label_of: dict[int, int], dropped: Counter) -> dict | None:
    """Keep an annotation for the loss, or count why not (crowd regions are ignored, as in
    torchvision's references; they still count in evaluation)."""
    if ann.get("iscrowd", 0):
        dropped["crowd"] += 1
        return None
    if ann["category_id"] not in label_of:
        dropped["unknown_category"] += 1
        return None
    x, y, w, h = ann["bbox"]
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(img["width"]), x + w), min(float(img["height"]), y + h)
    if x1 - x0 < 1 or y1 - y0 < 1:
        dropped["degenerate_box"] += 1
        return None
    try:
        masks.check_segmentation(ann.get("segmentation"), img["height"], img["width"])
    except masks.InvalidSegmentation:
        dropped["invalid_segmentation"] += 1
        return None
    return {"box": [x0, y0, x1, y1], "label": label_of[ann["category_id"]], "segmentation": ann["segmentation"]}


def load_coco(annotations: str, image_root: str) -> CocoDataset:
    """Index a COCO instances file (local or s3://) whose ``file_name``s are under ``image_root``."""
    if not storage.exists(annotations):
        raise DatasetError(f"annotation file not found: {annotations}")
    try:
        gt = json.loads(storage.read_text(annotations))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{annotations} is not valid JSON: {err}") from err
    if not gt.get("images"):
        raise DatasetError(f"{annotations} lists no images")
    gt["categories"] = _categories(gt)
    label_of = {c["id"]: i + 1 for i, c in enumerate(gt["categories"])}
    by_image: dict[int, list] = {img["id"]: [] for img in gt["images"]}
    dropped: Counter = Counter()
    images_by_id = {img["id"]: img for img in gt["images"]}
    for ann in gt.get("annotations", []):
        img = images_by_id.get(ann["image_id"])
        kept = _training_annotation(ann, img, label_of, dropped) if img else None
        if img is None:
            dropped["unknown_image"] += 1
        if kept:
            by_image[ann["image_id"]].append(kept)
    records = [
        {
            "image_id": img["id"],
            "uri": storage.join(image_root, img["file_name"]),
            "width": img["width"],
            "height": img["height"],
            "annotations": json.dumps(by_image[img["id"]]),
        }
        for img in gt["images"]
    ]
    return CocoDataset(
        gt=gt,
        classes=[c["name"] for c in gt["categories"]],
        category_ids=[c["id"] for c in gt["categories"]],
        records=records,
        dropped=dropped,
    )


def train_transform(scales: tuple[int, ...], max_size: int) -> v2.Transform:
    """Horizontal flip and multi-scale resize; boxes and masks move with the image."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(0.5),
            v2.RandomShortestSize(min_size=list(scales), max_size=max_size),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
        ]
    )


def _error_row(record: dict, kind: str) -> dict[str, Any]:
    return {
        "image_id": record["image_id"],
        "image": np.zeros((3, 1, 1), np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int64),
        "masks": np.zeros((0, 1, 1), np.uint8),
        "error": kind,
    }


def load_example(record: dict[str, Any], transform: v2.Transform | None = None) -> dict[str, Any]:
    """Fetch, decode and (optionally) augment one record. Never raises for bad input:
    returns a row whose ``error`` names what went wrong (``""`` when fine)."""
    try:
        rgb = images.decode(storage.read_bytes(record["uri"]), exif=False)
    except storage.StorageError:
        return _error_row(record, "missing_image")
    except images.ImageError:
        return _error_row(record, "undecodable_image")
    h, w = record["height"], record["width"]
    if rgb.shape[:2] != (h, w):
        return _error_row(record, "size_mismatch")
    anns = json.loads(record["annotations"])
    image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(h, w)
        ),
        "masks": tv_tensors.Mask(
            torch.from_numpy(np.stack([masks.decode(a["segmentation"], h, w) for a in anns]))
            if anns
            else torch.zeros((0, h, w), dtype=torch.uint8)
        ),
        "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
    }
    if transform is not None:
        image, target = transform(image, target)
    return {
        "image_id": record["image_id"],
        "image": image.numpy(),
        "boxes": target["boxes"].numpy().astype(np.float32),
        "labels": target["labels"].numpy(),
        "masks": target["masks"].numpy().astype(np.uint8),
        "error": "",
    }


def to_model_inputs(rows: list[dict[str, Any]], device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Rows from :func:`load_example` (errors already removed) -> torchvision's inputs."""
    imgs = [torch.as_tensor(r["image"]).to(device, non_blocking=True).float().div_(255) for r in rows]
    targets = [
        {
            "boxes": torch.as_tensor(r["boxes"], dtype=torch.float32).to(device),
            "labels": torch.as_tensor(r["labels"], dtype=torch.int64).to(device),
            "masks": torch.as_tensor(r["masks"], dtype=torch.uint8).to(device),
        }
        for r in rows
    ]
    return imgs, targets


def rows_of(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data numpy batch (dict of columns) -> a list of row dicts."""
    n = len(batch["image_id"])
    return [{k: batch[k][i] for k in batch} for i in range(n)]
