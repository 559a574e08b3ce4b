"""The project checkpoint: one self-describing file that rebuilds its model offline.

Layout (a plain dict, written with ``torch.save``, read with ``torch.load(weights_only=True)``
so loading never runs pickled code)::

    format           "maskrcnn-ray-checkpoint"
    format_version   1
    arch             e.g. "maskrcnn_resnet50_fpn"
    arch_kwargs      keyword arguments of maskrcnn.model.build_model (num_classes included)
    classes          class names, index i+1 = contiguous label i+1 (0 is background)
    category_ids     the COCO category id of each class, same order
    state_dict       the model's weights (no DDP "module." prefix)
    step, epoch      optimizer steps done, epochs completed
    metrics          dict of floats (losses, AP, ...)
    train_state      optimizer and AMP scaler state for resuming, or None
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch
from torch import nn

from maskrcnn import storage
from maskrcnn.model import build_model

FORMAT = "maskrcnn-ray-checkpoint"
FORMAT_VERSION = 1
FILENAME = "model.pt"
_REQUIRED = ("arch", "arch_kwargs", "classes", "category_ids", "state_dict", "step", "epoch", "metrics")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, unsafe or of an unknown format."""


def make(
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict,
    classes: list[str],
    category_ids: list[int],
    step: int,
    epoch: int,
    metrics: dict[str, float] | None = None,
    train_state: dict | None = None,
) -> dict[str, Any]:
    model = getattr(model, "module", model)  # unwrap DDP
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "classes": list(classes),
        "category_ids": [int(c) for c in category_ids],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "step": int(step),
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "train_state": train_state,
    }


def to_bytes(ckpt: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def save(uri: str, ckpt: dict[str, Any]) -> None:
    """Write atomically to a local path or s3:// URI."""
    storage.write_bytes(uri, to_bytes(ckpt))


def from_bytes(data: bytes, source: str) -> dict[str, Any]:
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"refusing to load {source}: {first}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a {FORMAT} file")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{source} has format_version {ckpt.get('format_version')}, expected {FORMAT_VERSION}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}")
    return ckpt


def load(uri: str) -> dict[str, Any]:
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as err:
        raise CheckpointError(str(err)) from err
    return from_bytes(data, uri)


def build(ckpt: dict[str, Any]) -> nn.Module:
    """Rebuild the checkpoint's model with its weights, in eval mode."""
    model = build_model(ckpt["arch"], **ckpt["arch_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def identity(ckpt: dict[str, Any]) -> str:
    """A short stable name for the weights: ``arch@step:<sha256 of the weights, 12 hex>``."""
    digest = hashlib.sha256()
    for name in sorted(ckpt["state_dict"]):
        digest.update(name.encode())
        digest.update(ckpt["state_dict"][name].numpy().tobytes())
    return f"{ckpt['arch']}@{ckpt['step']}:{digest.hexdigest()[:12]}"
