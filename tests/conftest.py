"""Shared fixtures: the real data in ../shared/data, a real S3 endpoint on loopback (moto's
server), a small synthetic dataset, and torchvision's R50 with random weights. Helpers that
are not fixtures are in tests/helpers.py."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Callable

import boto3
import pytest

from maskrcnn import local_s3
from tests.helpers import REPO, TOOTHBRUSH

DATA_ENV = "MASKRCNN_TEST_DATA"


@pytest.fixture(scope="session", autouse=True)
def _ray_head_after_s3(s3_server):
    """The Ray head that jobs share (:func:`tests.ray_head.ray_head`) starts, on first use,
    after the S3 endpoint, whose variables its workers inherit as a cluster's nodes hold
    their AWS configuration; it stops with the session."""
    yield
    from tests.ray_head import stop_ray_head

    stop_ray_head()


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


@pytest.fixture
def oriented_photos(coco_small: tuple[str, str]) -> Callable[..., dict]:
    """``oriented_photos(folder, orientations, turned=...)``: the first ``len(orientations)``
    images of coco_small saved as PNGs (lossless) in ``folder``, the i-th tagged with EXIF
    orientation ``orientations[i]`` (1: no tag). Turned, their pixels are stored turned so that
    they display as coco_small's: phone photos, which the segmentation job labels as displayed.
    Not turned, they store coco_small's pixels and display turned. Returns their COCO dict,
    with coco_small's sizes and coordinates."""
    import json

    from PIL import Image

    # How a file stores a picture that its EXIF orientation displays upright: the inverse of
    # what PIL's ImageOps.exif_transpose does to display it.
    t = Image.Transpose
    stored_turned = {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE}
    stored_turned.update({6: t.ROTATE_90, 7: t.TRANSVERSE, 8: t.ROTATE_270})
    gt = json.loads(Path(coco_small[0]).read_text())

    def save(folder: Path, orientations: list[int], *, turned: bool) -> dict:
        chosen = gt["images"][: len(orientations)]
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        for img, orientation in zip(chosen, orientations):
            picture = Image.open(Path(coco_small[1]) / img["file_name"]).convert("RGB")
            name = f"{Path(img['file_name']).stem}-{orientation}.png"
            if orientation == 1:
                picture.save(folder / name)
            else:
                exif = Image.Exif()
                exif[0x0112] = orientation
                picture = picture.transpose(stored_turned[orientation]) if turned else picture
                picture.save(folder / name, exif=exif.tobytes())
            images.append(dict(img, file_name=name))
        ids = {img["id"] for img in chosen}
        annotations = [a for a in gt["annotations"] if a["image_id"] in ids]
        return {"images": images, "annotations": annotations, "categories": gt["categories"]}

    return save


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
