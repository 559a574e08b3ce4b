"""Person keypoints, COCO's ``keypoints`` ``[x, y, v] * K``: the dataset's keypoint names and
skeleton (:class:`KeypointSpec`, stored in the checkpoint), the left/right swap a horizontal
flip needs (the flip itself is :class:`maskrcnn.transforms.RandomHorizontalFlip`), and the
OKS sigmas that score them (:func:`sigmas`). No torch: the converter checks keypoints too.

The swap comes from the names (``left_eye`` <-> ``right_eye``), not from a table written for
COCO persons, so any keypoint set whose names say left and right flips correctly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval

from maskrcnn.errors import UserError


class KeypointError(UserError):
    """A dataset whose keypoint definition cannot be used. Names the file and the category."""


@dataclass(frozen=True)
class KeypointSpec:
    names: tuple[str, ...]  # K keypoint names, in the order of each annotation's [x, y, v] triples
    skeleton: tuple[tuple[int, int], ...]  # pairs of 1-based keypoint numbers, as COCO writes them

    def __len__(self) -> int:
        return len(self.names)

    def flip_permutation(self) -> list[int]:
        """Index i of a flipped pose takes keypoint ``perm[i]``: each ``left`` name swaps with
        its ``right`` twin; a name with no twin (``nose``) stays."""
        index = {name: i for i, name in enumerate(self.names)}
        return [index.get(_mirrored(name), i) for i, name in enumerate(self.names)]

    def as_dict(self) -> dict[str, list]:
        """What a checkpoint and a COCO category hold: ``{"keypoints": names, "skeleton": pairs}``."""
        return {"keypoints": list(self.names), "skeleton": [list(pair) for pair in self.skeleton]}

    @classmethod
    def from_dict(cls, value: dict[str, list] | None) -> KeypointSpec | None:
        if not value:
            return None
        return cls(tuple(value["keypoints"]), tuple((a, b) for a, b in value["skeleton"]))


# COCO's 17 person keypoints, as torchvision's Keypoint R-CNN weights name them (a test checks
# that they still do; written out so that this module needs no torch), and the skeleton of
# COCO's person category, which torchvision's weights do not carry.
COCO_KEYPOINTS: list[str] = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
]  # fmt: skip
_PAIRS = "16-14 14-12 17-15 15-13 12-13 6-12 7-13 6-7 6-8 7-9 8-10 9-11 2-3 1-2 1-3 2-4 3-5 4-6 5-7"
COCO_SKELETON = tuple((int(a), int(b)) for a, b in (pair.split("-") for pair in _PAIRS.split()))
COCO_PERSON = KeypointSpec(tuple(COCO_KEYPOINTS), COCO_SKELETON)


def unnamed(count: int) -> KeypointSpec:
    """The spec of a keypoint head that came without names: COCO's persons for 17 (as 91
    classes are COCO's), else ``keypoint_1`` .. ``keypoint_K`` with no skeleton."""
    if count == len(COCO_PERSON):
        return COCO_PERSON
    return KeypointSpec(tuple(f"keypoint_{i}" for i in range(1, count + 1)), ())


def _mirrored(name: str) -> str:
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "l": "r", "r": "l"}
    return "_".join(swap.get(part, part) for part in name.split("_"))


def spec_of(categories: list[dict], path: str) -> KeypointSpec | None:
    """The keypoint definition of a COCO file's categories, or None if none has keypoints.
    Every category with keypoints must share one definition (one keypoint head predicts them)."""
    with_keypoints = [c for c in categories if c.get("keypoints")]
    if not with_keypoints:
        return None
    first = with_keypoints[0]
    where = f"{path}: category {first.get('name')!r}"
    names = first["keypoints"]
    if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
        raise KeypointError(f"{where}: 'keypoints' must be a list of names")
    skeleton = first.get("skeleton") or []
    if not all(_pair(p, len(names)) for p in skeleton):
        raise KeypointError(f"{where}: 'skeleton' must be pairs of keypoint numbers 1..{len(names)}")
    for other in with_keypoints[1:]:
        if other["keypoints"] != names or (other.get("skeleton") or []) != skeleton:
            raise KeypointError(
                f"{path}: categories {first.get('name')!r} and {other.get('name')!r} define different keypoints"
            )
    return KeypointSpec(tuple(names), tuple((a, b) for a, b in skeleton))


def _pair(pair: Any, count: int) -> bool:
    return isinstance(pair, list) and len(pair) == 2 and all(isinstance(i, int) and 1 <= i <= count for i in pair)


def valid(values: Any, count: int) -> bool:
    """An annotation's ``keypoints``: ``3 * count`` finite numbers, visibility 0, 1 or 2."""
    if not (isinstance(values, list) and len(values) == 3 * count):
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return False
    return all(v in (0, 1, 2) for v in values[2::3])


# The mean of COCO's 17 person sigmas (0.0669): what a keypoint set with no --keypoint-sigmas is scored with.
DEFAULT_SIGMA = 0.067


def sigmas(names: list[str] | tuple[str, ...], given: list[float] | None = None) -> tuple[np.ndarray, str | None]:
    """The OKS sigma of each keypoint and, when they had to be guessed, a warning: ``given``
    ones, else COCO's for COCO's 17 person keypoints, else :data:`DEFAULT_SIGMA`."""
    if given is not None:
        if len(given) != len(names):
            raise KeypointError(f"--keypoint-sigmas gives {len(given)} values for {len(names)} keypoints")
        return np.asarray(given, dtype=float), None
    if list(names) == COCO_KEYPOINTS:
        return COCOeval(iouType="keypoints").params.kpt_oks_sigmas, None
    warning = f"no --keypoint-sigmas for these {len(names)} keypoints: scoring OKS with {DEFAULT_SIGMA} for each"
    return np.full(len(names), DEFAULT_SIGMA), warning
