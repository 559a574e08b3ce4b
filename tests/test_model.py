import pytest
import torch

from maskrcnn import model as model_lib
from maskrcnn.checkpoint import init_model
from maskrcnn.model import ARCHS, SMALL, WeightsError, build_model


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


def test_weights_file_with_other_class_count_reinitialises_only_the_heads(tmp_path, bucket):
    source = build_model(SMALL, num_classes=7)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    for uri in (str(path), f"s3://{bucket}/weights/w.pth"):
        if uri.startswith("s3://"):
            from maskrcnn import storage

            storage.write_bytes(uri, path.read_bytes())
        m, kwargs = init_model(SMALL, {"num_classes": 3}, uri)
        assert kwargs == {"num_classes": 3, "pretrained": True}
        sd, src = m.state_dict(), source.state_dict()
        assert torch.equal(sd["backbone.fpn.layer_blocks.0.0.weight"], src["backbone.fpn.layer_blocks.0.0.weight"])
        assert _predictor_weight(m).shape[0] == 3  # head re-initialised for 3 classes


def test_torchvision_weight_name_without_internet_fails_with_a_one_line_hint(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    # The real download path runs until the network call, which is made to fail here so
    # the test means the same on a machine that does have the internet.
    import torchvision.models._api

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    for name in ("COCO_V1", "MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "ResNet50_Weights.IMAGENET1K_V1"):
        with pytest.raises(WeightsError) as err:
            init_model("maskrcnn_resnet50_fpn", {"num_classes": 3}, name)
        message = str(err.value)
        assert "\n" not in message and "download.pytorch.org" in message and "--weights" in message


def test_unknown_weights_and_foreign_state_dicts_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="unknown weights 'NOT_A_WEIGHT'"):
        init_model(SMALL, {"num_classes": 3}, "NOT_A_WEIGHT")
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "foreign.pth")
    with pytest.raises(WeightsError, match="no tensor .* matches"):
        init_model(SMALL, {"num_classes": 3}, str(tmp_path / "foreign.pth"))
    with pytest.raises(WeightsError, match="missing.pth"):
        init_model(SMALL, {"num_classes": 3}, str(tmp_path / "missing.pth"))
    assert model_lib.torchvision_weights("COCO_V1", SMALL) is None


def test_a_model_started_from_weights_rebuilds_from_its_arch_kwargs(tmp_path):
    """What resuming does: the stored arch_kwargs give back the same structure (frozen BN)."""
    torch.save(build_model(SMALL, num_classes=3).state_dict(), tmp_path / "w.pth")
    m, kwargs = init_model(SMALL, {"num_classes": 3, "min_size": 96}, str(tmp_path / "w.pth"))
    rebuilt = build_model(SMALL, skip_resize=True, **kwargs)
    rebuilt.load_state_dict(m.state_dict())  # strict: same keys and shapes
    assert type(rebuilt.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
