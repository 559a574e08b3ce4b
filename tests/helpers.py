"""What the tests share besides fixtures (those are in conftest.py): running a job as a
user would, the one small-checkpoint builder, real-data samples, and checks of documented
command lines. Test files import from here, never from each other."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import boto3
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn import checkpoint
from maskrcnn.cli import load_parser
from maskrcnn.keypoints import COCO_PERSON
from maskrcnn.local_s3 import free_port  # noqa: F401 - tests pick ports with it
from maskrcnn.model import SMALL, build_model, has_keypoints
from tests.ray_head import MARKER, kill_marked, ray_head, token_auth  # noqa: F401 - the rest: test_multinode

REPO = Path(__file__).resolve().parent.parent

# odd_images/ files no job can use, with the error kind each must get (the rest decode).
UNUSABLE = {
    "broken.png": "not_an_image",
    "heapbof.png": "not_an_image",
    "test-ole-file.doc": "not_an_image",
    "zero_width.gif": "not_an_image",
    "decompression_bomb.gif": "too_large",
    "l2rgb_read.bmp": "too_large",
    "corrupt.jpg": "corrupt",
    "corrupt34_2.jpg": "corrupt",
    "corrupt34_3.jpg": "corrupt",
    "corrupt34_4.jpg": "corrupt",
    "hopper_webp.tif": "corrupt",
    "png_decompression_dos.png": "corrupt",
    "sigsegv.png": "corrupt",
    "truncated_image.png": "corrupt",
    "truncated_jpeg.jpg": "corrupt",
    "ultrahdr.jpg": "corrupt",
    # INDEX.tsv says load() succeeds; with the pinned Pillow 13.0.0 wheel it raises
    # "unrecognized data stream contents", so it is an error row here.
    "broken_data_stream.png": "corrupt",
}

# Real images of mixed sizes and orientations, relative to ../shared/data.
MIXED = [
    "photos/dog1.jpg",
    "odd_images/hopper_orientation_6.jpg",
    "odd_images/wizard_low-interlaced.png",
    "photos/person1.jpg",
    "photos/astronaut.jpg",
    "photos/FudanPed00054.png",
]


def load_script(path: str) -> types.ModuleType:
    """The script at ``path`` (relative to the repository) imported as a module, as its
    ``python path`` would run it but without calling its ``main``."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(path).stem}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def check_command(argv: list[str]) -> None:
    """``python jobs/X.py ARGS``: the script exists and its parser accepts ARGS as they are."""
    assert argv[0].endswith("python") and argv[1].startswith("jobs/"), argv
    assert (REPO / argv[1]).is_file(), f"{argv[1]} does not exist"
    parser = load_parser(str(REPO / argv[1]))
    if {"--status", "--repair"} & set(argv):  # a mode of jobs/segment_bucket.py: no other flag needed
        for action in parser._actions:
            action.required = False
    parser.parse_args(argv[2:])  # argparse exits (failing the test) on a bad flag


def upload_dir(local: Path, bucket: str, prefix: str) -> None:
    client = boto3.client("s3")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


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


def small_checkpoint(
    *,
    min_size: int = 160,
    max_size: int = 256,
    classes: tuple[str, ...] = ("a", "b", "c"),
    category_ids: tuple[int, ...] = (2, 5, 9),
    seed: int = 1,
    arch: str = SMALL,
    **fields: Any,
) -> tuple[torch.nn.Module, dict]:
    """The small Mask R-CNN (or small keypoint ``arch``, with COCO's 17 person keypoints) with
    random weights (``seed``) and its project checkpoint (``fields`` fill in ``step``, ``epoch``,
    ``metrics``): what the inference tests run. Its speed and shapes are real; its labels are noise."""
    torch.manual_seed(seed)
    kwargs = {"num_classes": len(classes) + 1, "min_size": min_size, "max_size": max_size}
    spec = COCO_PERSON if has_keypoints(arch) else None
    if spec:
        kwargs["num_keypoints"] = len(spec)
    model = build_model(arch, **kwargs)
    fields = {"step": 0, "epoch": 0, "keypoints": spec, **fields}
    ckpt = checkpoint.make(
        model, arch=arch, arch_kwargs=kwargs, classes=list(classes), category_ids=list(category_ids), **fields
    )
    return model, ckpt


