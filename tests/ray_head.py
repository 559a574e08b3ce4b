"""The test session's Ray processes: one head that the jobs share, and killing whatever a
job or a ``ray start`` started, by a marker variable its processes inherit."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

from maskrcnn.local_s3 import free_port

MARKER = "MASKRCNN_TEST_MARKER"


def kill_marked(marker: str) -> None:
    """Kill every process whose environment holds ``MASKRCNN_TEST_MARKER=marker``, and their
    children: whatever a job or a ``ray start`` run with that marker started, and no other
    test's Ray. (The children, because a process that setproctitle renamed, as Ray's agents,
    dashboard modules and actors are, no longer shows its environment.)"""
    import psutil

    doomed: list[psutil.Process] = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker:
                doomed += [proc, *proc.children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    for proc in doomed:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


_HEAD: dict[str, str] = {}  # the variables that point a job at the session's Ray head


def ray_head() -> dict[str, str]:
    """The test session's one Ray head on loopback, started on first use; conftest stops it.
    Jobs join it as under ``ray job submit`` instead of each starting and stopping a Ray of
    its own, which costs a job about 10 s here. Returns the variables that point a job at it."""
    if not _HEAD:
        from ray._common.utils import reset_ray_address

        auth, marker = token_auth(), uuid.uuid4().hex
        port, *others = (str(free_port()) for _ in range(4))
        ports = dict(zip(("--dashboard-port", "--dashboard-agent-listen-port", "--ray-client-server-port"), others))
        subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
             "--port", port, "--dashboard-host", "127.0.0.1", *(x for kv in ports.items() for x in kv),
             "--num-cpus", "4", "--disable-usage-stats"],
            env={**os.environ, **auth, MARKER: marker}, capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        reset_ray_address()  # a job that starts its own Ray must not find this one
        _HEAD.update(auth, RAY_ADDRESS=f"127.0.0.1:{port}", marker=marker)
    return {k: v for k, v in _HEAD.items() if k != "marker"}


def token_auth() -> dict[str, str]:
    """The variables that turn on Ray's token authentication, with a token of this test session
    (what ``ray get-auth-token --generate`` makes), so a machine needs no ``~/.ray/auth_token``."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def stop_ray_head() -> None:
    if _HEAD:
        kill_marked(_HEAD.pop("marker"))
        _HEAD.clear()
