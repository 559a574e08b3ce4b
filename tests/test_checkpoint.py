import os
import pickle

import pytest
import torch

from maskrcnn import checkpoint
from maskrcnn.model import SMALL, build_model

ARCH_KWARGS = {"num_classes": 3, "min_size": 96, "max_size": 128}


def _checkpoint():
    torch.manual_seed(0)
    m = build_model(SMALL, **ARCH_KWARGS)
    return m, checkpoint.make(
        m, arch=SMALL, arch_kwargs=ARCH_KWARGS, classes=["a", "b"], category_ids=[3, 17],
        step=42, epoch=2, metrics={"val_segm_AP": 0.5},
    )  # fmt: skip


@pytest.mark.parametrize("where", ["local", "s3"])
def test_roundtrip_rebuilds_the_same_model(where, tmp_path, request):
    uri = str(tmp_path / "ck" / "model.pt") if where == "local" else f"s3://{request.getfixturevalue('bucket')}/runs/model.pt"
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
    with pytest.raises(checkpoint.CheckpointError, match="neither a maskrcnn-ray-checkpoint file nor a torchvision state dict"):
        checkpoint.load(str(tmp_path / "plain.pt"))
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2]) + b"junk")
    with pytest.raises(checkpoint.CheckpointError, match="junk.pt"):
        checkpoint.load(str(tmp_path / "junk.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="missing.pt"):
        checkpoint.load(str(tmp_path / "missing.pt"))
