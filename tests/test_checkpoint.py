import os
import pickle

import pytest
import torch
import torchvision

from maskrcnn import checkpoint
from maskrcnn import model as model_lib
from maskrcnn.checkpoint import init_model
from maskrcnn.model import SMALL, WeightsError, build_model
from tests.helpers import OFFLINE, TOOTHBRUSH, small_checkpoint


def _checkpoint():
    return small_checkpoint(
        min_size=96,
        max_size=128,
        classes=("a", "b"),
        category_ids=(3, 17),
        seed=0,
        step=42,
        epoch=2,
        metrics={"val_segm_AP": 0.5},
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_roundtrip_rebuilds_the_same_model(where, tmp_path, request):
    uri = (
        str(tmp_path / "ck" / "model.pt")
        if where == "local"
        else f"s3://{request.getfixturevalue('bucket')}/runs/model.pt"
    )
    m, ck = _checkpoint()
    checkpoint.save(uri, ck)
    loaded = checkpoint.load(uri)
    assert (loaded["arch"], loaded["step"], loaded["epoch"], loaded["category_ids"]) == (SMALL, 42, 2, [3, 17])
    assert loaded["metrics"] == {"val_segm_AP": 0.5} and loaded["format_version"] == checkpoint.FORMAT_VERSION
    rebuilt = checkpoint.build(loaded)
    image = [torch.rand(3, 90, 110)]
    with torch.no_grad():
        a, b = m.eval()(image)[0], rebuilt(image)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    assert checkpoint.identity(loaded) == checkpoint.identity(ck)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_file_with_pickled_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": _Exploit()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load .*evil.pt"):
        checkpoint.load(str(path))
    assert not (tmp_path / "pwned").exists()


def test_other_files_are_refused_with_the_reason(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(
        checkpoint.CheckpointError, match="neither a maskrcnn-ray-checkpoint file nor a torchvision state dict"
    ):
        checkpoint.load(str(tmp_path / "plain.pt"))
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2]) + b"junk")
    with pytest.raises(checkpoint.CheckpointError, match="junk.pt"):
        checkpoint.load(str(tmp_path / "junk.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="missing.pt"):
        checkpoint.load(str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------- every --model form


def test_a_torchvision_state_dict_loads_with_coco_names_and_real_ids(torchvision_pth):
    ckpt = checkpoint.load(torchvision_pth)
    assert ckpt["arch"] == "maskrcnn_resnet50_fpn"  # told by its layer names
    assert (ckpt["classes"][0], ckpt["category_ids"][0]) == ("person", 1)
    assert (ckpt["classes"][TOOTHBRUSH - 1], ckpt["category_ids"][TOOTHBRUSH - 1]) == ("toothbrush", TOOTHBRUSH)
    categories = checkpoint.categories(ckpt)
    assert len(categories) == 80 and all(c["name"] != "N/A" for c in categories)
    assert categories == checkpoint.categories_of("COCO_V1")  # from torchvision's metadata, no download
    reloaded = checkpoint.from_bytes(checkpoint.to_bytes(ckpt), "bytes")
    assert checkpoint.identity(reloaded) == checkpoint.identity(ckpt) and reloaded["step"] == 0


def test_a_reference_script_checkpoint_names_its_architecture(torchvision_pth, tmp_path):
    """torchvision's references/detection/train.py saves model, optimizer, epoch and its
    argparse arguments; DDP runs prefix every weight with ``module.``."""
    import argparse

    state = torch.load(torchvision_pth, weights_only=True)
    path = tmp_path / "model_25.pth"
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in state.items()},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 25,
            "args": argparse.Namespace(model="maskrcnn_resnet50_fpn", lr=0.02),
        },
        path,
    )
    ckpt = checkpoint.load(str(path))
    assert ckpt["arch"] == "maskrcnn_resnet50_fpn" and len(ckpt["classes"]) == 90
    assert (
        checkpoint.identity(ckpt).split(":")[1] == checkpoint.identity(checkpoint.load(torchvision_pth)).split(":")[1]
    )


