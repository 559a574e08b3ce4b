"""The project checkpoint: one self-describing file that rebuilds its model offline. It is
the top layer of loading a model: :func:`load`, the one way every job reads a model
(``--model``, and training's resume), turns a project checkpoint, a torchvision weight name
or a torchvision ``.pth`` into such a checkpoint. It reads the file through
:mod:`maskrcnn.weights` and builds the model with :mod:`maskrcnn.model`; neither calls back.

Layout (a plain dict, written with ``torch.save``, read with ``torch.load(weights_only=True)``
so loading never runs pickled code)::

    format           "maskrcnn-ray-checkpoint"
    format_version   1
    arch             e.g. "maskrcnn_resnet50_fpn"
    arch_kwargs      keyword arguments of maskrcnn.model.build_model (num_classes included)
    classes          class names, index i+1 = contiguous label i+1 (0 is background)
    category_ids     the COCO category id of each class, same order
    keypoints        {"keypoints": names, "skeleton": pairs} of a keypoint model (as its COCO
                     category gives them), else None; absent from files written before keypoints
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
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

from maskrcnn import keypoints as keypoints_lib
from maskrcnn import model as model_lib
from maskrcnn import storage
from maskrcnn import weights as weights_lib
from maskrcnn.errors import UserError
from maskrcnn.model import build_model

FORMAT = "maskrcnn-ray-checkpoint"
FORMAT_VERSION = 1
FILENAME = "model.pt"
ZOO_ARCH = "maskrcnn_resnet50_fpn"  # what a bare weight name (COCO_V1) means without --arch
PLACEHOLDER = "N/A"  # torchvision's name for the unused COCO ids; never predicted or listed
COCO_CATEGORIES: list[str] = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # [0] is background
_REQUIRED = ("arch", "arch_kwargs", "classes", "category_ids", "state_dict", "step", "epoch", "metrics")


class CheckpointError(UserError):
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
    keypoints: keypoints_lib.KeypointSpec | None = None,
) -> dict[str, Any]:
    model = getattr(model, "module", model)  # unwrap DDP
    if model_lib.has_keypoints(arch) != (keypoints is not None):
        raise ValueError(f"{arch} checkpoints need keypoint names exactly when the model predicts keypoints")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "classes": list(classes),
        "category_ids": [int(c) for c in category_ids],
        "keypoints": keypoints.as_dict() if keypoints else None,
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
    """A project checkpoint from its bytes (what a job ships to its actors)."""
    return _checked(weights_lib.load_safely(data, source, CheckpointError), source)


def _checked(ckpt: Any, source: str) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a {FORMAT} file")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{source} has format_version {ckpt.get('format_version')}, expected {FORMAT_VERSION}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}")
    return ckpt


def load(source: str, arch: str | None = None) -> dict[str, Any]:
    """Any model a job takes (``--model``), as a project checkpoint:

    - a project checkpoint (``best.pt``), local or s3://;
    - a torchvision weight name: ``COCO_V1`` (of ``arch``, by default :data:`ZOO_ARCH`),
      ``MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1``; downloaded, or found in torch's cache;
    - a torchvision state dict or reference-script checkpoint (``.pth``), local or s3://.
      Its architecture comes from ``arch``, else from the file (the reference script's
      ``args.model``, or its layer names). 91 classes are COCO's, named from torchvision.
    """
    if not weights_lib.is_path(source):
        weights = weights_lib.torchvision_weights(source, arch or ZOO_ARCH)
        if weights is None:
            raise CheckpointError(
                f"unknown model {source!r}: not a file, nor a torchvision weight name like COCO_V1 "
                "or MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
            )
        return _from_torchvision(weights, source)
    obj = weights_lib.read(source, CheckpointError)
    if isinstance(obj, dict) and "format" in obj:
        ckpt = _checked(obj, source)
        if arch and arch != ckpt["arch"]:
            raise CheckpointError(f"{source} is a {ckpt['arch']} checkpoint, not --arch {arch}")
        return ckpt
    args = obj.get("args") if isinstance(obj, dict) else None
    try:
        state_dict = weights_lib.state_dict_of(obj, source)
    except weights_lib.WeightsError as err:
        raise CheckpointError(f"{source} is neither a {FORMAT} file nor a torchvision state dict") from err
    return _from_state_dict(state_dict, source, arch or getattr(args, "model", None))


def _from_torchvision(weights: Any, name: str) -> dict[str, Any]:
    arch = weights_lib.arch_of_weights(weights)
    if arch is None:
        raise CheckpointError(
            f"{name} are backbone weights, not a whole Mask R-CNN; pass them to jobs/train.py --weights"
        )
    print(f"[model] {name}: torchvision's weights from {weights.url} (or torch's cache)", flush=True)
    state_dict, path = weights_lib.torchvision_state_dict(weights, name, "--model", CheckpointError)
    return _from_state_dict(state_dict, path, arch, weights.meta["categories"])


def _from_state_dict(
    state_dict: dict[str, torch.Tensor], source: str, arch: str | None, categories: list[str] | None = None
) -> dict[str, Any]:
    """Wrap torchvision weights as a checkpoint, after checking that they fit ``arch``."""
    arch = arch if arch in model_lib.ARCHS else model_lib.guess_arch(state_dict)
    if arch is None:
        raise CheckpointError(
            f"cannot tell which architecture {source} is for; pass --arch ({', '.join(model_lib.ARCHS)})"
        )
    scores = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    if scores is None:
        raise CheckpointError(f"{source} is not a Mask R-CNN state dict: it has no roi_heads.box_predictor")
    num_classes = scores.shape[0]
    count = model_lib.num_keypoints_of(state_dict) if model_lib.has_keypoints(arch) else None
    if categories is None and num_classes == len(COCO_CATEGORIES):
        categories = COCO_CATEGORIES
    elif categories is None and count == len(keypoints_lib.COCO_PERSON) and num_classes == 2:
        categories = ["__background__", "person"]  # torchvision's Keypoint R-CNN file
    names = categories[1:] if categories else [f"class_{i}" for i in range(1, num_classes)]
    # torchvision's COCO models predict the COCO category id itself; "N/A" fills the gaps.
    kwargs = {"num_classes": num_classes, **model_lib.structure(state_dict, source)}
    if count:
        kwargs["num_keypoints"] = count
    model = build_model(arch, **kwargs)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise CheckpointError(f"{source} does not fit {arch}: {_mismatch(err)}; pass the right --arch") from err
    return make(
        model,
        arch=arch,
        arch_kwargs=kwargs,
        classes=names,
        category_ids=list(range(1, num_classes)),
        step=0,
        epoch=0,
        keypoints=keypoints_lib.unnamed(count) if count else None,
    )


def _mismatch(err: RuntimeError) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[1][:200] if len(lines) > 1 else lines[0][:200]


def keypoint_spec(ckpt: dict[str, Any]) -> keypoints_lib.KeypointSpec | None:
    """The keypoint names and skeleton of a checkpoint's model; None for a model without keypoints."""
    return keypoints_lib.KeypointSpec.from_dict(ckpt.get("keypoints"))


