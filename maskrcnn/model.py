"""Build torchvision Mask R-CNN variants by name, and initialise them from weights.

This is the one place a model is constructed. A model is fully described by its
architecture name plus the keyword arguments of :func:`build_model` (``arch_kwargs``),
which is what a checkpoint stores, so any checkpoint can rebuild its model offline.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
from typing import Any

import torch
from torch import nn
from torchvision.models import get_model_weights, get_weight, resnet
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from maskrcnn import storage
from maskrcnn.errors import UserError

log = logging.getLogger(__name__)

SMALL = "maskrcnn_resnet18_fpn_small"
ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", SMALL)
_BACKBONE = {"maskrcnn_resnet50_fpn": "resnet50", "maskrcnn_resnet50_fpn_v2": "resnet50", SMALL: "resnet18"}
_DEFAULT_SIZES = {SMALL: (320, 512)}
# The small model's FPN width. At torchvision's 256 channels the FPN, RPN and RoI heads
# cost far more than the ResNet-18 body; 64 makes CPU training about twice as fast.
SMALL_FPN_CHANNELS = 64


class WeightsError(UserError):
    """Initial weights that cannot be found, downloaded or matched to the model."""


def _resnet(arch: str, pretrained: bool, backbone_weights: Any) -> resnet.ResNet:
    # torchvision's convention: frozen batch norm when starting from pretrained weights
    # (v2 keeps plain batch norm in its body, as torchvision's own builder does).
    frozen = pretrained and arch != "maskrcnn_resnet50_fpn_v2"
    builder = getattr(resnet, _BACKBONE[arch])
    return builder(weights=backbone_weights, norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d)


def _heads(arch: str, channels: int, num_classes: int) -> dict[str, Any]:
    if arch == "maskrcnn_resnet50_fpn":
        return {"num_classes": num_classes}
    if arch == "maskrcnn_resnet50_fpn_v2":
        anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        return {
            "num_classes": num_classes,
            "rpn_anchor_generator": anchors,
            "rpn_head": RPNHead(channels, 3, conv_depth=2),
            "box_head": FastRCNNConvFCHead((channels, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d),
            "mask_head": MaskRCNNHeads(channels, [256] * 4, 1, norm_layer=nn.BatchNorm2d),
        }
    # Small: smaller anchors for small images, thin heads, fewer sampled RoIs.
    return {
        "rpn_anchor_generator": AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5),
        "box_head": TwoMLPHead(channels * 7 * 7, 256),
        "box_predictor": FastRCNNPredictor(256, num_classes),
        "mask_head": MaskRCNNHeads(channels, [128, 128], 1),
        "mask_predictor": MaskRCNNPredictor(128, 128, num_classes),
        "rpn_pre_nms_top_n_train": 600,
        "rpn_post_nms_top_n_train": 300,
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 100,
        "rpn_batch_size_per_image": 128,
        "box_batch_size_per_image": 128,
    }


def build_model(
    arch: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    trainable_layers: int | None = None,
    min_size: int | tuple[int, ...] | None = None,
    max_size: int | None = None,
    backbone_weights: Any = None,
    skip_resize: bool = False,
) -> MaskRCNN:
    """Build ``arch`` for ``num_classes`` classes (background included).

    ``pretrained`` selects the structure used for fine-tuning (frozen batch norm, three
    trainable stages) without downloading anything; ``backbone_weights`` (a torchvision
    weights enum) is only passed when the backbone really is to be downloaded.
    ``skip_resize`` lets the data pipeline do multi-scale resizing in training, as
    torchvision's reference scripts do; evaluation still resizes to ``min_size``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must count background plus at least one class, got {num_classes}")
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    fpn_norm = nn.BatchNorm2d if arch == "maskrcnn_resnet50_fpn_v2" else None
    body = _resnet(arch, pretrained, backbone_weights)
    backbone = _resnet_fpn_extractor(body, trainable_layers, norm_layer=fpn_norm)
    if arch == SMALL:
        backbone.fpn = FeaturePyramidNetwork([64, 128, 256, 512], SMALL_FPN_CHANNELS, extra_blocks=LastLevelMaxPool())
        backbone.out_channels = SMALL_FPN_CHANNELS
    min_size, max_size = _sizes(arch, min_size, max_size)
    return MaskRCNN(
        backbone,
        min_size=min_size,
        max_size=max_size,
        _skip_resize=skip_resize,
        **_heads(arch, backbone.out_channels, num_classes),
    )


def inference_size(
    arch: str, min_size: int | tuple[int, ...] | None = None, max_size: int | None = None, **_: Any
) -> tuple[int, int]:
    """The shortest side and the longest-side cap that :func:`build_model`'s model resizes
    images to when predicting (the last of several training scales), from its ``arch_kwargs``."""
    min_size, max_size = _sizes(arch, min_size, max_size)
    return (min_size[-1] if isinstance(min_size, (tuple, list)) else min_size), max_size


