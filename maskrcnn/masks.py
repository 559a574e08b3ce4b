"""COCO mask encoding: the only module that touches RLE and polygons.

All encoding and decoding is pycocotools'; this module only normalises its inputs and
outputs (Fortran order in, ASCII ``counts`` strings out, so RLEs are JSON and Parquet safe).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks


class InvalidSegmentation(ValueError):
    """A polygon or RLE that cannot describe a mask (too few points, odd length, bad size)."""


def _valid_polygon(poly: Any) -> bool:
    return (
        isinstance(poly, list)
        and len(poly) >= 6
        and len(poly) % 2 == 0
        and all(isinstance(v, (int, float)) and np.isfinite(v) for v in poly)
    )


def check_segmentation(segm: Any, height: int, width: int) -> None:
    """Raise :class:`InvalidSegmentation` unless ``segm`` is a usable COCO segmentation."""
    if isinstance(segm, list):
        if not segm or not all(_valid_polygon(p) for p in segm):
            raise InvalidSegmentation("polygon needs an even number (>= 6) of finite coordinates")
        return
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise InvalidSegmentation(f"RLE size {segm['size']} != image size {[height, width]}")
        return
    raise InvalidSegmentation(f"unknown segmentation type {type(segm).__name__}")


def to_rle(segm: Any, height: int, width: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) -> one compressed RLE."""
    check_segmentation(segm, height, width)
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def decode(segm: Any, height: int, width: int) -> np.ndarray:
    """Any COCO segmentation -> a ``(height, width)`` uint8 mask of 0 and 1."""
    return mask_utils.decode(to_rle(segm, height, width))


def encode(binary_masks: np.ndarray) -> list[dict]:
    """``(N, H, W)`` boolean or 0/1 masks -> N compressed RLEs with ASCII ``counts``."""
    if binary_masks.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got shape {binary_masks.shape}")
    if len(binary_masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(binary_masks.astype(np.uint8).transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def area(rle: dict) -> float:
    return float(mask_utils.area(rle))


def paste_and_encode(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5) -> list[dict]:
    """Mask R-CNN's ``(N, 1, M, M)`` mask probabilities + boxes in image coordinates ->
    N compressed RLEs at the full image size.

    The arithmetic is torchvision's ``paste_masks_in_image`` followed by ``> threshold``, but
    each mask is resized only to its box and thresholded there, so the full-size mask is
    held as one byte per pixel, one instance at a time, never as floats.
    """
    if len(mask_probs) == 0:
        return []
    padded, scale = expand_masks(mask_probs, padding=1)
    int_boxes = expand_boxes(boxes, scale).to(torch.int64).tolist()
    canvas = np.zeros((height, width), dtype=np.uint8)
    rles = []
    for prob, (x0, y0, x1, y1) in zip(padded, int_boxes):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        crop = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] > threshold
        cx0, cx1, cy0, cy1 = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        canvas[:] = 0
        if cx1 > cx0 and cy1 > cy0:
            canvas[cy0:cy1, cx0:cx1] = crop[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].cpu().numpy()
        rles.append(encode(canvas[None])[0])
    return rles
