import pytest
import torch

from maskrcnn.model import ARCHS, KEYPOINT_ARCHS, build_model


def _predictor_weight(m):
    return m.roi_heads.box_predictor.cls_score.weight


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in KEYPOINT_ARCHS])
def test_every_mask_architecture_builds_and_predicts(arch):
    m = build_model(arch, num_classes=4, min_size=96, max_size=128).eval()
    with torch.no_grad():
        out = m([torch.rand(3, 80, 120)])[0]
    assert set(out) == {"boxes", "labels", "scores", "masks"}
    assert _predictor_weight(m).shape[0] == 4


def test_pretrained_structure_freezes_batch_norm_and_early_stages():
    m = build_model("maskrcnn_resnet50_fpn", 3, pretrained=True)
    assert type(m.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
    assert not any(p.requires_grad for p in m.backbone.body.layer1.parameters())
    assert all(p.requires_grad for p in m.backbone.body.layer4.parameters())


def test_default_sizes_are_declared_once_and_predict_at_the_largest_training_scale():
    from maskrcnn.model import SMALL, default_sizes, inference_size

    assert default_sizes(SMALL) == ((256, 288, 320), 512) and inference_size(SMALL) == (320, 512)
    scales, max_size = default_sizes("maskrcnn_resnet50_fpn")
    assert inference_size("maskrcnn_resnet50_fpn") == (scales[-1], max_size) == (800, 1333)
    assert build_model(SMALL, num_classes=2).transform.min_size == (320,)


@pytest.mark.parametrize("arch", KEYPOINT_ARCHS)
def test_keypoint_architectures_build_and_predict_keypoints(arch):
    m = build_model(arch, num_classes=2, num_keypoints=5, min_size=96, max_size=128).eval()
    with torch.no_grad():
        out = m([torch.rand(3, 80, 120)])[0]
    assert {"boxes", "labels", "scores", "keypoints", "keypoints_scores"} <= set(out)
    assert out["keypoints"].shape[1:] == (5, 3)
    assert ("masks" in out) == arch.startswith("maskrcnn_keypoint")


def test_torchvisions_keypoint_and_mask_weights_fit_by_name():
    """Keypoint R-CNN's state dict loads into keypointrcnn_resnet50_fpn as it is; the joint
    model is exactly Mask R-CNN's tensors plus Keypoint R-CNN's keypoint head (Table 4's init)."""
    from torchvision.models.detection import keypointrcnn_resnet50_fpn, maskrcnn_resnet50_fpn

    keypoint = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    build_model("keypointrcnn_resnet50_fpn", 2, num_keypoints=17).load_state_dict(keypoint)  # strict
    mask = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2).state_dict()
    head = {k: v for k, v in keypoint.items() if k.startswith("roi_heads.keypoint_")}
    build_model("maskrcnn_keypoint_resnet50_fpn", 2, num_keypoints=17).load_state_dict({**mask, **head})  # strict


def test_the_architecture_and_keypoint_count_are_read_back_from_the_layers():
    from maskrcnn.model import guess_arch, num_keypoints_of

    for arch in ARCHS:
        state_dict = build_model(arch, 2, num_keypoints=7).state_dict()
        assert guess_arch(state_dict) == arch
        assert num_keypoints_of(state_dict) == (7 if arch in KEYPOINT_ARCHS else None)
