"""A COCO instances file -> Parquet labels (:mod:`maskrcnn.labels`), in bounded memory.

The JSON is streamed (ijson's C parser), never loaded: one pass reads the categories, one
the images, one the annotations. The images stay in memory (a file name and a size each,
about 150 bytes); the annotations, the bulk of a COCO file, are cleaned by the training
rules (:func:`maskrcnn.coco.clean_annotation`), encoded as RLE and spilled, grouped by the
part file their image falls in, to local temporary files, which are then read back one
part at a time. So memory grows with the images, not the annotations, and each part file
is written whole and atomically (:func:`maskrcnn.output.write_part`), as the segmentation
job writes its own. The rows keep the COCO file's sizes and coordinates, which COCO defines on
the pixels as stored (no EXIF orientation applied): ``_categories.json`` says orientation
``stored``, and training decodes these images so.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import ijson

from maskrcnn import coco, keypoints, masks, output, storage
from maskrcnn.coco import DatasetError
from maskrcnn.config import option
from maskrcnn.progress import Progress

IO = "input and output (local paths or s3:// URIs)"
SPILL_BYTES = 64 << 20  # annotations held before they go to the temporary files


@dataclass(kw_only=True)
class ConvertConfig:
    """Everything a conversion is told; ``jobs/coco_to_parquet.py``'s flags are these fields."""

    annotations: str = option("COCO instances JSON", group=IO)
    images: str = option("directory or prefix holding its file_names; rows get the images' full URIs", group=IO)
    output: str = option("directory or prefix for the Parquet labels", group=IO)
    rows_per_file: int = option("rows (images) per Parquet part file", 1000, group=IO)
    overwrite: bool = option("delete the part files --output holds and start over", False, group=IO)

    def __post_init__(self) -> None:
        if self.rows_per_file < 1:
            raise ValueError(f"--rows-per-file must be at least 1, got {self.rows_per_file}")
        self.annotations, self.images = storage.absolute(self.annotations), storage.absolute(self.images)
        self.output = storage.absolute(self.output)


def run(cfg: ConvertConfig) -> dict[str, Any]:
    """Convert; return (and write as ``_summary.json``) the summary."""
    start = time.perf_counter()
    # 1. Fail fast: the input, then the output.
    if not storage.exists(cfg.annotations):
        raise DatasetError(f"annotation file not found: {cfg.annotations}")
    _prepare_output(cfg)
    # 2. Three streaming passes: categories, images, annotations (spilled by part).
    categories = _categories(cfg.annotations)
    images = _Images.read(cfg.annotations)
    with tempfile.TemporaryDirectory(prefix="coco-to-parquet-") as tmp:
        spill = _Spill(tmp, cfg.rows_per_file)
        dropped, kept = _annotations(cfg.annotations, images, categories, spill)
        spill.flush()
        # 3. The part files, one at a time, then the categories, the summary and _SUCCESS.
        parts = (len(images) + cfg.rows_per_file - 1) // cfg.rows_per_file
        progress = Progress("convert", parts, unit="part files")
        for part in range(parts):
            output.write_part(cfg.output, part, _rows(cfg, images, spill.read(part), part))
            progress.add(1)
    output.write_categories(cfg.output, categories, output.STORED)
    summary = {
        "annotations": cfg.annotations,
        "output": cfg.output,
        "schema_version": output.SCHEMA_VERSION,
        "images": len(images),
        "annotations_kept": kept,
        "annotations_dropped": dict(sorted(dropped.items())),
        "part_files": parts,
        "wall_s": round(time.perf_counter() - start, 2),
    }
    output.write_summary(cfg.output, summary)
    return summary


def _prepare_output(cfg: ConvertConfig) -> None:
    """Refuse to mix with an earlier conversion's files unless ``--overwrite``, which deletes them."""
    if not storage.exists(cfg.output):
        storage.make_dirs(cfg.output)
        return
    ours = [
        uri
        for uri in storage.iter_files(cfg.output)
        if output.part_of(uri.rsplit("/", 1)[-1]) is not None
        or uri.rsplit("/", 1)[-1] in (output.SUCCESS, output.SUMMARY, output.CATEGORIES)
    ]
    if ours and not cfg.overwrite:
        raise DatasetError(f"{cfg.output} already holds Parquet labels; pass --overwrite or choose another --output")
    for uri in ours:
        storage.delete(uri)


# ---------------------------------------------------------------- the three passes


def _items(uri: str, prefix: str) -> Iterator[Any]:
    """The items under ``prefix`` (``images.item``), streamed; a syntax error names the file."""
    with storage.open_stream(uri) as f:
        try:
            yield from ijson.items(f, prefix, use_float=True)
        except ijson.JSONError as err:
            raise DatasetError(f"{uri} is not valid JSON: {err}") from err