def categories(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    """The model's categories as COCO ``{"id", "name"}`` dicts, placeholders left out; a
    keypoint model's also carry its ``keypoints`` and ``skeleton``, as COCO's person does."""
    extra = ckpt["keypoints"] if ckpt.get("keypoints") else {}
    return [{"id": i, "name": n, **extra} for i, n in zip(ckpt["category_ids"], ckpt["classes"]) if n != PLACEHOLDER]


def categories_of(source: str, arch: str | None = None) -> list[dict[str, Any]]:
    """:func:`categories` of any ``--model``; a torchvision weight name needs no download."""
    weights = weights_lib.torchvision_weights(source, arch or ZOO_ARCH)
    if weights is not None and weights_lib.arch_of_weights(weights):
        names = weights.meta["categories"][1:]  # label i is COCO id i, as in _from_state_dict
        return categories({"classes": names, "category_ids": range(1, len(names) + 1)})
    return categories(load(source, arch))


def build(ckpt: dict[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild the checkpoint's model (its own ``arch``) with its weights, in eval mode.
    ``overrides`` are more :func:`~maskrcnn.model.build_model` arguments (``skip_resize``)."""
    model = build_model(ckpt["arch"], **ckpt["arch_kwargs"], **overrides)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def identity(ckpt: dict[str, Any]) -> str:
    """A short stable name for the weights: ``arch@step:<sha256 of the weights, 12 hex>``."""
    digest = hashlib.sha256()
    for name in sorted(ckpt["state_dict"]):
        digest.update(name.encode())
        digest.update(ckpt["state_dict"][name].numpy().tobytes())
    return f"{ckpt['arch']}@{ckpt['step']}:{digest.hexdigest()[:12]}"
