"""Shared fixtures: the real data in ../shared/data, a real S3 endpoint on loopback (moto's
server), a small synthetic dataset, and a helper that runs a job as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from maskrcnn import local_s3
from maskrcnn.local_s3 import free_port as _free_port  # noqa: F401 - tests pick ports with it

REPO = Path(__file__).resolve().parent.parent
DATA_ENV = "MASKRCNN_TEST_DATA"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $MASKRCNN_TEST_DATA): real data nobody on this project wrote."""
    root = Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data"))
    if not (root / "coco_small" / "instances_val2017.json").exists():
        pytest.skip(f"shared test data not found at {root} (set {DATA_ENV})")
    return root


@pytest.fixture(scope="session")
def coco_small(shared_data: Path) -> tuple[str, str]:
    return str(shared_data / "coco_small" / "instances_val2017.json"), str(shared_data / "coco_small" / "images")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, configured through the standard AWS variables only
    (see :mod:`maskrcnn.local_s3`), so Ray workers and job subprocesses inherit them."""
    with local_s3.serve() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the loopback S3 endpoint."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def upload_dir(local: Path, bucket: str, prefix: str) -> None:
    client = boto3.client("s3")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """A small synthetic COCO dataset: ``train/`` (32 images) and ``val/`` (8 images)."""
    from maskrcnn.synthetic import generate_split

    root = tmp_path_factory.mktemp("shapes")
    generate_split(str(root / "train"), 32, seed=0)
    generate_split(str(root / "val"), 8, seed=1)
    return root


def large_jpeg(shared_data: Path, width: int, height: int, orientation: int = 1, photo: str = "person1.jpg") -> bytes:
    """A real photo scaled up to a camera-sized JPEG, optionally with an EXIF orientation."""
    import io

    from PIL import Image

    scaled = Image.open(shared_data / "photos" / photo).convert("RGB").resize((width, height), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    scaled.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def small_model_file(
    path: Path | str, *, min_size: int = 160, max_size: int = 256,
    classes: tuple[str, ...] = ("a", "b", "c"), category_ids: tuple[int, ...] = (2, 5, 9),
) -> str:
    """Save the small Mask R-CNN with random weights (seed 1) as a project checkpoint: what
    the inference tests run. Its speed and shapes are real; its labels are noise."""
    import torch

    from maskrcnn import checkpoint
    from maskrcnn.model import SMALL, build_model

    torch.manual_seed(1)
    kwargs = {"num_classes": len(classes) + 1, "min_size": min_size, "max_size": max_size}
    ckpt = checkpoint.make(build_model(SMALL, **kwargs), arch=SMALL, arch_kwargs=kwargs, classes=list(classes),
                           category_ids=list(category_ids), step=0, epoch=0)  # fmt: skip
    checkpoint.save(str(path), ckpt)
    return str(path)


def run_job(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``jobs/<script>`` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
