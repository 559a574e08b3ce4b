"""Config fields that are flags: what a library module declares, with no parser in sight.

A job's config is a dataclass whose fields are made by :func:`option` (or shared through
:func:`embed`): the field's type, default and help text are the flag's. The library's
modules declare their configs here and take the dataclasses; the parser, --help and the
exit status are :mod:`maskrcnn.cli`'s, which only the jobs and scripts use. The value
parsers below (``ints``, ``resources`` ...) are argparse ``type``s that a field names.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from typing import Any

REQUIRED = dataclasses.MISSING


# ---------------------------------------------------------------- declaring flags


def option(
    help: str,
    default: Any = REQUIRED,
    *,
    group: str,
    flag: str | None = None,
    was: dict[str, Any] | None = None,
    default_text: str | None = None,
    **argparse_kwargs: Any,
) -> Any:
    """A config field that is also a flag. ``flag`` defaults to ``--field-name``; a boolean
    field is a switch (``--gpu`` turns a False default on, ``--no-amp`` a True one off).
    ``was`` maps a flag's earlier names to None (it took the value) or to the value it stood
    for (``{"--gpu": 1.0}``); they still work, with a warning, and --help leaves them out.
    ``default_text`` says what a None default stands for ("all", "from the file"), where the
    job decides it later; --help and docs/flags.md show it as the default. The help text never
    gives the default itself: both show the declared one.
    ``argparse_kwargs`` (``type``, ``choices``, ``metavar``, ``nargs``) go to ``add_argument`` as they are."""
    if "(default" in help:
        raise TypeError(f"declare the default of {help!r} (default_text=...), not in its help")
    meta = {
        "help": help,
        "group": group,
        "flag": flag,
        "was": was or {},
        "default_text": default_text,
        "argparse": argparse_kwargs,
    }
    return dataclasses.field(default=default, metadata=meta)


def embed(options: type, **defaults: Any) -> Any:
    """A config field holding options that several jobs share (a dataclass of :func:`option`
    fields): its flags are the job's own, with this job's ``defaults`` where they differ."""
    meta = {"options": options, "defaults": defaults}
    return dataclasses.field(default_factory=functools.partial(options, **defaults), metadata=meta)


# ---------------------------------------------------------------- parsing flag values


def ints(text: str) -> tuple[int, ...]:
    """``"640,672,704"`` -> ``(640, 672, 704)``."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def floats(text: str) -> tuple[float, ...]:
    """``"0.026,0.025"`` -> ``(0.026, 0.025)``; each positive."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def names(text: str) -> list[str]:
    """``"person, dog"`` -> ``["person", "dog"]``."""
    return [n.strip() for n in text.split(",") if n.strip()]


def pool_size(text: str) -> tuple[int, int]:
    """``"4"`` -> ``(4, 4)``; ``"1,16"`` -> ``(1, 16)``."""
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1 or parts[0] > parts[-1]:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[-1]


def extensions(text: str) -> tuple[str, ...] | None:
    """``"jpg,PNG"`` -> ``(".jpg", ".png")``; ``"*"`` -> None (every file)."""
    if text.strip() == "*":
        return None
    return tuple("." + e.strip().lstrip(".").lower() for e in text.split(",") if e.strip())


def resources(text: str) -> dict[str, float]:
    """``'{"gpu_node": 1}'`` -> ``{"gpu_node": 1.0}``: custom Ray resources."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
        example = '{"gpu_node": 1}'
        raise argparse.ArgumentTypeError(f"expected a JSON object of positive amounts like '{example}', got {text!r}")
    return {str(k): float(v) for k, v in value.items()}


# ---------------------------------------------------------------- the model every job takes

MODEL_HELP = (
    "the model: a checkpoint written by jobs/train.py (best.pt), a torchvision Mask R-CNN state dict "
    "or reference-script checkpoint (.pth), local or s3://, or a torchvision weight name (COCO_V1, "
    "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1), downloaded once by this process"
)
ARCH_HELP = (
    "the architecture of a .pth file that does not say, or of a bare weight name "
    "(--arch keypointrcnn_resnet50_fpn --model COCO_V1: torchvision's Keypoint R-CNN)"
)
ARCH_DEFAULT = "from the file; maskrcnn_resnet50_fpn for a bare weight name"
KEYPOINT_SIGMAS_HELP = "keypoint models: the OKS sigma of each keypoint, comma-separated, in the category's order"
KEYPOINT_SIGMAS_DEFAULT = "COCO's for COCO's 17 person keypoints, else 0.067 each, with a warning"


def model_option(group: str, required: bool = True) -> Any:
    return option(MODEL_HELP, REQUIRED if required else None, group=group)


def arch_option(group: str) -> Any:
    from maskrcnn.model import ARCHS  # here, so that importing cli (to report an error) loads no torch

    return option(ARCH_HELP, None, group=group, default_text=ARCH_DEFAULT, choices=ARCHS)


def keypoint_sigmas_option(group: str) -> Any:
    return option(KEYPOINT_SIGMAS_HELP, None, group=group, default_text=KEYPOINT_SIGMAS_DEFAULT, type=floats)
