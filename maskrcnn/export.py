"""Segmentation Parquet -> COCO results JSON, a COCO dataset JSON, and overlay pictures."""

from __future__ import annotations

import io
import posixpath
from typing import Any, Iterator

import numpy as np
import pyarrow.dataset as pads
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from maskrcnn import images, masks, storage
from maskrcnn.evaluate import to_results


def read_rows(output: str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Stream the rows of a segmentation output (its part files), in URI order per file."""
    fs, path = storage.filesystem(output)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    for batch in dataset.to_batches(columns=columns):
        yield from batch.to_pylist()


def image_ids_from(gt: dict[str, Any]) -> dict[str, int]:
    """Map file names (the last part of each URI) to the image ids of a COCO ground truth."""
    return {posixpath.basename(img["file_name"]): img["id"] for img in gt["images"]}


def _image_id(uri: str, ids: dict[str, int] | None, fallback: int) -> int | None:
    return ids.get(posixpath.basename(uri)) if ids is not None else fallback


def to_coco_results(rows: Iterator[dict], ids: dict[str, int] | None = None, min_score: float = 0.0) -> list[dict]:
    """COCO results (what ``COCO.loadRes`` takes). With ``ids`` the image ids are the ground
    truth's, matched by file name; otherwise images are numbered 1.. in row order."""
    results = []
    for n, row in enumerate(r for r in rows if not r["error"]):
        image_id = _image_id(row["uri"], ids, n + 1)
        if image_id is None:
            continue
        results.extend(to_results([i for i in row["instances"] if i["score"] >= min_score], image_id))
    return results


def to_coco_dataset(rows: Iterator[dict], min_score: float = 0.0) -> dict[str, Any]:
    """A full COCO instances file (images, annotations, categories) for labelling tools.
    ``file_name`` is the image's URI; each annotation keeps its ``score``."""
    gt: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    categories: dict[int, str] = {}
    for row in (r for r in rows if not r["error"]):
        image_id = len(gt["images"]) + 1
        gt["images"].append({"id": image_id, "file_name": row["uri"], "width": row["width"], "height": row["height"]})
        for inst in row["instances"]:
            if inst["score"] < min_score:
                continue
            categories[inst["category_id"]] = inst["category"]
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": inst["category_id"],
                "bbox": inst["bbox"], "area": masks.area(inst["mask"]), "segmentation": inst["mask"],
                "iscrowd": 0, "score": inst["score"],
            })  # fmt: skip
    gt["categories"] = [{"id": i, "name": n} for i, n in sorted(categories.items())]
    return gt


def render(row: dict[str, Any], min_score: float = 0.0) -> bytes:
    """One output row drawn over its image (masks and labelled boxes), as PNG bytes."""
    rgb = images.decode(storage.read_bytes(row["uri"]), exif=True)
    picture = torch.from_numpy(rgb).permute(2, 0, 1)
    kept = [i for i in row["instances"] if i["score"] >= min_score]
    if kept:
        h, w = rgb.shape[:2]
        binary = torch.from_numpy(np.stack([masks.decode(i["mask"], h, w) for i in kept]).astype(bool))
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (i["bbox"] for i in kept)])
        labels = [f"{i['category']} {i['score']:.2f}" for i in kept]
        picture = draw_segmentation_masks(picture, binary, alpha=0.5)
        picture = draw_bounding_boxes(picture, boxes, labels=labels, width=2)
    return _png(picture.permute(1, 2, 0).numpy())


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _cell(png: bytes, size: int) -> torch.Tensor:
    """A picture scaled to fit a ``size`` square, centred on black (aspect ratio kept).
    Small pictures are enlarged with nearest-neighbour sampling, so mask edges stay sharp."""
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    scale = size / max(picture.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), resample)
    cell = Image.new("RGB", (size, size))
    cell.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
    return torch.from_numpy(np.asarray(cell).copy()).permute(2, 0, 1)


def contact_sheet(pictures: list[bytes], columns: int = 4, cell: int = 256) -> bytes:
    """Rendered PNGs (from :func:`render`) laid out in one grid PNG, ``columns`` wide."""
    if not pictures:
        raise ValueError("no pictures for the contact sheet")
    grid = make_grid([_cell(p, cell) for p in pictures], nrow=columns, padding=4, pad_value=255)
    return _png(grid.permute(1, 2, 0).numpy())
