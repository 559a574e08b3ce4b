"""COCO mask encoding: the only module that touches RLE and polygons.

All encoding and decoding is pycocotools'; this module only normalises its inputs and
outputs (Fortran order in, ASCII ``counts`` strings out, so RLEs are JSON and Parquet safe).
Only pasting a model's masks (:func:`paste_and_encode`) needs torch, and imports it there:
the converter encodes COCO masks with no torch in its process.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:
    import torch


class InvalidSegmentation(ValueError):
    """A polygon or RLE that cannot describe a mask (too few points, odd length, bad size)."""


def valid_polygon(poly: Any) -> bool:
    return (
        isinstance(poly, list)
        and len(poly) >= 6
        and len(poly) % 2 == 0
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly)  # 6x numpy's speed on scalars
    )


def check_segmentation(segm: Any, height: int, width: int) -> None:
    """Raise :class:`InvalidSegmentation` unless ``segm`` is a usable COCO segmentation."""
    if isinstance(segm, list):
        if not segm or not all(valid_polygon(p) for p in segm):
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


def to_compressed(segm: Any, height: int, width: int) -> dict:
    """Any COCO segmentation -> one compressed RLE with an ASCII ``counts`` string (Parquet's form)."""
    rle = to_rle(segm, height, width)
    counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


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


def pack(binary_masks: np.ndarray) -> str:
    """``(N, H, W)`` 0/1 masks -> one string, their compressed RLE ``counts`` joined by spaces
    (the alphabet has none): what a training example carries through Ray's object store,
    tens of times fewer bytes than the masks. :func:`unpack` needs the ``(H, W)`` back."""
    return " ".join(rle["counts"] for rle in encode(binary_masks))


def unpack(packed: str, height: int, width: int) -> np.ndarray:
    """The inverse of :func:`pack`: ``(N, height, width)`` uint8 masks."""
    counts = str(packed).split()
    if not counts:
        return np.zeros((0, height, width), np.uint8)
    stack = mask_utils.decode([{"size": [height, width], "counts": c.encode("ascii")} for c in counts])
    return stack.transpose(2, 0, 1)


def area(rle: dict) -> float:
    return float(mask_utils.area(rle))


def box(rle: dict) -> list[float]:
    """The mask's tight box, COCO ``[x, y, w, h]``."""
    return [float(v) for v in mask_utils.toBbox(rle)]


def paste_and_encode(
    mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> list[dict]:
    """Mask R-CNN's ``(N, 1, M, M)`` mask probabilities + boxes in image coordinates ->
    N compressed RLEs of the full ``(height, width)`` image, in time proportional to the
    box areas: no full-image mask is ever built.

    The pixels are torchvision's ``paste_masks_in_image(...) > threshold`` (the same box
    expansion and bilinear resize), and the RLE is byte for byte what ``pycocotools.mask.encode``
    gives for that full-image mask. COCO RLE runs down columns, so the runs of a mask that
    is zero outside its box can be read off its column-major crop: after each crop column
    come ``height - crop height`` zeros, which join the next column's top zeros.
    Everything up to the change points runs on the masks' device, for all instances at
    once; only the change points come to the host, in one transfer.
    """
    import torch

    if len(mask_probs) == 0:
        return []
    crops = _threshold_crops(mask_probs, boxes, height, width, threshold)
    flat, starts = _column_major(crops, height)
    changes = (torch.nonzero(flat[1:] != flat[:-1]).squeeze(1) + 1).cpu().numpy()
    counts = _run_lengths(changes, starts, crops, height, width)
    rles = mask_utils.frPyObjects([{"size": [height, width], "counts": c} for c in counts], height, width)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _threshold_crops(
    mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float
) -> list[tuple[torch.Tensor, int, int]]:
    """Each mask resized into its (expanded, integer) box as torchvision pastes it, cut to
    the image and thresholded: ``(crop, x0, y0)`` with the crop's top-left in the image."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    padded, scale = expand_masks(mask_probs, padding=1)
    int_boxes = expand_boxes(boxes, scale).to(torch.int64).tolist()  # the one host sync for boxes
    crops = []
    for prob, (x0, y0, x1, y1) in zip(padded, int_boxes):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        cx0, cx1, cy0, cy1 = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        if cx1 <= cx0 or cy1 <= cy0:
            crops.append((prob.new_zeros((0, 0), dtype=torch.bool), 0, 0))
            continue
        resized = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        crops.append((resized[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] > threshold, cx0, cy0))
    return crops


def _column_major(crops: list[tuple[torch.Tensor, int, int]], height: int) -> tuple[torch.Tensor, np.ndarray]:
    """All crops in one flat boolean buffer: a zero, then crop 1 column by column (each column
    followed by one zero standing for the gap down to the next column, unless the crop spans
    the full height), a zero, crop 2, ..., a zero. Returns it and each crop's leading zero."""
    import torch

    lengths = [c.shape[1] * _rows(c, height) for c, _, _ in crops]
    starts = np.concatenate([[0], np.cumsum(np.add(lengths, 1))])[:-1]
    flat = torch.zeros(int(starts[-1]) + lengths[-1] + 2, dtype=torch.bool, device=crops[0][0].device)
    for (crop, _, _), start, length in zip(crops, starts, lengths):
        if length:
            columns = flat[start + 1 : start + 1 + length].view(crop.shape[1], _rows(crop, height))
            columns[:, : crop.shape[0]] = crop.t()
    return flat, starts


def _rows(crop: torch.Tensor, height: int) -> int:
    """Rows per column in the flat buffer: the crop's, plus one for the gap below it."""
    return crop.shape[0] + (crop.shape[0] < height)


def _run_lengths(
    changes: np.ndarray, starts: np.ndarray, crops: list[tuple[torch.Tensor, int, int]], height: int, width: int
) -> list[np.ndarray]:
    """Flat-buffer change points -> each instance's COCO run lengths (zeros first)."""
    rows = np.array([_rows(c, height) for c, _, _ in crops])
    x0 = np.array([x for _, x, _ in crops])
    y0 = np.array([y for _, _, y in crops])
    owner = np.searchsorted(starts, changes, side="left") - 1  # a change at a shared zero ends the crop before it
    j = changes - starts[owner] - 1
    pixel = (x0[owner] + j // rows[owner]) * height + y0[owner] + j % rows[owner]
    total = height * width
    counts = []
    for positions in np.split(pixel, np.searchsorted(owner, np.arange(1, len(crops)))):
        positions = positions[positions < total]  # a mask ending on the last pixel has no final zero run
        counts.append(np.diff(np.concatenate([[0], positions, [total]])).astype(np.uint32))
    return counts


# ---------------------------------------------------------------- polygons

POLYGON_TOLERANCE = 1.0  # pixels: how far a simplified outline may stray from the mask's own...
POLYGON_RELATIVE_TOLERANCE = 0.005  # ...and at most this fraction of the outline's length


def to_polygons(rle: dict, tolerance: float = POLYGON_TOLERANCE) -> list[list[float]]:
    """A compressed RLE -> COCO polygons ``[[x1, y1, x2, y2, ...], ...]``, one per connected
    part, in pixel-edge coordinates (as pycocotools rasterises them: ``[0, 0, 2, 0, 2, 2, 0, 2]``
    is the 2 x 2 square of pixels at the origin).

    OpenCV traces each part and its holes (``RETR_CCOMP``, as detectron2's ``GenericMask``
    does) through the centres of the boundary pixels; each outline is simplified (Douglas-
    Peucker, ``cv2.approxPolyDP``) to within ``tolerance`` pixels or 0.5% of its length,
    whichever is less, so that a large outline loses its staircase and a small one keeps its
    shape (see benchmarks/polygons.py), and then moved half a pixel outwards (holes inwards),
    onto the pixels' edges. A hole is kept by joining it to its
    part's outline with a zero-width cut, so that the one polygon fills the part and leaves
    the hole empty under the even-odd rule pycocotools, Label Studio and CVAT draw with.
    Parts and holes left with fewer than 3 points are dropped; a mask with no part of 3
    points or more (a speck of a pixel or two, a one-pixel line) gives ``[]``.

    Only the mask's bounding columns are decoded, so the cost grows with its box, not with
    the photo's pixels.
    """
    found = _crop(rle)
    if found is None:
        return []
    crop, x0, y0 = found
    import cv2  # opencv-python-headless: only polygon export needs it

    contours, hierarchy = cv2.findContours(np.pad(crop, 1), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    outlines = [_outline(_simplified(cv2, c, tolerance), outer=h[3] < 0) for c, h in zip(contours, hierarchy)]
    polygons = []
    for i, (_, _, child, parent) in enumerate(hierarchy):
        if parent >= 0 or outlines[i] is None:
            continue
        polygon = outlines[i]
        while child >= 0:
            if outlines[child] is not None:
                polygon = _join_hole(polygon, outlines[child])
            child = hierarchy[child][0]
        polygons.append((polygon + (x0 - 0.5, y0 - 0.5)).ravel().round(2).tolist())  # - 1 for the pad, + 0.5
    return polygons


def _simplified(cv2: Any, contour: np.ndarray, tolerance: float) -> np.ndarray:
    epsilon = min(tolerance, POLYGON_RELATIVE_TOLERANCE * cv2.arcLength(contour, True))
    return cv2.approxPolyDP(contour, epsilon, True)[:, 0, :]


def _crop(rle: dict) -> tuple[np.ndarray, int, int] | None:
    """The mask's pixels within its bounding box, as ``(crop, x0, y0)``; None when it is empty.
    Reads the RLE's runs (column-major, zeros first) and fills only the columns they touch."""
    height = int(rle["size"][0])
    counts = _counts(rle["counts"])
    ends = np.cumsum(counts)
    on_starts, on_ends = (ends - counts)[1::2], ends[1::2]
    keep = on_ends > on_starts
    on_starts, on_ends = on_starts[keep], on_ends[keep]
    if len(on_starts) == 0:
        return None
    x0, x1 = int(on_starts[0] // height), int((on_ends[-1] - 1) // height) + 1
    edges = np.zeros((x1 - x0) * height + 1, np.int32)
    np.add.at(edges, on_starts - x0 * height, 1)
    np.add.at(edges, on_ends - x0 * height, -1)
    columns = np.cumsum(edges[:-1]).astype(np.uint8).reshape(x1 - x0, height).T
    rows = np.flatnonzero(columns.any(axis=1))
    return np.ascontiguousarray(columns[rows[0] : rows[-1] + 1]), x0, int(rows[0])


def _counts(counts: str | bytes | list[int]) -> np.ndarray:
    """COCO run lengths from an uncompressed list or a compressed string (pycocotools' rleFrString)."""
    if isinstance(counts, list):
        return np.asarray(counts, dtype=np.int64)
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return np.asarray(runs, dtype=np.int64)


def _outline(points: np.ndarray, outer: bool) -> np.ndarray | None:
    """A traced outline (pixel centres) moved half a pixel onto the pixels' edges: outwards
    for a part, inwards for a hole; None when it has fewer than 3 points."""
    if len(points) < 3:
        return None
    points = points.astype(np.float64)
    a, b = _offset(points, 0.5), _offset(points, -0.5)
    bigger, smaller = (a, b) if abs(_signed_area(a)) > abs(_signed_area(b)) else (b, a)
    return bigger if outer else smaller


def _offset(points: np.ndarray, distance: float) -> np.ndarray:
    """A closed polygon with every edge moved ``distance`` along its normal (mitred corners,
    the mitre capped at twice the distance)."""
    edges = np.roll(points, -1, axis=0) - points
    lengths = np.maximum(np.linalg.norm(edges, axis=1, keepdims=True), 1e-9)
    normals = np.stack([edges[:, 1], -edges[:, 0]], axis=1) / lengths
    corner = normals + np.roll(normals, 1, axis=0)  # vertex i joins edges i - 1 and i
    corner /= np.maximum(np.linalg.norm(corner, axis=1, keepdims=True), 1e-9)
    cos = np.maximum((corner * normals).sum(axis=1, keepdims=True), 0.5)
    return points + distance * corner / cos


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float((x * np.roll(y, -1) - np.roll(x, -1) * y).sum())


def _join_hole(polygon: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """One polygon tracing ``polygon``, then (through a zero-width cut at the closest pair of
    points) around ``hole`` and back."""
    distances = ((polygon[:, None, :] - hole[None, :, :]) ** 2).sum(axis=-1)
    i, j = np.unravel_index(distances.argmin(), distances.shape)
    return np.concatenate([polygon[: i + 1], hole[j:], hole[: j + 1], polygon[i:]])
