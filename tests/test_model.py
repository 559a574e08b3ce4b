import pytest
import torch

from maskrcnn import checkpoint
from maskrcnn import weights as weights_lib
from maskrcnn.model import ARCHS, KEYPOINT_ARCHS, SMALL, build_model, init_model, initial_weights
from maskrcnn.weights import WeightsError


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
    from maskrcnn.model import default_sizes, inference_size

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


# ---------------------------------------------------------------- training's initial weights (--weights)


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
        assert m.roi_heads.box_predictor.cls_score.weight.shape[0] == 3  # head re-initialised for 3 classes


def test_torchvision_weight_name_without_internet_fails_with_a_one_line_hint(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    # The real download path runs until the network call, which is made to fail here so
    # the test means the same on a machine that does have the internet.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
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


def test_a_model_started_from_weights_rebuilds_from_its_arch_kwargs(tmp_path):
    """What resuming does: the stored arch_kwargs give back the same structure (frozen BN)."""
    torch.save(build_model(SMALL, num_classes=3).state_dict(), tmp_path / "w.pth")
    m, kwargs = init_model(SMALL, {"num_classes": 3, "min_size": 96}, str(tmp_path / "w.pth"))
    rebuilt = build_model(SMALL, skip_resize=True, **kwargs)
    rebuilt.load_state_dict(m.state_dict())  # strict: same keys and shapes
    assert type(rebuilt.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"


def test_torchvisions_coco_v1_file_gets_frozen_batch_norm_eps_zero_as_its_builder_gives_it(tmp_path):
    """torchvision's builder sets eps 0 when it loads COCO_V1 (pytorch/vision#2933); without it
    every activation after a frozen batch norm is scaled a little differently."""
    from torchvision.ops import FrozenBatchNorm2d

    def eps(model):
        return {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}

    # COCO_V1's structure (frozen batch norm, 91 classes), random weights
    state_dict = build_model("maskrcnn_resnet50_fpn", 91, pretrained=True).state_dict()
    for name, expected in ((weights_lib.LEGACY_EPS_FILES[0], {0.0}), ("my_maskrcnn.pth", {1e-5})):
        torch.save(state_dict, tmp_path / name)
        ckpt = checkpoint.load(str(tmp_path / name))
        assert eps(checkpoint.build(ckpt)) == expected, name
        model, kwargs = init_model("maskrcnn_resnet50_fpn", {"num_classes": 3}, str(tmp_path / name))
        assert eps(model) == expected and eps(build_model("maskrcnn_resnet50_fpn", **kwargs)) == expected


def test_the_joint_model_starts_from_mask_weights_and_a_keypoint_head(tmp_path):
    """Table 4's initialisation: Mask R-CNN's COCO tensors for the backbone, box and mask heads,
    Keypoint R-CNN's for the keypoint head (files here; COCO_V1 names both when online)."""
    from torchvision.models.detection import keypointrcnn_resnet50_fpn, maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    mask = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    keypoint = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    torch.save(mask, tmp_path / "mask.pth")
    torch.save(keypoint, tmp_path / "keypoint.pth")
    sources = f"{tmp_path / 'mask.pth'},{tmp_path / 'keypoint.pth'}"
    arch = "maskrcnn_keypoint_resnet50_fpn"
    model, kwargs = init_model(arch, {"num_classes": 2, "num_keypoints": 17}, sources)
    got = model.state_dict()
    for name in (
        "backbone.body.layer1.0.conv1.weight",
        "roi_heads.box_head.fc6.weight",
        "roi_heads.mask_head.0.0.weight",
    ):
        assert torch.equal(got[name], mask[name]), name
    for name in ("roi_heads.keypoint_head.0.weight", "roi_heads.keypoint_predictor.kps_score_lowres.weight"):
        assert torch.equal(got[name], keypoint[name]), name
    assert not torch.equal(got["backbone.body.layer1.0.conv1.weight"], keypoint["backbone.body.layer1.0.conv1.weight"])
    assert kwargs == {"num_classes": 2, "num_keypoints": 17, "pretrained": True}
    with pytest.raises(WeightsError, match="unknown weights 'NOPE'"):
        init_model(arch, {"num_classes": 2}, "NOPE")


def test_weights_read_once_build_the_same_model_without_reading_again(tmp_path):
    """Training's driver reads --weights once (initial_weights) and its workers build from those
    tensors: the file may be gone by then."""
    source = build_model(SMALL, num_classes=4)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = initial_weights(str(tmp_path / "w.pth"), SMALL)
    (tmp_path / "w.pth").unlink()
    model, kwargs = init_model(SMALL, {"num_classes": 4}, str(tmp_path / "w.pth"), loaded=loaded)
    assert kwargs["pretrained"] and torch.equal(
        model.state_dict()["rpn.head.conv.0.0.weight"], source.state_dict()["rpn.head.conv.0.0.weight"]
    )
