"""A real S3 endpoint on loopback (moto's server), for ``DEMO_S3=1 make demo`` and the tests.

The endpoint is reached the way any S3-compatible store is: through the standard AWS
variables (``AWS_ENDPOINT_URL``, keys, region), set in ``os.environ`` so that Ray workers
and job subprocesses inherit them. Needs the ``test`` extra (``moto[server]``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the local S3 endpoint on 127.0.0.1:{port} did not start") from None
            time.sleep(0.2)


@contextlib.contextmanager
def serve() -> Iterator[str]:
    """Start the endpoint, point the AWS variables at it, and yield its URL; undo both after."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        _wait_for(port, proc)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