def test_a_state_dict_of_another_shape_asks_for_the_right_arch(torchvision_pth, tmp_path):
    with pytest.raises(
        checkpoint.CheckpointError, match=r"does not fit maskrcnn_resnet50_fpn_v2: .*pass the right --arch"
    ):
        checkpoint.load(torchvision_pth, arch="maskrcnn_resnet50_fpn_v2")
    torch.save({"roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 8)}, tmp_path / "odd.pth")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"cannot tell which architecture .*odd.pth is for; pass --arch"
    ):
        checkpoint.load(str(tmp_path / "odd.pth"))


def test_a_small_state_dict_is_recognised_and_gets_generic_class_names(tmp_path):
    m, _ = _checkpoint()
    torch.save(m.state_dict(), tmp_path / "small.pth")
    ckpt = checkpoint.load(str(tmp_path / "small.pth"))
    assert ckpt["arch"] == SMALL and ckpt["classes"] == ["class_1", "class_2"] and ckpt["category_ids"] == [1, 2]


@pytest.mark.parametrize(
    "name, url",
    [
        ("COCO_V1", "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"),
        (
            "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
            "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
        ),
    ],
)
def test_offline_a_weight_name_fails_naming_the_url(name, url, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(name)
    assert f"cannot download weights {name} from {url}" in str(err.value)
    assert "pass its local path or s3:// URI to --model" in str(err.value)


def test_names_that_are_not_whole_models_are_refused():
    with pytest.raises(checkpoint.CheckpointError, match="ResNet50_Weights.IMAGENET1K_V1 are backbone weights"):
        checkpoint.load("ResNet50_Weights.IMAGENET1K_V1")
    with pytest.raises(checkpoint.CheckpointError, match="unknown model 'COCO_V9'"):
        checkpoint.load("COCO_V9")


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
    assert model_lib.torchvision_weights("COCO_V1", SMALL) is None


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
    for name, expected in ((model_lib.LEGACY_EPS_FILES[0], {0.0}), ("my_maskrcnn.pth", {1e-5})):
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


def test_torchvisions_keypoint_rcnn_file_is_a_model_with_cocos_persons_and_skeleton(tmp_path):
    """Keypoint R-CNN's COCO_V1 file (its structure, random weights) as --model: the arch from
    its layers, "person", COCO's 17 keypoint names and skeleton, and eps 0 by its published name."""
    from torchvision.ops import FrozenBatchNorm2d

    from maskrcnn.keypoints import COCO_PERSON

    path = tmp_path / model_lib.LEGACY_EPS_FILES[1]  # torchvision's keys (test_model checks), frozen batch norm
    torch.save(build_model("keypointrcnn_resnet50_fpn", 2, num_keypoints=17, pretrained=True).state_dict(), path)
    ckpt = checkpoint.load(str(path))
    assert ckpt["arch"] == "keypointrcnn_resnet50_fpn" and ckpt["classes"] == ["person"]
    assert ckpt["arch_kwargs"]["num_keypoints"] == 17 and checkpoint.keypoint_spec(ckpt) == COCO_PERSON
    assert {m.eps for m in checkpoint.build(ckpt).modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    with pytest.raises(ValueError, match="need keypoint names exactly when the model predicts keypoints"):
        fields = {"arch_kwargs": {}, "classes": ["a"], "category_ids": [1], "step": 0, "epoch": 0}
        checkpoint.make(build_model(SMALL, num_classes=2), arch="keypointrcnn_resnet18_fpn_small", **fields)


# ---------------------------------------------------------------- torch's cache is read like any other file


class _Marker:
    """Pickled code that would leave a file behind if it ever ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.mark.parametrize(
    "job, args",
    [
        ("segment_bucket.py", ["--model", "COCO_V1", "--input", "{photos}", "--output", "{tmp}/out"]),
        ("predict.py", ["--model", "COCO_V1", "--input", "{photos}", "--output", "{tmp}/out"]),
        ("evaluate.py", ["--model", "COCO_V1", "--annotations", "{gt}", "--images", "{images}"]),
        ("train.py", ["--weights", "COCO_V1", "--arch", "maskrcnn_resnet50_fpn"]),
        ("train.py", ["--weights", "ResNet50_Weights.IMAGENET1K_V1", "--arch", "maskrcnn_resnet50_fpn"]),
        ("train.py", ["--weights", "COCO_V1", "--arch", "maskrcnn_keypoint_resnet50_fpn"]),
    ],
    ids=["segment", "predict", "evaluate", "train-coco", "train-imagenet", "train-joint"],
)
def test_a_malicious_file_in_torchs_cache_is_refused_and_never_runs(job, args, tmp_path, monkeypatch, coco_small):
    """Where the offline error tells users to put a download, a pickle that runs code: every
    job refuses it in one line naming the file, and the payload never runs."""
    from tests.helpers import call_job

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    for name in (*model_lib.LEGACY_EPS_FILES, "resnet50-0676ba61.pth"):  # the published file names
        torch.save({"model": _Marker(marker)}, cache / name)
    for key, value in {**OFFLINE, "TORCH_HOME": str(tmp_path / "torch")}.items():
        monkeypatch.setenv(key, value)
    gt, images = coco_small
    if job == "train.py":
        args = [*args, "--train-annotations", gt, "--train-images", images, "--storage", "{tmp}/runs", "--name", "r"]
    fill = {"photos": os.path.dirname(images), "tmp": str(tmp_path), "gt": gt, "images": images}
    result = call_job(job, *[a.format(**fill) for a in args])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"refusing to load {cache}/" in lines[0] and "Weights only load failed" in lines[0]
    assert not marker.exists()


def test_a_weight_name_found_in_torchs_cache_loads_offline(tmp_path, monkeypatch):
    """The same file route with real tensors (torchvision's COCO_V1 structure, random weights):
    it loads by name with no internet, with COCO's classes and eps 0."""
    from torchvision.ops import FrozenBatchNorm2d

    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(
        build_model("maskrcnn_resnet50_fpn", 91, pretrained=True).state_dict(), cache / model_lib.LEGACY_EPS_FILES[0]
    )
    torch.save(torchvision.models.resnet50().state_dict(), cache / "resnet50-0676ba61.pth")
    for key, value in {**OFFLINE, "TORCH_HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    ckpt = checkpoint.load("COCO_V1")
    assert ckpt["classes"][0] == "person" and ckpt["arch_kwargs"]["frozen_bn_eps"] == 0.0
    assert {m.eps for m in checkpoint.build(ckpt).modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    model, _ = init_model("maskrcnn_resnet50_fpn", {"num_classes": 3}, "ResNet50_Weights.IMAGENET1K_V1")
    body = torch.load(cache / "resnet50-0676ba61.pth", weights_only=True)
    assert torch.equal(model.backbone.body.layer4[0].conv1.weight, body["layer4.0.conv1.weight"])


def test_weights_read_once_build_the_same_model_without_reading_again(tmp_path):
    """Training's driver reads --weights once (initial_weights) and its workers build from those
    tensors: the file may be gone by then."""
    source = build_model(SMALL, num_classes=4)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = checkpoint.initial_weights(str(tmp_path / "w.pth"), SMALL)
    (tmp_path / "w.pth").unlink()
    model, kwargs = init_model(SMALL, {"num_classes": 4}, str(tmp_path / "w.pth"), loaded=loaded)
    assert kwargs["pretrained"] and torch.equal(
        model.state_dict()["rpn.head.conv.0.0.weight"], source.state_dict()["rpn.head.conv.0.0.weight"]
    )
