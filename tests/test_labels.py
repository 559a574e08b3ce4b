"""Parquet labels -> training records: the COCO rules, --min-score, and what is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskrcnn import data, labels, masks, output
from maskrcnn.coco import DatasetError
from tests.helpers import segmentation_labels

RULES = labels.Rules(((3, "cat"), (7, "dog")), None, min_score=0.5)


def _instance(score: float | None, category_id: int = 3, bbox=(10.0, 10.0, 20.0, 20.0), **extra) -> dict:
    mask = masks.encode(_box_mask(bbox))[0]
    return {"category_id": category_id, "category": "cat", "score": score, "bbox": list(bbox), "mask": mask, **extra}


def _box_mask(bbox) -> "np.ndarray":  # noqa: F821
    import numpy as np

    m = np.zeros((1, 60, 80), np.uint8)
    x, y, w, h = (int(v) for v in bbox)
    m[0, y : y + h, x : x + w] = 1
    return m


def _row(uri: str, instances: list[dict], model: str | None = "teacher", error: str | None = None) -> dict:
    return {"uri": uri, "width": 80, "height": 60, "instances": instances, "model": model, "error": error}


def test_pseudo_labels_keep_instances_at_or_above_min_score_and_skip_what_is_left_empty():
    rows = [
        _row("s3://a/1.jpg", [_instance(0.9), _instance(0.5, 7), _instance(0.49)]),
        _row("s3://a/2.jpg", [_instance(0.3)]),  # nothing confident: skipped
        _row("s3://a/3.jpg", []),  # the teacher found nothing: skipped
        _row("s3://a/4.jpg", [], error="decode_error: truncated"),
        _row("s3://a/5.jpg", [], model=None),  # ground truth without objects: a background image
        _row("s3://a/6.jpg", [_instance(None), _instance(None, iscrowd=True), _instance(None, 99)], model=None),
        _row("s3://a/7.jpg", [_instance(0.8, bbox=(79.5, 10.0, 20.0, 20.0)), _instance(0.7)]),
    ]
    records, dropped, skipped = labels.records(rows, RULES)
    assert [r["uri"] for r in records] == ["s3://a/1.jpg", "s3://a/5.jpg", "s3://a/6.jpg", "s3://a/7.jpg"]
    assert dropped == {"below_min_score": 2, "crowd": 1, "unknown_category": 1, "degenerate_box": 1}
    assert skipped == {"no_instances": 2, "error": 1}
    first = json.loads(records[0]["annotations"])
    assert [a["label"] for a in first] == [1, 2] and first[0]["box"] == [10.0, 10.0, 30.0, 30.0]
    assert masks.decode(first[0]["segmentation"], 60, 80).sum() == 400
    assert records[0]["image_id"] == labels.image_id("s3://a/1.jpg") != labels.image_id("s3://a/5.jpg")
    assert json.loads(records[1]["annotations"]) == []


def test_without_min_score_every_pseudo_label_trains():
    records, dropped, _ = labels.records([_row("a.jpg", [_instance(0.01)])], labels.Rules(((3, "cat"),)))
    assert len(json.loads(records[0]["annotations"])) == 1 and not dropped


def test_sources_must_agree_on_categories_by_id_and_name():
    labels.same_categories({"a": [{"id": 1, "name": "cat"}], "b": [{"id": 1, "name": "cat", "supercategory": "x"}]})
    with pytest.raises(DatasetError, match=r"^b: its categories differ from a's .*\(1, 'dog'\)"):
        labels.same_categories({"a": [{"id": 1, "name": "cat"}], "b": [{"id": 1, "name": "dog"}]})


def test_a_source_without_categories_or_part_files_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="no _categories.json beside the part files"):
        labels.open_labels(str(tmp_path))
    output.write_categories(str(tmp_path), [{"id": 3, "name": "cat"}])
    with pytest.raises(DatasetError, match="no part-NNNNNN.parquet files"):
        labels.open_labels(str(tmp_path))


def test_part_files_of_schema_version_2_still_read(tmp_path):
    """Version 2 instances had no iscrowd; they read as not crowd."""
    instance = _instance(0.9)
    old_instance = pa.struct([f for f in output.INSTANCE if f.name != "iscrowd"])
    schema = pa.schema(
        [f if f.name != "instances" else pa.field("instances", pa.list_(old_instance)) for f in output.SCHEMA]
    )
    pq.write_table(pa.Table.from_pylist([_row("a.jpg", [instance])], schema=schema), tmp_path / "part-000000.parquet")
    output.write_categories(str(tmp_path), [{"id": 3, "name": "cat"}])
    gt = labels.read_coco(str(tmp_path))
    (ann,) = gt["annotations"]
    assert ann["iscrowd"] == 0 and ann["score"] == pytest.approx(0.9)
    records, _, _ = labels.records(pq.read_table(tmp_path / "part-000000.parquet").to_pylist(), RULES)
    assert len(json.loads(records[0]["annotations"])) == 1


def test_a_reviewed_image_is_not_also_trained_from_its_pseudo_labels(tmp_path):
    """An image a person labelled (a COCO file's, or a ground-truth row) replaces its
    pseudo-labels; local paths match however they are written."""
    truth = str(tmp_path / "truth")
    output.write_part(truth, 0, [_row(str(tmp_path / "img" / "2.jpg"), [_instance(None)], model=None)])
    output.write_categories(truth, [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}])
    pseudo = str(tmp_path / "pseudo")
    output.write_part(pseudo, 0, [_row(str(tmp_path / "img" / "9.jpg"), [_instance(0.9)])])  # no null model
    output.write_categories(pseudo, [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}])
    coco_records = [{"uri": f"{tmp_path}/img/./sub/../1.jpg"}]
    reviewed = labels.reviewed_images(coco_records, [labels.open_labels(truth), labels.open_labels(pseudo)])
    assert len(reviewed) == 2
    rules = labels.Rules(RULES.categories, None, 0.5, reviewed)
    rows = [_row(str(tmp_path / "img" / f"{i}.jpg"), [_instance(0.9)]) for i in (1, 2, 3)]
    rows.append(_row(str(tmp_path / "img" / "2.jpg"), [_instance(None)], model=None))  # ground truth stays
    records, _, skipped = labels.records(rows, rules)
    assert [r["uri"].rsplit("/", 1)[1] for r in records] == ["3.jpg", "2.jpg"] and skipped == {"reviewed": 2}


EVERY_TURN = [2, 3, 4, 5, 6, 7, 8]  # every EXIF orientation but 1 (as stored)


def _decoded(source: str) -> dict[str, tuple[dict, dict]]:
    """A source's rows as training decodes them (its records, then :func:`data.load_example`),
    by the photo's coco_small name; no row is skipped."""
    opened = labels.open_labels(source)
    rules = labels.Rules(tuple((c["id"], c["name"]) for c in opened.categories))
    rows = list(output.read_rows(source, labels.COLUMNS))
    records, _, skipped = labels.records(rows, rules, opened.orientation)
    assert not skipped and len(records) == len(rows)
    return {Path(r["uri"]).stem.rsplit("-", 1)[0]: (r, data.load_example(r)) for r in records}


def _same_example(a: dict, b: dict) -> None:
    for key in ("image", "masks", "boxes", "labels"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_phone_photos_train_on_the_pixels_they_were_labelled_in(oriented_photos, tmp_path):
    """Photos stored turned, with the EXIF orientation that displays them upright, labelled by
    the segmentation job (as displayed): every one trains, none a size_mismatch, on exactly the
    pixels and masks of the same photos stored upright; a validation set of them decodes so too."""
    gt = oriented_photos(tmp_path / "phone", EVERY_TURN, turned=True)
    upright = oriented_photos(tmp_path / "upright", [1] * len(EVERY_TURN), turned=True)
    segmentation_labels(gt, str(tmp_path / "phone"), str(tmp_path / "phone-labels"))
    segmentation_labels(upright, str(tmp_path / "upright"), str(tmp_path / "upright-labels"))
    assert labels.open_labels(str(tmp_path / "phone-labels")).orientation == output.DISPLAYED
    phone, want = _decoded(str(tmp_path / "phone-labels")), _decoded(str(tmp_path / "upright-labels"))
    assert sorted(phone) == sorted(want) and len(phone) == len(EVERY_TURN)
    turn_of = {Path(img["file_name"]).stem.rsplit("-", 1)[0]: o for img, o in zip(gt["images"], EVERY_TURN)}
    for name, (record, row) in phone.items():
        assert record["orientation"] == output.DISPLAYED and row["error"] == "", name
        assert row["masks"], name  # packed: at least one mask
        _same_example(row, want[name][1])
        # decoded as stored, as training did before labels said their orientation: a quarter
        # turn no longer fits the labels, and a flip or half turn puts the masks on other pixels
        stored = data.load_example(dict(record, orientation=output.STORED))
        if turn_of[name] in (5, 6, 7, 8):
            assert stored["error"] == "size_mismatch", name
        else:
            assert stored["error"] == "" and not np.array_equal(stored["image"], row["image"]), name
    validation = labels.load_dataset(str(tmp_path / "phone-labels"), None)
    for record in validation.records:
        assert record["orientation"] == output.DISPLAYED
        name = Path(record["uri"]).stem.rsplit("-", 1)[0]
        _same_example(data.load_example(record), phone[name][1])


def test_labels_written_before_they_said_their_orientation_are_read_by_their_rows(tmp_path):
    """A ``_categories.json`` without ``orientation``: the segmentation job's rows (``model``
    set) were always displayed, jobs/coco_to_parquet.py's (ground truth) stored."""
    rows = [_row("s3://a/1.jpg", [_instance(0.9)]), _row("s3://a/2.jpg", [_instance(None)], model=None)]
    output.write_part(str(tmp_path), 0, rows)
    cats = [{"id": 3, "name": "cat"}]
    (tmp_path / output.CATEGORIES).write_text(json.dumps({"categories": cats}))
    old = labels.open_labels(str(tmp_path))
    assert old.orientation is None
    records, _, _ = labels.records(rows, RULES, old.orientation)
    by_row = [output.DISPLAYED, output.STORED]
    assert [r["orientation"] for r in records] == by_row
    assert [img["orientation"] for img in labels.read_coco(str(tmp_path))["images"]] == by_row
    output.write_categories(str(tmp_path), cats, output.STORED)
    said = labels.open_labels(str(tmp_path))
    records, _, _ = labels.records(rows, RULES, said.orientation)
    assert said.orientation == output.STORED and {r["orientation"] for r in records} == {output.STORED}
    (tmp_path / output.CATEGORIES).write_text(json.dumps({"categories": cats, "orientation": "upright"}))
    with pytest.raises(DatasetError, match="gives orientation 'upright'; it must be one of displayed, stored"):
        labels.open_labels(str(tmp_path))
