"""The one place that picks a device or talks to the other training workers.

- Training: Ray Train starts the process group with the backend :func:`backend` names (NCCL
  for GPU workers, gloo for CPU ones). NCCL reduces only CUDA tensors, so every collective
  here puts its tensor on the worker's own device: the CPU tests run the same lines as a
  GPU cluster.
- Inference: :func:`for_actor` gives CUDA exactly when the actor reserved a GPU.
- Faults: :func:`fault` tells a device that ran out of memory (split the batch and retry)
  from one whose context is lost (end the process), and both from an error of the data.

A test checks that no other library module calls ``torch.distributed`` or
``torch.cuda.is_available()``.
"""

from __future__ import annotations

import gc
import socket
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from maskrcnn.errors import UserError

CPU = torch.device("cpu")


class DeviceError(UserError):
    """A reserved GPU that cannot be used: a node's drivers or CUDA, not this code."""


def backend(gpu: bool) -> str:
    """The process-group backend for training workers: NCCL on GPUs, gloo on CPUs."""
    return "nccl" if gpu else "gloo"


def default() -> torch.device:
    """The first GPU if this machine has one, else the CPU (``jobs/predict.py``, no Ray)."""
    return torch.device("cuda") if torch.cuda.is_available() else CPU


def for_actor(gpus: float) -> torch.device:
    """The device of an inference actor that reserved ``gpus`` GPUs. Ray makes the reserved
    GPU the actor's ``cuda:0``; an actor that reserved none runs on its CPU even on a GPU node
    (Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for it, and the GPUs belong to others)."""
    if gpus <= 0:
        return CPU
    if not torch.cuda.is_available():
        raise DeviceError(
            f"node {socket.gethostname()}: the actor reserved {gpus:g} GPU but CUDA cannot start there "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); check the node's NVIDIA driver"
        )
    return torch.device("cuda")


# ---------------------------------------------------------------- training workers


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed over every worker; the tensor lives on ``device``, the worker's own."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather(obj: Any, world: int) -> list[Any]:
    """Every worker's ``obj``, in rank order (pickled; NCCL moves it through the worker's GPU)."""
    if not distributed():
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def trains_batch_norm(model: nn.Module) -> bool:
    """Whether any batch norm layer learns (torchvision's frozen ones do not)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def sync_batch_norm(setting: str, model: nn.Module, device: torch.device) -> bool:
    """Whether ``--sync-bn`` (auto, on, off) synchronises this model's batch norm: auto does
    on GPUs, for a model whose batch norm learns (2 images a GPU make poor statistics)."""
    if setting == "auto":
        return device.type == "cuda" and trains_batch_norm(model)
    return setting == "on"


# ---------------------------------------------------------------- faults


OUT_OF_MEMORY = "out_of_memory"
LOST = "lost"  # a sticky device error: every later call in this process fails too


def fault(err: BaseException) -> str | None:
    """:data:`OUT_OF_MEMORY`, :data:`LOST`, or None for an error of the data or the code."""
    if isinstance(err, torch.OutOfMemoryError):
        return OUT_OF_MEMORY
    if isinstance(err, torch.AcceleratorError) or "CUDA error" in str(err):
        return LOST
    return None


def release(device: torch.device) -> None:
    """Free what a failed call left on ``device``: collect its frames, empty the allocator's cache.
    Call it outside the ``except`` block, whose traceback holds the failed batch's tensors."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
