import argparse
import os

import pytest
import torch
import torchvision

from maskrcnn import checkpoint
from maskrcnn import weights as weights_lib
from maskrcnn.model import SMALL, build_model, init_model
from maskrcnn.weights import WeightsError
from tests.helpers import OFFLINE

# ---------------------------------------------------------------- sources and state dicts


def test_a_name_is_a_file_or_a_torchvision_weight_name_of_its_arch(tmp_path):
    assert weights_lib.is_path("s3://bucket/w.pth") and weights_lib.is_path("w.pt")
    assert not weights_lib.is_path("COCO_V1")
    coco = weights_lib.torchvision_weights("COCO_V1", "maskrcnn_resnet50_fpn")
    assert weights_lib.arch_of_weights(coco) == "maskrcnn_resnet50_fpn" and not weights_lib.is_backbone(coco)
    v2 = weights_lib.torchvision_weights("MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1", SMALL)  # the name says its arch
    assert weights_lib.arch_of_weights(v2) == "maskrcnn_resnet50_fpn_v2"
    body = weights_lib.torchvision_weights("ResNet50_Weights.IMAGENET1K_V1", "maskrcnn_resnet50_fpn")
    assert weights_lib.is_backbone(body) and weights_lib.arch_of_weights(body) is None
    assert weights_lib.torchvision_weights("COCO_V1", SMALL) is None  # torchvision publishes none for it
    assert weights_lib.torchvision_weights("COCO_V9", "maskrcnn_resnet50_fpn") is None


def test_every_file_form_gives_the_same_tensors(tmp_path):
    """A bare state dict, a project checkpoint and a DDP reference-script checkpoint (with its
    argparse arguments) all read, with weights_only, to the same tensors."""
    state = build_model(SMALL, num_classes=3).state_dict()
    forms = {
        "bare.pth": state,
        "project.pt": {"format": "maskrcnn-ray-checkpoint", "state_dict": state},
        "model_9.pth": {"model": {f"module.{k}": v for k, v in state.items()}, "args": argparse.Namespace(lr=0.02)},
    }
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
        got, where = weights_lib.read_state_dict(str(tmp_path / name), SMALL)
        assert where == str(tmp_path / name) and got.keys() == state.keys(), name
        assert all(torch.equal(got[k], state[k]) for k in state), name
    torch.save({"optimizer": {}}, tmp_path / "no_weights.pth")
    with pytest.raises(WeightsError, match="no_weights.pth holds no state_dict"):
        weights_lib.read_state_dict(str(tmp_path / "no_weights.pth"), SMALL)


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
    for name in (*weights_lib.LEGACY_EPS_FILES, "resnet50-0676ba61.pth"):  # the published file names
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
        build_model("maskrcnn_resnet50_fpn", 91, pretrained=True).state_dict(), cache / weights_lib.LEGACY_EPS_FILES[0]
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
