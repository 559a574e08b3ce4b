"""Starting or joining Ray, the same way for every job."""

from __future__ import annotations

import os

import ray


def init_ray(min_cpus: int) -> None:
    """Join the cluster under ``ray job submit`` (RAY_ADDRESS is set); otherwise start a
    local Ray with at least ``min_cpus`` logical CPUs, so that actors or training workers
    and the CPU data tasks beside them can all be scheduled on a small machine."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    ray.init(num_cpus=max(os.cpu_count() or 1, min_cpus))
