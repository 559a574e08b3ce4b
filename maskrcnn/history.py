"""What a training run leaves to watch and reproduce it, next to its checkpoints in
``STORAGE/NAME/`` (local or s3://):

    config.json         the resolved configuration, project and package versions, git commit
    metrics.jsonl       one JSON line per logged step and per evaluation
    tensorboard/        TensorBoard event files of the same values (``tensorboard --logdir``)

Rank 0 writes the history. On local disk it writes in place; for S3 it writes to a
staging directory and uploads the files whenever :meth:`History.flush` is called (S3
objects cannot be appended to). On resume, lines and events after the checkpoint's step are
dropped, so the history shows each step once.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import time
from typing import Any

from maskrcnn import storage

PACKAGES = ("maskrcnn-ray", "torch", "torchvision", "ray", "pyarrow", "pycocotools", "numpy", "pillow")
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def write_config(run_dir: str, config: dict[str, Any]) -> str:
    """Write ``config.json`` (the configuration plus where it ran); return its URI."""
    uri = storage.join(run_dir, "config.json")
    record = {"config": config, "versions": versions(), "git_commit": git_commit(), "python": platform.python_version()}
    storage.write_text(uri, json.dumps(record, indent=2, sort_keys=True))
    return uri


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has changes), or None outside git."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def _git(*args: str) -> str | None:
    """A git command's output in this checkout, or None if git fails or is absent."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        done = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


class History:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard; ``resume_step`` drops what came after it."""

    def __init__(self, run_dir: str, resume_step: int = 0):
        from tensorboardX import SummaryWriter  # installed with ray[train]

        self.run_dir = run_dir
        self.remote = storage.is_s3(run_dir)
        self.local = tempfile.mkdtemp(prefix="history-") if self.remote else run_dir
        os.makedirs(os.path.join(self.local, TENSORBOARD), exist_ok=True)
        self._keep_until(resume_step)
        self.writer = SummaryWriter(
            os.path.join(self.local, TENSORBOARD),
            purge_step=resume_step + 1 if resume_step else None,  # TensorBoard hides the old file's later steps
            filename_suffix=f".{os.getpid()}.from{resume_step}",  # never reuse an earlier file's name
        )

    def _keep_until(self, step: int) -> None:
        uri, path = storage.join(self.run_dir, METRICS), os.path.join(self.local, METRICS)
        old = storage.read_text(uri).splitlines() if storage.exists(uri) else []
        kept = [line for line in old if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(line + "\n" for line in kept)

    def log(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        """One line ``{"kind": "train"|"val", "step": .., "time": .., **metrics}`` and one
        TensorBoard scalar per value, tagged ``kind/name``."""
        line = {"kind": kind, "step": step, "time": round(time.time(), 3), **metrics}
        with open(os.path.join(self.local, METRICS), "a") as f:
            f.write(json.dumps(line) + "\n")
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{kind}/{name}", value, step)

    def flush(self) -> None:
        self.writer.flush()
        if not self.remote:
            return
        for root, _, files in os.walk(self.local):
            for name in files:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, self.local).replace(os.sep, "/")
                with open(path, "rb") as f:
                    storage.write_bytes(storage.join(self.run_dir, relative), f.read())

    def close(self) -> None:
        self.flush()
        self.writer.close()
