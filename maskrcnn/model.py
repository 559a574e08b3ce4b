"""Build torchvision Mask R-CNN variants by name, and initialise them from weights.

This is the one place a model is constructed. A model is fully described by its
architecture name plus the keyword arguments of :func:`build_model` (``arch_kwargs``),
which is what a checkpoint stores, so any checkpoint can rebuild its model offline.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch
from torch import nn
from torchvision.models import get_model_weights, get_weight
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from maskrcnn import storage

log = logging.getLogger(__name__)

SMALL = "maskrcnn_resnet18_fpn_small"
ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", SMALL)
_BACKBONE = {"maskrcnn_resnet50_fpn": "resnet50", "maskrcnn_resnet50_fpn_v2": "resnet50", SMALL: "resnet18"}
_DEFAULT_SIZES = {SMALL: (320, 512)}
# The small model's FPN width. At torchvision's 256 channels the FPN, RPN and RoI heads
# cost far more than the ResNet-18 body; 64 makes CPU training about twice as fast.
SMALL_FPN_CHANNELS = 64


class WeightsError(RuntimeError):
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


def inference_size(arch: str, min_size: int | tuple[int, ...] | None = None, max_size: int | None = None, **_: Any) -> tuple[int, int]:
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


def _download_error(name: str, weights: Any, err: Exception) -> WeightsError:
    return WeightsError(
        f"cannot download weights {name} from {weights.url} ({type(err).__name__}: {err}); "
        "where there is no internet, fetch that file elsewhere and pass its local path or "
        "s3:// URI to --weights"
    )


def _torchvision_weights(name: str, arch: str) -> Any | None:
    """Resolve ``Enum.VALUE`` or a bare value of ``arch``'s own weights; None if not a weight name."""
    try:
        if "." in name:
            return get_weight(name)
        if arch != SMALL:
            return get_model_weights(arch)[name]
    except (KeyError, ValueError, AttributeError):
        return None
    return None


def _is_uri(name: str) -> bool:
    return "/" in name or name.endswith((".pt", ".pth"))


def read_state_dict(uri: str) -> dict[str, Any]:
    """Read a ``.pth`` state dict or a project checkpoint, never executing pickled code."""
    try:
        obj = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except storage.StorageError as err:
        raise WeightsError(str(err)) from err
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise WeightsError(f"cannot load {uri}: {str(err).splitlines()[0]}") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]  # torchvision reference scripts' checkpoints
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise WeightsError(f"{uri} holds no state_dict")


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
    tv = None if _is_uri(weights) else _torchvision_weights(weights, arch)
    if tv is None and not _is_uri(weights):
        raise WeightsError(f"unknown weights {weights!r}: not a torchvision weight name nor a .pt/.pth path")
    if tv is not None and type(tv).__name__.startswith("ResNet"):
        try:
            return build_model(arch, backbone_weights=tv, skip_resize=skip_resize, **kwargs), kwargs
        except (OSError, RuntimeError) as err:
            raise _download_error(weights, tv, err) from err
    model = build_model(arch, skip_resize=skip_resize, **kwargs)
    if tv is not None:
        try:
            state_dict = tv.get_state_dict(progress=False)
        except (OSError, RuntimeError) as err:
            raise _download_error(weights, tv, err) from err
    else:
        state_dict = read_state_dict(weights)
    load_matching(model, state_dict, weights)
    return model, kwargs
