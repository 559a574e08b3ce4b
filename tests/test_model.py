import pytest
import torch

from maskrcnn.model import ARCHS, build_model


def _predictor_weight(m):
    return m.roi_heads.box_predictor.cls_score.weight


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_builds_and_predicts(arch):
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
