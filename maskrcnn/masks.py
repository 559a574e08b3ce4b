"""COCO mask encoding: the only module that touches RLE and polygons.

All encoding and decoding is pycocotools'; this module only normalises its inputs and
outputs (Fortran order in, ASCII ``counts`` strings out, so RLEs are JSON and Parquet safe).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


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
