"""Looking after a labels dataset without a run: --repair of an older version's output."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskrcnn import checkpoint, labels, masks, output
from maskrcnn.coco import DatasetError
from tests.helpers import call_job, small_model_file


def _version_2_output(folder, model_id: str) -> None:
    """An output as version 2 wrote it: instances without iscrowd, and no _categories.json."""
    old_instance = pa.struct([f for f in output.INSTANCE if f.name != "iscrowd"])
    schema = pa.schema(
        [pa.field("instances", pa.list_(old_instance)) if f.name == "instances" else f for f in output.SCHEMA]
    )
    mask = masks.encode(np.ones((1, 60, 80), np.uint8))[0]
    instance = {"category_id": 5, "category": "b", "score": 0.9, "bbox": [0.0, 0.0, 80.0, 60.0], "mask": mask}
    row = {"uri": "/photos/a.jpg", "width": 80, "height": 60, "instances": [instance], "model": model_id, "error": None}
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=schema), folder / "part-000000.parquet")
    job = {"input": "/photos", "model": model_id, "rows_per_file": 1000, "schema_version": "2", "keypoints": None}
    (folder / "_job.json").write_text(json.dumps(job))


def test_an_older_output_is_repaired_from_its_model_and_then_trains(model_file, tmp_path):
    old = tmp_path / "old"
    _version_2_output(old, checkpoint.identity(checkpoint.load(model_file)))
    with pytest.raises(DatasetError, match="no _categories.json beside the part files"):
        labels.open_labels(str(old))

    other = small_model_file(tmp_path / "other.pt", classes=("x", "y"), category_ids=(1, 2))
    refused = call_job("segment_bucket.py", "--repair", str(old), "--model", other)
    assert refused.returncode == 2 and f"{old} was written by maskrcnn" in refused.stderr
    assert f", not {other} (" in refused.stderr
    refused = call_job("segment_bucket.py", "--repair", str(old))
    assert refused.returncode == 2 and "needs --model: the model that wrote it" in refused.stderr

    done = call_job("segment_bucket.py", "--repair", str(old), "--model", model_file)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"output": str(old), "repaired": ["_categories.json"]}
    source = labels.open_labels(str(old))
    assert [c["name"] for c in source.categories] == ["a", "b", "c"] and source.orientation == output.DISPLAYED
    gt = labels.read_coco(str(old))
    assert [a["category_id"] for a in gt["annotations"]] == [5] and gt["annotations"][0]["iscrowd"] == 0
    again = call_job("segment_bucket.py", "--repair", str(old), "--model", model_file)
    assert json.loads(again.stdout.splitlines()[-1])["repaired"] == []  # nothing left to repair
