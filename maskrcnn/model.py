"""Build torchvision Mask R-CNN variants by name, and load tensors into them: the third
layer of loading a model (see :mod:`maskrcnn.weights` for the first two).

This is the one place a model is constructed. A model is fully described by its
architecture name plus the keyword arguments of :func:`build_model` (``arch_kwargs``),
which is what a checkpoint stores, so any checkpoint can rebuild its model offline.
Training's ``--weights`` start here too: :func:`initial_weights` reads them,
:func:`init_model` builds the model they fit.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from maskrcnn import weights as weights_lib
from maskrcnn.weights import WeightsError

log = logging.getLogger(__name__)

SMALL = "maskrcnn_resnet18_fpn_small"
# Person keypoints: torchvision's Keypoint R-CNN, and the paper's Table 4 model with a mask
# head and a keypoint head in one RoI head set; each in R50-FPN and the small CPU size.
KEYPOINT_ARCHS = (
    "keypointrcnn_resnet50_fpn",
    "keypointrcnn_resnet18_fpn_small",
    "maskrcnn_keypoint_resnet50_fpn",
    "maskrcnn_keypoint_resnet18_fpn_small",
)
ARCHS = ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2", SMALL, *KEYPOINT_ARCHS)  # what --arch offers
# The small model's FPN width. At torchvision's 256 channels the FPN, RPN and RoI heads
# cost far more than the ResNet-18 body; 64 makes CPU training about twice as fast.
SMALL_FPN_CHANNELS = 64


def _resnet(arch: str, pretrained: bool, backbone_state_dict: dict[str, torch.Tensor] | None) -> resnet.ResNet:
    # torchvision's convention: frozen batch norm when starting from pretrained weights
    # (v2 keeps plain batch norm in its body, as torchvision's own builder does).
    frozen = pretrained and arch != "maskrcnn_resnet50_fpn_v2"
    builder = resnet.resnet18 if is_small(arch) else resnet.resnet50
    body = builder(weights=None, norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d)
    if backbone_state_dict is not None:
        body.load_state_dict(backbone_state_dict)  # what torchvision's builder does with its weights
    return body


def is_small(arch: str) -> bool:
    return arch.endswith("_small")


def has_masks(arch: str) -> bool:
    return not arch.startswith("keypointrcnn")


def has_keypoints(arch: str) -> bool:
    return arch in KEYPOINT_ARCHS


def iou_types(arch: str) -> tuple[str, ...]:
    """What a model of ``arch`` is scored on (COCO's IoU types): boxes, then masks and keypoints where it has them."""
    return ("bbox",) + (("segm",) if has_masks(arch) else ()) + (("keypoints",) if has_keypoints(arch) else ())


def _heads(arch: str, channels: int, num_classes: int) -> dict[str, Any]:
    if not is_small(arch) and arch != "maskrcnn_resnet50_fpn_v2":
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
    num_keypoints: int | None = None,
    pretrained: bool = False,
    trainable_layers: int | None = None,
    min_size: int | tuple[int, ...] | None = None,
    max_size: int | None = None,
    backbone_state_dict: dict[str, torch.Tensor] | None = None,
    skip_resize: bool = False,
    frozen_bn_eps: float | None = None,
) -> MaskRCNN:
    """Build ``arch`` for ``num_classes`` classes (background included).

    ``pretrained`` selects the structure used for fine-tuning (frozen batch norm, three
    trainable stages) without downloading anything; ``backbone_state_dict`` holds ImageNet
    weights of the ResNet body (read by :mod:`maskrcnn.weights`, as every weights file is).
    ``skip_resize`` lets the data pipeline do multi-scale resizing in training, as
    torchvision's reference scripts do; evaluation still resizes to ``min_size``.
    ``frozen_bn_eps`` overrides the frozen batch norms' eps (see :data:`maskrcnn.weights.LEGACY_EPS_FILES`).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must count background plus at least one class, got {num_classes}")
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    fpn_norm = nn.BatchNorm2d if arch == "maskrcnn_resnet50_fpn_v2" else None
    body = _resnet(arch, pretrained, backbone_state_dict)
    backbone = _resnet_fpn_extractor(body, trainable_layers, norm_layer=fpn_norm)
    if is_small(arch):
        backbone.fpn = FeaturePyramidNetwork([64, 128, 256, 512], SMALL_FPN_CHANNELS, extra_blocks=LastLevelMaxPool())
        backbone.out_channels = SMALL_FPN_CHANNELS
    min_size, max_size = _sizes(arch, min_size, max_size)
    heads = _heads(arch, backbone.out_channels, num_classes)
    if not has_masks(arch):
        heads = {k: v for k, v in heads.items() if not k.startswith("mask_")}
    detector = MaskRCNN if has_masks(arch) else FasterRCNN
    model = detector(backbone, min_size=min_size, max_size=max_size, _skip_resize=skip_resize, **heads)
    if has_keypoints(arch):
        _add_keypoint_head(model.roi_heads, backbone.out_channels, num_keypoints or 17, is_small(arch))
    if frozen_bn_eps is not None:
        overwrite_eps(model, frozen_bn_eps)
    return model


def _add_keypoint_head(heads: RoIHeads, channels: int, num_keypoints: int, small: bool) -> None:
    """torchvision's Keypoint R-CNN head (as ``KeypointRCNN`` builds it, so its COCO weights
    load by name), or a thinner one for the small model, beside whatever heads are there."""
    width, depth = (128, 4) if small else (512, 8)
    heads.keypoint_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=2)
    heads.keypoint_head = KeypointRCNNHeads(channels, (width,) * depth)
    heads.keypoint_predictor = KeypointRCNNPredictor(width, num_keypoints)


def structure(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The :func:`build_model` arguments a torchvision state dict implies: frozen batch norm
    (``pretrained``) when it has no ``num_batches_tracked``, and eps 0 for the COCO_V1 file."""
    pretrained = "backbone.body.bn1.num_batches_tracked" not in state_dict
    legacy = pretrained and source.replace("\\", "/").rsplit("/", 1)[-1] in weights_lib.LEGACY_EPS_FILES
    return {"pretrained": pretrained, **({"frozen_bn_eps": 0.0} if legacy else {})}


