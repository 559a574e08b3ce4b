"""jobs/coco_to_parquet.py: real COCO files -> Parquet labels that index as the COCO file does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from maskrcnn import coco, convert, data, labels, masks, output, storage
from tests.helpers import REPO, add_defects, call_job, upload_dir


def test_the_converter_imports_no_torch_draw_or_export():
    """The cleaning rules (maskrcnn/coco.py) need none of them: the converter is a plain,
    small Python process (its peak RSS is in docs/benchmarks.md)."""
    command = [sys.executable, "-X", "importtime", "jobs/coco_to_parquet.py", "--help"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and "--annotations" in run.stdout, run.stderr[-2000:]
    modules = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "maskrcnn.coco" in modules and "maskrcnn.convert" in modules
    assert not modules & {"torch", "torchvision", "maskrcnn.draw", "maskrcnn.export", "maskrcnn.data"}, sorted(modules)


def _convert(annotations: Path | str, images: Path | str, out: Path | str, *extra: str):
    result = call_job(
        "coco_to_parquet.py", "--annotations", str(annotations), "--images", str(images), "--output", str(out), *extra
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.split("summary:\n", 1)[1])


def _same_dataset(a: coco.CocoIndex, b: coco.CocoIndex) -> None:
    """The same images, classes and training annotations (labels, boxes, mask pixels, keypoints);
    the defects were dropped by the conversion, so the labels drop only the crowd regions again."""
    assert (a.classes, a.category_ids, a.keypoints) == (b.classes, b.category_ids, b.keypoints)
    assert dict(b.dropped) == {k: v for k, v in a.dropped.items() if k == "crowd"}
    by_uri = {r["uri"]: r for r in b.records}
    assert sorted(by_uri) == sorted(r["uri"] for r in a.records)
    for record in a.records:
        other = by_uri[record["uri"]]
        mine, theirs = json.loads(record["annotations"]), json.loads(other["annotations"])
        assert [x["label"] for x in mine] == [y["label"] for y in theirs]
        assert np.allclose([x["box"] for x in mine], [y["box"] for y in theirs]) or not mine
        h, w = record["height"], record["width"]
        for x, y in zip(mine, theirs):
            assert np.array_equal(masks.decode(x["segmentation"], h, w), masks.decode(y["segmentation"], h, w))
            assert x.get("keypoints") == y.get("keypoints")
    assert len(a.gt["annotations"]) == len(b.gt["annotations"])
    assert sum(x["iscrowd"] for x in a.gt["annotations"]) == sum(y["iscrowd"] for y in b.gt["annotations"])


def test_real_coco_with_every_defect_converts_by_the_training_rules(shared_data, tmp_path, monkeypatch):
    """80 real COCO images (multi-part polygons, crowd RLE, sparse category ids) plus every
    defect the loader cleans: the labels hold what training would keep, crowd regions marked,
    the same mask pixels; the annotations are spilled in tiny batches and still come back whole."""
    source = shared_data / "coco_small_train"
    gt = json.loads((source / "instances_train2017.json").read_text())
    expected = add_defects(gt)
    (tmp_path / "train.json").write_text(json.dumps(gt))
    monkeypatch.setattr(convert, "SPILL_BYTES", 4000)
    summary = _convert(tmp_path / "train.json", source / "images", tmp_path / "labels", "--rows-per-file", "30")
    expected.pop("crowd")  # kept, marked iscrowd
    assert summary["annotations_dropped"] == dict(expected) and summary["images"] == 80
    assert summary["part_files"] == 3 and (tmp_path / "labels" / "_SUCCESS").exists()
    table = pq.read_table(tmp_path / "labels" / "part-000002.parquet")
    assert table.num_rows == 20 and table.schema.metadata[b"maskrcnn.schema_version"] == b"3"
    assert output.read_categories(str(tmp_path / "labels")) == coco.categories(gt, "x")
    _same_dataset(
        coco.load_coco(str(tmp_path / "train.json"), str(source / "images")),
        labels.load_dataset(str(tmp_path / "labels"), None),
    )


def test_keypoints_and_skeleton_survive_conversion(shared_data, tmp_path):
    source = shared_data / "coco_keypoints" / "super_gradients_train2017"
    _convert(source / "person_keypoints_train2017.json", source / "images", tmp_path / "labels")
    converted = labels.load_dataset(str(tmp_path / "labels"), None)
    original = coco.load_coco(str(source / "person_keypoints_train2017.json"), str(source / "images"))
    assert converted.keypoints is not None and len(converted.keypoints) == 17
    _same_dataset(original, converted)


def test_converted_labels_say_their_coordinates_are_the_stored_pixels(oriented_photos, tmp_path):
    """COCO's coordinates are the pixels as stored, whatever the EXIF orientation: the labels
    say ``stored`` and train on exactly what the COCO file does."""
    gt = oriented_photos(tmp_path / "images", [3, 6, 8], turned=False)
    (tmp_path / "instances.json").write_text(json.dumps(gt))
    _convert(tmp_path / "instances.json", tmp_path / "images", tmp_path / "labels")
    source = labels.open_labels(str(tmp_path / "labels"))
    assert source.orientation == output.STORED
    rules = labels.Rules(tuple((c["id"], c["name"]) for c in source.categories))
    converted, _, _ = labels.records(list(output.read_rows(source.source, labels.COLUMNS)), rules, source.orientation)
    original = coco.load_coco(str(tmp_path / "instances.json"), str(tmp_path / "images")).records
    assert len(converted) == len(original) == 3
    for a, b in zip(sorted(converted, key=lambda r: r["uri"]), sorted(original, key=lambda r: r["uri"])):
        assert a["orientation"] == b["orientation"] == output.STORED
        mine, theirs = data.load_example(a), data.load_example(b)
        assert mine["error"] == theirs["error"] == ""
        for key in ("image", "masks", "labels"):
            np.testing.assert_array_equal(mine[key], theirs[key])
    assert {r["orientation"] for r in labels.load_dataset(source.source, None).records} == {output.STORED}


def test_a_file_without_categories_names_them_by_id(shared_data, tmp_path):
    source = shared_data / "coco_tv_gallery"
    _convert(source / "instances.json", source / "images", tmp_path / "labels")
    categories = output.read_categories(str(tmp_path / "labels"))
    assert categories and all(c["name"] == f"category_{c['id']}" for c in categories)


def test_s3_to_s3(shared_data, bucket, tmp_path):
    upload_dir(shared_data / "coco_small", bucket, "coco")
    summary = _convert(
        f"s3://{bucket}/coco/instances_val2017.json", f"s3://{bucket}/coco/images", f"s3://{bucket}/labels"
    )
    assert summary["images"] == 80
    local = tmp_path / "labels"
    for uri in storage.iter_files(f"s3://{bucket}/labels"):
        (local / uri.rsplit("/", 1)[1]).parent.mkdir(exist_ok=True)
        (local / uri.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(uri))
    converted = labels.load_dataset(str(local), None)
    assert all(r["uri"].startswith(f"s3://{bucket}/coco/images/") for r in converted.records)
    original = coco.load_coco(str(shared_data / "coco_small" / "instances_val2017.json"), f"s3://{bucket}/coco/images")
    _same_dataset(original, converted)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "error: annotation file not found: .*nothing.json"),
        ("truncated", "error: .*train.json is not valid JSON"),
        ("twice", "error: .*labels already holds Parquet labels; pass --overwrite"),
        ("bad_rows", "error: --rows-per-file must be at least 1, got 0"),  # a usage error
    ],
)
def test_unusable_input_or_output_is_one_line_and_exit_2(case, message, shared_data, tmp_path):
    source = shared_data / "coco_small"
    text = (source / "instances_val2017.json").read_text()
    (tmp_path / "train.json").write_text(text[: len(text) // 2] if case == "truncated" else text)
    annotations = tmp_path / ("nothing.json" if case == "missing" else "train.json")
    if case == "twice":
        _convert(annotations, source / "images", tmp_path / "labels")
    extra = ["--rows-per-file", "0"] if case == "bad_rows" else []
    result = call_job(
        "coco_to_parquet.py", "--annotations", str(annotations), "--images", str(source / "images"),
        "--output", str(tmp_path / "labels"), *extra,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and (len(lines) == 1 or lines[0].startswith("usage:")), result.stderr
    assert re.search(message, lines[-1]), result.stderr
    if case == "twice":
        again = _convert(annotations, source / "images", tmp_path / "labels", "--overwrite")
        assert again["images"] == 80 and len(output.part_files(str(tmp_path / "labels"))) == 1


def test_help_explains_every_flag():
    result = call_job("coco_to_parquet.py", "--help")
    assert result.returncode == 0
    for flag in ("--annotations", "--images", "--output", "--rows-per-file", "--overwrite"):
        assert flag in result.stdout


def test_a_file_name_that_leaves_the_images_folder_becomes_an_error_row(coco_small, tmp_path):
    annotations, images = coco_small
    gt = json.loads(Path(annotations).read_text())
    gt["images"][0]["file_name"] = "../../../etc/hostname"
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    _convert(tmp_path / "gt.json", images, tmp_path / "out")
    rows = {r["uri"]: r for r in output.read_rows(str(tmp_path / "out"), columns=["uri", "error"])}
    assert rows["../../../etc/hostname"]["error"] == f"outside_root: '../../../etc/hostname' is not under {images}"
    assert sum(1 for r in rows.values() if r["error"]) == 1 and len(rows) == len(gt["images"])