def _categories(uri: str) -> list[dict[str, Any]]:
    """The file's categories, checked as :func:`maskrcnn.coco.categories` checks them (named
    by id where the file has none, which takes a pass over the annotations' category ids)."""
    found = list(_items(uri, "categories.item"))
    if not found:
        ids = [{"category_id": c} for c in _items(uri, "annotations.item.category_id")]
        return coco.categories({"annotations": ids}, uri)
    categories = coco.categories({"categories": found}, uri)
    keypoints.spec_of(categories, uri)  # one keypoint definition, or a KeypointError now
    return categories


@dataclass
class _Images:
    """The images in file order: position by id, and each one's file name and size."""

    position: dict[int, int]
    file_names: list[str]
    widths: array
    heights: array

    def __len__(self) -> int:
        return len(self.file_names)

    @classmethod
    def read(cls, uri: str) -> _Images:
        images = cls({}, [], array("i"), array("i"))
        for i, img in enumerate(_items(uri, "images.item")):
            coco.check_image(img, i, uri)
            if img["id"] in images.position:
                raise DatasetError(f"{uri}: image id {img['id']}: the id is used twice")
            images.position[img["id"]] = i
            images.file_names.append(img["file_name"])
            images.widths.append(img["width"])
            images.heights.append(img["height"])
        if not images.file_names:
            raise DatasetError(f"{uri} lists no images")
        return images

    def coco(self, position: int) -> dict[str, Any]:
        return {"width": self.widths[position], "height": self.heights[position]}


def _annotations(uri: str, images: _Images, categories: list[dict], spill: _Spill) -> tuple[Counter, int]:
    """Clean, encode and spill every annotation; return the drops by reason and the kept count."""
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    names = {c["id"]: c["name"] for c in categories}
    spec = keypoints.spec_of(categories, uri)
    seen: set[int] = set()
    dropped, kept = Counter(), 0
    for i, ann in enumerate(_items(uri, "annotations.item")):
        coco.check_annotation(ann, i, uri, seen)
        position = images.position.get(ann["image_id"])
        img = None if position is None else images.coco(position)
        reason, clean = coco.clean_annotation(ann, img, label_of, spec)
        if reason:
            dropped[reason] += 1
            continue
        spill.add(position, _instance(clean, img, names))
        kept += 1
    return dropped, kept


def _instance(ann: dict[str, Any], img: dict[str, Any], names: dict[int, str]) -> dict[str, Any]:
    """A cleaned COCO annotation -> a row's instance (``score`` null: ground truth)."""
    points = ann.get("keypoints")
    return {
        "category_id": ann["category_id"],
        "category": names[ann["category_id"]],
        "score": None,
        "bbox": [float(v) for v in ann["bbox"]],
        "mask": masks.to_compressed(ann["segmentation"], img["height"], img["width"]),
        "keypoints": [points[k : k + 3] for k in range(0, len(points), 3)] if points else None,
        "iscrowd": bool(ann["iscrowd"]),
    }


class _Spill:
    """Instances grouped by part file in local JSON-lines files, ``SPILL_BYTES`` held at most."""

    def __init__(self, root: str, rows_per_file: int):
        self.root, self.rows_per_file = root, rows_per_file
        self.held: dict[int, list[str]] = defaultdict(list)
        self.bytes = 0

    def add(self, position: int, instance: dict[str, Any]) -> None:
        line = json.dumps([position, instance]) + "\n"
        self.held[position // self.rows_per_file].append(line)
        self.bytes += len(line)
        if self.bytes >= SPILL_BYTES:
            self.flush()

    def flush(self) -> None:
        for part, lines in self.held.items():
            with open(self._path(part), "a") as f:
                f.writelines(lines)
        self.held.clear()
        self.bytes = 0

    def read(self, part: int) -> dict[int, list[dict]]:
        """One part's instances by image position; the file is removed once read."""
        by_image: dict[int, list[dict]] = defaultdict(list)
        if os.path.exists(self._path(part)):
            with open(self._path(part)) as f:
                for line in f:
                    position, instance = json.loads(line)
                    by_image[position].append(instance)
            os.remove(self._path(part))
        return by_image

    def _path(self, part: int) -> str:
        return os.path.join(self.root, f"{part}.jsonl")


def _rows(cfg: ConvertConfig, images: _Images, instances: dict[int, list[dict]], part: int) -> list[dict[str, Any]]:
    first = part * cfg.rows_per_file
    return [
        {
            **_where(cfg.images, images.file_names[p]),
            "width": images.widths[p],
            "height": images.heights[p],
            "instances": instances.get(p, []),
            "model": None,
        }
        for p in range(first, min(first + cfg.rows_per_file, len(images)))
    ]


def _where(root: str, file_name: str) -> dict[str, Any]:
    """A row's ``uri``, or an ``outside_root`` error row's where the name leaves ``--images``: never read."""
    uri = coco.image_uri(root, file_name)
    if uri:
        return {"uri": uri, "error": None}
    return {"uri": file_name, "error": f"{coco.OUTSIDE_ROOT}: {file_name!r} is not under {root}"}
