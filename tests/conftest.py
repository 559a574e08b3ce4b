"""Shared fixtures: the real data in ../shared/data, a real S3 endpoint on loopback (moto's
server), a small synthetic dataset, and torchvision's R50 with random weights. Helpers that
are not fixtures are in tests/helpers.py."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import boto3
import pytest

from maskrcnn import local_s3
from tests.helpers import REPO, TOOTHBRUSH

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


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """A small synthetic COCO dataset: ``train/`` (32 images) and ``val/`` (8 images)."""
    from maskrcnn.synthetic import generate_split

    root = tmp_path_factory.mktemp("shapes")
    generate_split(str(root / "train"), 32, seed=0)
    generate_split(str(root / "val"), 8, seed=1)
    return root


@pytest.fixture(scope="session")
def segmented_shapes(shapes: Path, tmp_path_factory) -> Path:
    """What ``jobs/segment_bucket.py --incremental`` writes of ``shapes/val/images`` with a
    small untrained model of the shapes' categories (many small, ragged masks; top scores of
    about 0.2 to 0.4): a teacher's labels, a labels dataset of one run, made once for the
    tests that read them (the labelling tools, training) by its root."""
    from tests.helpers import run_job, small_model_file

    root = tmp_path_factory.mktemp("segmented")
    model = small_model_file(root / "teacher.pt", classes=("circle", "rectangle", "triangle"), category_ids=(1, 2, 3))
    flags = f"--input {shapes}/val/images --output {root / 'labels'} --model {model} --score-threshold 0.05"
    done = run_job("segment_bucket.py", *flags.split(), "--max-detections", "20", "--incremental")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "labels"


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> str:
    """The small untrained checkpoint of :func:`tests.helpers.small_checkpoint`, saved once."""
    from tests.helpers import small_model_file

    return small_model_file(tmp_path_factory.mktemp("model") / "small.pt")


@pytest.fixture(scope="session")
def torchvision_pth(tmp_path_factory) -> str:
    """torchvision's ``maskrcnn_resnet50_fpn`` with random weights (nothing can be downloaded
    here), saved as a bare state dict, as torchvision publishes its COCO weights. Its class
    scores are biased so that every detection is a toothbrush (COCO id 90, which an 80-class
    numbering would call 80), ahead of torchvision's ``N/A`` placeholder 12."""
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    scores = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        scores.weight.zero_()
        scores.bias.fill_(-10.0)
        scores.bias[TOOTHBRUSH], scores.bias[12] = 5.0, 4.0
    path = tmp_path_factory.mktemp("zoo") / "maskrcnn_resnet50_fpn_random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


# ---------------------------------------------------------------- leaving the test process

_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Leave with pytest's own status once every plugin has finished, skipping the interpreter's
    teardown. This process has loaded Ray, torch, pyarrow's S3 client, OpenCV and matplotlib
    side by side, and the teardown of native libraries that have run threads in it crashed
    once (SIGSEGV after "396 passed": pyarrow's bundled mimalloc and AWS SDK have known
    crashes at exit, apache/arrow#38352, #50908). Every job a test runs is its own process,
    and its exit status, teardown included, is asserted; only this harness's exit is cut short."""
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