def small_model_file(path: Path | str, **kwargs: Any) -> str:
    """:func:`small_checkpoint` saved at ``path``; returns the path."""
    checkpoint.save(str(path), small_checkpoint(**kwargs)[1])
    return str(path)


# A library's warning category (UserWarning, FutureWarning, RayDeprecationWarning, ...) as
# Python's warnings module prints it; the jobs' own lines say "warning:" in lower case.
LIBRARY_WARNING = re.compile(r"\b[A-Z]\w*Warning\b")


def run_job(
    script: str, *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``jobs/<script>`` as a user would, capturing its output; ``env`` adds variables.
    It joins the session's Ray head (:func:`ray_head`); ``env={"RAY_ADDRESS": ""}`` gives it
    a local Ray of its own. No library warning may reach the user's terminal: it tells them
    nothing they can act on."""
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **ray_head(), **(env or {})},
    )
    assert_no_library_warnings(done.stdout + done.stderr)
    return done


def assert_no_library_warnings(output: str) -> None:
    """``output`` has no line of a library's warning (see :data:`LIBRARY_WARNING`)."""
    found = [line for line in output.splitlines() if LIBRARY_WARNING.search(line)]
    assert not found, "a library warning reached the terminal:\n" + "\n".join(found[:10])


CLIENTS = Path(os.environ.get("MASKRCNN_CLIENTS", REPO / ".venv-clients"))  # make clients


def read_back(*args: str, env: dict | None = None) -> dict:
    """tests/clients/read_back.py in the labelling tools' venv: what a tool's own code read."""
    python = CLIENTS / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: run `make clients` (make test does)")
    done = subprocess.run(
        [str(python), str(REPO / "tests" / "clients" / "read_back.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FIFTYONE_DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1", **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def segment_summary(result: subprocess.CompletedProcess) -> dict:
    """The summary that a successful ``jobs/segment_bucket.py`` prints last."""
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def call_job(script: str, *args: str) -> subprocess.CompletedProcess:
    """``jobs/<script>`` run in this process, for a job that ends before Ray starts (bad
    input, --help, export): the same exit status and output as :func:`run_job`, without
    paying for a new interpreter that imports torch and Ray."""
    import io

    from maskrcnn.cli import run_main

    job = load_script(f"jobs/{script}")
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(lambda: job.main(list(args)))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    if "ray" in sys.modules:
        import ray

        assert not ray.is_initialized(), f"jobs/{script} started Ray: use run_job"
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


TOOTHBRUSH = 90  # COCO's last category id: the 80th class, label 90 in torchvision's COCO models


# No internet, whatever the machine has: downloads go to a proxy port that refuses them,
# and torch's weight cache is empty.
OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def add_defects(gt: dict) -> Counter:
    """Add to a COCO dict (in place) one annotation of every defect the loader must clean,
    copied from its first annotation; return the drops by reason that should be counted.
    Also makes good annotations look as labelling tools write them: no ``area``, a bool
    ``iscrowd``, a multi-part polygon with one broken part."""
    first = next(a for a in gt["annotations"] if not a.get("iscrowd"))
    img = next(i for i in gt["images"] if i["id"] == first["image_id"])
    ids = iter(range(900_000, 901_000))
    h, w = img["height"], img["width"]

    def add(**changes: object) -> None:
        gt["annotations"].append({**first, "id": next(ids), **changes})

    add(segmentation=[[10.0, 10.0, 20.0, 20.0]])  # a 4-number polygon, read as a box by pycocotools
    add(segmentation=[[10.0, 10.0, 20.0, 10.0, 20.0]])  # odd length
    add(segmentation=[[10.0, 10.0, "20", 10.0, 20.0, 20.0]])  # a string coordinate
    add(segmentation=[])
    gt["annotations"].append({k: v for k, v in {**first, "id": next(ids)}.items() if k != "segmentation"})
    add(segmentation={"size": [h + 1, w], "counts": "PPYo1"})  # RLE of another image size
    add(bbox=[5.0, 5.0, 0.0, 8.0])  # zero width
    add(bbox=[w + 10.0, 5.0, 8.0, 8.0])  # outside the image
    add(bbox=[5.0, 5.0, -3.0, 8.0])  # negative width
    add(bbox=[5.0, 5.0, 8.0])  # three numbers
    add(bbox=["5", 5.0, 8.0, 8.0])
    add(category_id=987654)  # no such category
    add(image_id=987654)  # no such image
    # Kept, after cleaning:
    x, y, bw, bh = first["bbox"]
    add(segmentation=[[1.0, 2.0, 3.0], [x, y, x + bw, y, x + bw, y + bh, x, y + bh]])  # one bad part, one good
    gt["annotations"].append({k: v for k, v in {**first, "id": next(ids)}.items() if k != "area"})
    add(iscrowd=True, segmentation={"size": [h, w], "counts": [5, 20, h * w - 25]})  # crowd, uncompressed RLE
    return Counter(
        invalid_segmentation=6, degenerate_box=3, invalid_box=2, unknown_category=1, unknown_image=1, crowd=1
    )


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``directory``, by tag, read with
    tensorboardX's own protobuf (TFRecord framing: length, crc, event, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def ground_truth_as_results(gt: dict, category_of=lambda ann: ann["category_id"]) -> list[dict]:
    """The non-crowd annotations of a COCO dict as COCO results with score 1 (``category_of``
    may relabel them): what a perfect model would predict."""
    from maskrcnn import masks

    size = {i["id"]: (i["height"], i["width"]) for i in gt["images"]}
    return [
        {
            "image_id": a["image_id"],
            "category_id": category_of(a),
            "bbox": a["bbox"],
            "score": 1.0,
            "segmentation": masks.to_rle(a["segmentation"], *size[a["image_id"]]),
            **({"keypoints": a["keypoints"]} if "keypoints" in a else {}),
        }
        for a in gt["annotations"]
        if not a.get("iscrowd")
    ]


def mask_iou(a: list[dict], b: list[dict]) -> np.ndarray:
    """The ``(len(a), len(b))`` mask IoUs of two lists of RLEs of one image, computed on the
    runs (no mask is decoded)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou([dict(r) for r in a], [dict(r) for r in b], [0] * len(b)))


def teacher_labels(coco_small: tuple[str, str], out: str, images: int, seed: int = 0) -> list[dict]:
    """Pseudo-labels as a good teacher would write them: the first ``images`` images of the
    real coco_small set, each non-crowd ground-truth mask an instance with a seeded score,
    written as a segmentation output (part files and ``_categories.json``). Returns the rows."""
    import json

    gt = json.loads(Path(coco_small[0]).read_text())
    return segmentation_labels(dict(gt, images=gt["images"][:images]), coco_small[1], out, seed)


def segmentation_labels(gt: dict, image_root: str, out: str, seed: int = 0) -> list[dict]:
    """``gt``'s images under ``image_root`` labelled as the segmentation job labels them, by its
    writers (rows of :func:`maskrcnn.output.row` in two part files, and ``_categories.json``):
    each non-crowd annotation an instance with a seeded score, ``gt``'s sizes and coordinates
    taken as the displayed picture's, as the job's are. Returns the rows."""
    from maskrcnn import masks, output

    names = {c["id"]: c["name"] for c in gt["categories"]}
    rng = np.random.default_rng(seed)
    rows = []
    for img in gt["images"]:
        instances = [
            {
                "category_id": ann["category_id"],
                "category": names[ann["category_id"]],
                "score": float(rng.uniform(0.2, 1.0)),
                "bbox": [float(v) for v in ann["bbox"]],
                "mask": masks.to_compressed(ann["segmentation"], img["height"], img["width"]),
                "keypoints": None,
                "iscrowd": None,
            }
            for ann in gt["annotations"]
            if ann["image_id"] == img["id"] and not ann["iscrowd"]
        ]
        rows.append(output.row(f"{image_root}/{img['file_name']}", (img["height"], img["width"]), instances, "teacher"))
    output.write_part(out, 0, rows[: len(rows) // 2])
    output.write_part(out, 1, rows[len(rows) // 2 :])
    output.write_categories(out, gt["categories"])
    return rows


def start_job(script: str, *args: str) -> tuple[subprocess.Popen, str]:
    """``jobs/<script>`` started as :func:`run_job` runs it, but in a session of its own and
    with a marker that its Ray processes inherit; returns the process and the marker."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / script), *args],
        cwd=REPO,
        env=dict(os.environ, **{MARKER: marker}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc, marker


def kill_job_when(job: tuple[subprocess.Popen, str], ready: Callable[[], bool], timeout: float = 300) -> None:
    """Once ``ready()``, SIGKILL a :func:`start_job` job's driver mid-job, then the Ray it started."""
    proc, marker = job
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the job ended before it could be interrupted"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kill_marked(marker)