def inference_size(
    arch: str, min_size: int | tuple[int, ...] | None = None, max_size: int | None = None, **_: Any
) -> tuple[int, int]:
    """The shortest side and the longest-side cap that :func:`build_model`'s model resizes
    images to when predicting (the last of several training scales), from its ``arch_kwargs``."""
    min_size, max_size = _sizes(arch, min_size, max_size)
    return (min_size[-1] if isinstance(min_size, (tuple, list)) else min_size), max_size


def default_sizes(arch: str) -> tuple[tuple[int, ...], int]:
    """The training shortest sides and longest-side cap of ``arch`` (torchvision's recipe for
    R50); the largest shortest side is the one it predicts at."""
    if is_small(arch):
        return (256, 288, 320), 512
    return (640, 672, 704, 736, 768, 800), 1333


def _sizes(arch: str, min_size: Any, max_size: int | None) -> tuple[Any, int]:
    """``min_size`` and ``max_size`` with the architecture's defaults filled in."""
    scales, default_max = default_sizes(arch)
    return min_size or scales[-1], max_size or default_max


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


def guess_arch(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Which of :data:`ARCHS` a state dict is for, from its layer names; None if none fits."""
    if "roi_heads.box_head.0.0.weight" in state_dict:
        return "maskrcnn_resnet50_fpn_v2"
    if "roi_heads.box_head.fc6.weight" not in state_dict:
        return None
    masks, points = "roi_heads.mask_head.0.0.weight" in state_dict, num_keypoints_of(state_dict) is not None
    family = ("maskrcnn_keypoint" if masks else "keypointrcnn") if points else "maskrcnn"
    if "backbone.body.layer1.0.conv3.weight" in state_dict:
        return family + "_resnet50_fpn"
    fpn = state_dict.get("backbone.fpn.inner_blocks.0.0.weight")
    return family + "_resnet18_fpn_small" if fpn is not None and fpn.shape[0] == SMALL_FPN_CHANNELS else None


def num_keypoints_of(state_dict: dict[str, torch.Tensor]) -> int | None:
    """How many keypoints a state dict's keypoint head predicts; None without one."""
    weight = state_dict.get("roi_heads.keypoint_predictor.kps_score_lowres.weight")
    return None if weight is None else int(weight.shape[1])  # ConvTranspose2d: (in, out, k, k)


# ---------------------------------------------------------------- training's initial weights


def initial_weights(weights: str, arch: str) -> list[tuple[dict[str, torch.Tensor], str]]:
    """Each ``--weights`` source's tensors (downloaded or read, never unpickling code) and where
    they came from. The driver calls it before any worker starts, so a bad source fails in one line."""
    return [weights_lib.read_state_dict(source, arch) for source in _sources(weights, arch)]


def init_model(
    arch: str,
    arch_kwargs: dict[str, Any],
    weights: str | None = None,
    *,
    skip_resize: bool = False,
    loaded: list[tuple[dict[str, torch.Tensor], str]] | None = None,
) -> tuple[nn.Module, dict]:
    """Build a model and load initial weights; return it with the ``arch_kwargs`` to store.

    ``arch_kwargs`` are :func:`build_model`'s keyword arguments, ``num_classes`` included.
    ``weights`` is a torchvision weight name (``MaskRCNN_ResNet50_FPN_Weights.COCO_V1``,
    ``COCO_V1``, ``ResNet50_Weights.IMAGENET1K_V1``), a ``.pth``/checkpoint path or s3://
    URI, or None for random initialisation. Tensors load where name and shape match, so
    COCO weights fine-tune on other classes. The joint mask + keypoint model takes two,
    ``MASK,KEYPOINT`` (see :func:`_sources`). ``loaded`` is what :func:`initial_weights`
    read of them already (training's driver reads them once for all its workers).
    """
    kwargs = dict(arch_kwargs, pretrained=weights is not None)
    if weights is None:
        return build_model(arch, skip_resize=skip_resize, **kwargs), kwargs
    loaded, sources = loaded or initial_weights(weights, arch), _sources(weights, arch)
    if weights_lib.is_backbone(weights_lib.torchvision_weights(sources[0], arch)):
        return build_model(arch, backbone_state_dict=loaded[0][0], skip_resize=skip_resize, **kwargs), kwargs
    if "frozen_bn_eps" in structure(*loaded[0]):
        kwargs["frozen_bn_eps"] = 0.0  # torchvision's COCO_V1, fine-tuned as its builder does
    model = build_model(arch, skip_resize=skip_resize, **kwargs)
    load_matching(model, loaded[0][0], sources[0])
    if len(loaded) > 1:  # only the keypoint head comes from the keypoint weights
        head = {k: v for k, v in loaded[1][0].items() if k.startswith("roi_heads.keypoint_")}
        load_matching(model, head, sources[1])
    return model, kwargs


def _sources(weights: str, arch: str) -> list[str]:
    """The joint model's initial weights, as the paper's Table 4 starts it: Mask R-CNN's for the
    backbone, box and mask heads, then Keypoint R-CNN's for the keypoint head. ``COCO_V1``
    means torchvision's two COCO_V1s; otherwise ``MASK,KEYPOINT`` (names or files) or one.
    Every other architecture has one source."""
    if not (has_masks(arch) and has_keypoints(arch)):
        return [weights]
    if weights == "COCO_V1":
        return ["MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "KeypointRCNN_ResNet50_FPN_Weights.COCO_V1"]
    return [w.strip() for w in weights.split(",") if w.strip()][:2]
