"""Training records -> decoded examples (:func:`load_example`).

The records come from a COCO file (:mod:`maskrcnn.coco`) or from Parquet labels
(:mod:`maskrcnn.labels`). Fetching, decoding and shrinking run in Ray Data CPU tasks for
training, and in the workers for evaluation; what crosses the object store is the image at
no more than the model's size and its masks as RLE. What each training worker then does is
in :mod:`maskrcnn.transforms`. A bad image becomes a row with ``error`` set, which the
training loop counts and skips.

A record says the **orientation** its sizes and coordinates are in, and :func:`load_example`
decodes its image so: ``stored``, the pixels as the file stores them (a COCO file's, as COCO
defines it: no EXIF orientation applied), or ``displayed``, with the EXIF orientation applied
(a segmentation output's; Parquet labels say theirs, see :mod:`maskrcnn.output`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskrcnn import images, masks, output, transforms
from maskrcnn.coco import OUTSIDE_ROOT

# size_mismatch: the image, decoded in the record's orientation, is not the size the annotations give
IMAGE_ERRORS = (*images.ERROR_KINDS, "size_mismatch", OUTSIDE_ROOT)


def _error_row(record: dict, kind: str) -> dict[str, Any]:
    row = {
        "image_id": record["image_id"],
        "height": 0,
        "width": 0,
        "image": np.zeros((3, 1, 1), np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int64),
        "masks": "",
        "error": kind,
    }
    if record.get("num_keypoints"):
        row["keypoints"] = np.zeros((0, record["num_keypoints"], 3), np.float32)
    return row


def load_example(record: dict[str, Any], transform: v2.Transform | None = None) -> dict[str, Any]:
    """Fetch, decode (in the record's ``orientation``) and (optionally) augment one record.
    The row's ``masks`` are packed (:func:`maskrcnn.masks.pack`, the image's size): RLE, not
    ``(N, H, W)`` arrays, crosses the object store. Never raises for bad input: returns a row
    whose ``error`` names what went wrong (``""`` when fine)."""
    if record.get("error"):  # known before any read: the name leaves the image root
        return _error_row(record, record["error"])
    decoded, error = images.read(record["uri"], None, exif=record["orientation"] == output.DISPLAYED)
    if error:
        return _error_row(record, error.split(":", 1)[0])
    rgb, (h, w) = decoded.pixels, (record["height"], record["width"])
    if rgb.shape[:2] != (h, w):
        return _error_row(record, "size_mismatch")
    anns = json.loads(record["annotations"])
    image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(h, w),
        ),
        "masks": tv_tensors.Mask(
            torch.from_numpy(np.stack([masks.decode(a["segmentation"], h, w) for a in anns]))
            if anns
            else torch.zeros((0, h, w), dtype=torch.uint8)
        ),
        "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
    }
    if record.get("num_keypoints"):
        points = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32)
        target.update(transforms.split_keypoints(points.reshape(len(anns), record["num_keypoints"], 3), (h, w)))
    if transform is not None:
        image, target = transform(image, target)
    row = {
        "image_id": record["image_id"],
        "height": h,  # the image's full size: the worker resizes it if it still has it (Augment)
        "width": w,
        "image": image.numpy(),
        "boxes": target["boxes"].numpy().astype(np.float32),
        "labels": target["labels"].numpy(),
        "masks": masks.pack(target["masks"].numpy()),
        "error": "",
    }
    if "keypoints" in target:
        row["keypoints"] = transforms.joined_keypoints(target).numpy()
    return row