def _sizes(arch: str, min_size: Any, max_size: int | None) -> tuple[Any, int]:
    """``min_size`` and ``max_size`` with the architecture's defaults filled in."""
    default_min, default_max = _DEFAULT_SIZES.get(arch, (800, 1333))
    return min_size or default_min, max_size or default_max


def load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load every tensor whose name and shape match; return the names left as initialised.

    A class-count mismatch leaves the box and mask predictors re-initialised, which is how
    COCO weights are fine-tuned on new classes.
    """
    own = model.state_dict()
    matched = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise WeightsError(f"no tensor in {source} matches the model; is it for another architecture?")
    model.load_state_dict(matched, strict=False)
    left = sorted(k for k in own if k not in matched and not k.endswith("num_batches_tracked"))
    log.info("loaded %d tensors from %s; %d left initialised", len(matched), source, len(left))
    return left


def download_error(name: str, weights: Any, err: Exception, flag: str) -> WeightsError:
    """The offline error: names the URL and says what to pass instead."""
    return WeightsError(
        f"cannot download weights {name} from {weights.url} ({type(err).__name__}: {err}); "
        f"where there is no internet, fetch that file elsewhere and pass its local path or "
        f"s3:// URI to {flag} (or put it in $TORCH_HOME/hub/checkpoints/)"
    )


def torchvision_weights(name: str, arch: str) -> Any | None:
    """Resolve ``Enum.VALUE`` or a bare value of ``arch``'s own weights; None if not a weight name."""
    try:
        if "." in name:
            return get_weight(name)
        if arch != SMALL:
            return get_model_weights(arch)[name]
    except (KeyError, ValueError, AttributeError):
        return None
    return None


def arch_of_weights(weights: Any) -> str | None:
    """The architecture whose torchvision weights these are; None for backbone weights."""
    return next((a for a in ARCHS if a != SMALL and get_model_weights(a) is type(weights)), None)


def is_path(name: str) -> bool:
    """A file name (local or s3://), as opposed to a torchvision weight name."""
    return "/" in name or name.endswith((".pt", ".pth")) or os.path.exists(name)


def read_state_dict(uri: str) -> dict[str, Any]:
    """Read a ``.pth`` state dict or a project checkpoint, never executing pickled code."""
    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as err:
        raise WeightsError(str(err)) from err
    return state_dict_of(load_safely(data, uri, WeightsError), uri)


def load_safely(data: bytes, source: str, error: type[Exception]) -> Any:
    """``torch.load`` with ``weights_only`` (no pickled code runs), also for torchvision's
    reference-script checkpoints, which hold their ``argparse.Namespace`` of arguments."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"refusing to load {source}: {first}") from err


def state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The weights in a loaded file: a project checkpoint, a reference-script checkpoint
    (``model``) or a bare state dict; a DDP ``module.`` prefix is dropped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # torchvision reference scripts' checkpoints
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise WeightsError(f"{source} holds no state_dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def guess_arch(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Which of :data:`ARCHS` a state dict is for, from its layer names; None if none fits."""
    if "roi_heads.box_head.0.0.weight" in state_dict:
        return "maskrcnn_resnet50_fpn_v2"
    if "roi_heads.box_head.fc6.weight" not in state_dict:
        return None
    if "backbone.body.layer1.0.conv3.weight" in state_dict:
        return "maskrcnn_resnet50_fpn"
    fpn = state_dict.get("backbone.fpn.inner_blocks.0.0.weight")
    return SMALL if fpn is not None and fpn.shape[0] == SMALL_FPN_CHANNELS else None


def init_model(
    arch: str, arch_kwargs: dict[str, Any], weights: str | None = None, *, skip_resize: bool = False
) -> tuple[MaskRCNN, dict]:
    """Build a model and load initial weights; return it with the ``arch_kwargs`` to store.

    ``arch_kwargs`` are :func:`build_model`'s keyword arguments, ``num_classes`` included.
    ``weights`` is a torchvision weight name (``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``,
    ``COCO_V1``, ``ResNet50_Weights.IMAGENET1K_V1``), a ``.pth``/checkpoint path or s3://
    URI, or None for random initialisation.
    """
    kwargs = dict(arch_kwargs, pretrained=weights is not None)
    if weights is None:
        return build_model(arch, skip_resize=skip_resize, **kwargs), kwargs
    tv = None if is_path(weights) else torchvision_weights(weights, arch)
    if tv is None and not is_path(weights):
        raise WeightsError(f"unknown weights {weights!r}: not a torchvision weight name nor a .pt/.pth path")
    if tv is not None and type(tv).__name__.startswith("ResNet"):
        try:
            return build_model(arch, backbone_weights=tv, skip_resize=skip_resize, **kwargs), kwargs
        except (OSError, RuntimeError) as err:
            raise download_error(weights, tv, err, "--weights") from err
    model = build_model(arch, skip_resize=skip_resize, **kwargs)
    if tv is not None:
        try:
            state_dict = tv.get_state_dict(progress=False)
        except (OSError, RuntimeError) as err:
            raise download_error(weights, tv, err, "--weights") from err
    else:
        state_dict = read_state_dict(weights)
    load_matching(model, state_dict, weights)
    return model, kwargs
