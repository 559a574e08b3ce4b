import json
from pathlib import Path

import pytest

from maskrcnn import history, storage
from tests.helpers import tensorboard_scalars


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_metrics_go_to_jsonl_and_tensorboard_and_resume_drops_later_steps(tmp_path):
    run = tmp_path / "run"
    h = history.History(str(run))
    for step in range(1, 6):
        h.log("train", step, {"loss": 1.0 / step, "lr": 0.01})
    h.log("val", 5, {"val_segm_AP": 0.25})
    h.close()
    lines = _lines((run / history.METRICS).read_text())
    assert [(x["kind"], x["step"]) for x in lines] == [("train", s) for s in range(1, 6)] + [("val", 5)]
    assert lines[1]["loss"] == 0.5 and lines[-1]["val_segm_AP"] == 0.25
    assert tensorboard_scalars(run / history.TENSORBOARD)["train/loss"] == [
        (s, pytest.approx(1.0 / s)) for s in range(1, 6)
    ]

    # A resume from the step-3 checkpoint redoes steps 4 and 5: they appear once, with their new values.
    h = history.History(str(run), resume_step=3)
    h.log("train", 4, {"loss": 9.0})
    h.close()
    lines = _lines((run / history.METRICS).read_text())
    assert [(x["step"], x["loss"]) for x in lines] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 9.0)]
    assert len(list((run / history.TENSORBOARD).iterdir())) == 2  # the new file purges steps > 3 when read


def test_history_on_s3_is_uploaded_on_flush(bucket):
    run = f"s3://{bucket}/runs/r"
    h = history.History(run)
    h.log("train", 1, {"loss": 2.0})
    assert not storage.exists(f"{run}/{history.METRICS}")  # staged locally until flushed
    h.flush()
    assert _lines(storage.read_text(f"{run}/{history.METRICS}"))[0]["loss"] == 2.0
    h.log("train", 2, {"loss": 1.0})
    h.close()
    assert [x["step"] for x in _lines(storage.read_text(f"{run}/{history.METRICS}"))] == [1, 2]
    assert any("/tensorboard/events.out.tfevents." in uri for uri in storage.iter_files(run))
    resumed = history.History(run, resume_step=1)  # reads the history back from S3
    resumed.close()
    assert [x["step"] for x in _lines(storage.read_text(f"{run}/{history.METRICS}"))] == [1]


def test_config_records_versions_and_commit(tmp_path):
    uri = history.write_config(str(tmp_path / "run"), {"epochs": 3, "scales": [128]})
    record = json.loads(Path(uri).read_text())
    assert record["config"] == {"epochs": 3, "scales": [128]}
    assert record["versions"]["torch"] and record["versions"]["ray"] and record["versions"]["maskrcnn-ray"]
    commit = record["git_commit"]  # this checkout is a git repository
    assert commit is None or len(commit.removesuffix("-dirty")) == 40
