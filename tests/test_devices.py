import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from maskrcnn import devices

LIBRARY = Path(__file__).resolve().parent.parent / "maskrcnn"


def test_only_the_devices_module_reduces_or_picks_a_device():
    """Every collective and every device choice goes through maskrcnn.devices."""
    offenders = []
    for path in sorted(LIBRARY.glob("*.py")):
        if path.name == "devices.py":
            continue
        text = path.read_text()
        for pattern in (r"\bdist\.", r"torch\.distributed", r"cuda\.is_available\(\)"):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not offenders


def test_backend_follows_the_workers_device():
    assert devices.backend(gpu=True) == "nccl" and devices.backend(gpu=False) == "gloo"


def test_an_actor_without_a_gpu_runs_on_the_cpu_and_one_with_a_gpu_needs_cuda(monkeypatch):
    assert devices.for_actor(0.0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(devices.DeviceError, match=r"^node \S+: the actor reserved 0.5 GPU but CUDA cannot start"):
        devices.for_actor(0.5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.for_actor(1.0) == torch.device("cuda")


def test_faults_are_told_apart_from_errors_of_the_data():
    assert (
        devices.fault(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == devices.OUT_OF_MEMORY
    )
    assert devices.fault(torch.AcceleratorError("an illegal memory access was encountered")) == devices.LOST
    assert devices.fault(RuntimeError("CUDA error: uncorrectable ECC error encountered")) == devices.LOST
    assert devices.fault(ValueError("bad image")) is None


def test_all_reduce_runs_on_the_workers_device_in_a_real_process_group(tmp_path):
    """A one-rank gloo group: the same call a GPU worker makes with NCCL, on the CPU tensor here."""
    assert devices.all_reduce([1.5, 2.0], devices.CPU) == [1.5, 2.0]  # no group: the values themselves
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert devices.distributed()
        assert devices.all_reduce([1.5, 2.0, 3], devices.CPU) == [1.5, 2.0, 3.0]
        assert devices.gather({"rank": 0}, 1) == [{"rank": 0}]
    finally:
        dist.destroy_process_group()


def test_sync_bn_auto_is_on_for_learning_batch_norm_on_gpus_only():
    learning = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    from torchvision.ops import FrozenBatchNorm2d

    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4))
    gpu, cpu = torch.device("cuda"), devices.CPU
    assert devices.sync_batch_norm("auto", learning, gpu) and not devices.sync_batch_norm("auto", frozen, gpu)
    assert not devices.sync_batch_norm("auto", learning, cpu)
    assert not devices.sync_batch_norm("off", learning, gpu) and devices.sync_batch_norm("on", frozen, gpu)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(learning)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert set(converted.state_dict()) == set(learning.state_dict())  # checkpoints load into BatchNorm2d


def test_sync_bn_on_needs_gpu_workers(tmp_path):
    from maskrcnn.train_config import TrainConfig

    with pytest.raises(ValueError, match="--sync-bn on needs --gpu"):
        TrainConfig(train_annotations="a.json", train_images="i", storage=str(tmp_path), name="r", sync_bn="on")
