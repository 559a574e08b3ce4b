import os
import pickle

import pytest
import torch

from maskrcnn import checkpoint
from maskrcnn import weights as weights_lib
from maskrcnn.model import SMALL, build_model
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


def test_torchvisions_keypoint_rcnn_file_is_a_model_with_cocos_persons_and_skeleton(tmp_path):
    """Keypoint R-CNN's COCO_V1 file (its structure, random weights) as --model: the arch from
    its layers, "person", COCO's 17 keypoint names and skeleton, and eps 0 by its published name."""
    from torchvision.ops import FrozenBatchNorm2d

    from maskrcnn.keypoints import COCO_PERSON

    path = tmp_path / weights_lib.LEGACY_EPS_FILES[1]  # torchvision's keys (test_model checks), frozen batch norm
    torch.save(build_model("keypointrcnn_resnet50_fpn", 2, num_keypoints=17, pretrained=True).state_dict(), path)
    ckpt = checkpoint.load(str(path))
    assert ckpt["arch"] == "keypointrcnn_resnet50_fpn" and ckpt["classes"] == ["person"]
    assert ckpt["arch_kwargs"]["num_keypoints"] == 17 and checkpoint.keypoint_spec(ckpt) == COCO_PERSON
    assert {m.eps for m in checkpoint.build(ckpt).modules() if isinstance(m, FrozenBatchNorm2d)} == {0.0}
    with pytest.raises(ValueError, match="need keypoint names exactly when the model predicts keypoints"):
        fields = {"arch_kwargs": {}, "classes": ["a"], "category_ids": [1], "step": 0, "epoch": 0}
        checkpoint.make(build_model(SMALL, num_classes=2), arch="keypointrcnn_resnet18_fpn_small", **fields)
