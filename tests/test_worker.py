"""The training worker's loop (maskrcnn/worker.py) in this process, with Ray Train's calls
answered by a stand-in: epochs, validation, checkpoints, best.pt and an exact resume, in
seconds rather than in a Ray run. The Ray runs are tests/test_train.py's."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from maskrcnn import checkpoint, coco, worker
from maskrcnn.loading import LoadExample
from maskrcnn.train_config import TrainConfig, TrainingPlan

SMALL = "maskrcnn_resnet18_fpn_small"


class Shard:
    """Ray Data's shard, as the worker reads it: numpy batches of decoded examples."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def iter_batches(self, batch_size: int, **_: Any):
        for start in range(0, len(self.rows), batch_size):
            chunk = self.rows[start : start + batch_size]
            yield {k: [r[k] for r in chunk] for k in chunk[0]}


class RayTrain:
    """Ray Train's side of one worker (rank 0 of 1): its reports, and the checkpoints kept
    as Ray keeps them (a copy of each reported directory)."""

    def __init__(self, kept: Path, resume_from: str | None = None):
        self.kept, self.resume_from, self.reports = kept, resume_from, []

    def report(self, metrics: dict, checkpoint: Checkpoint | None = None, checkpoint_dir_name: str | None = None):
        if checkpoint is not None:
            shutil.copytree(checkpoint.path, self.kept / checkpoint_dir_name)
        self.reports.append((dict(metrics), checkpoint_dir_name if checkpoint else None))

    def get_checkpoint(self) -> Checkpoint | None:
        return Checkpoint.from_directory(self.resume_from) if self.resume_from else None


@pytest.fixture
def plan(shapes: Path, tmp_path: Path) -> tuple[TrainingPlan, list[dict]]:
    train = coco.load_coco(str(shapes / "train" / "annotations.json"), str(shapes / "train" / "images"))
    val = coco.load_coco(str(shapes / "val" / "annotations.json"), str(shapes / "val" / "images"))
    cfg = TrainConfig(
        train_annotations="unused", storage=str(tmp_path / "runs"), name="w", arch=SMALL, num_workers=1,
        batch_size=2, scales=(128,), max_size=192, epochs=2, log_every=1, checkpoint_every=3,
        warmup_steps=1, lr=0.01,
    )  # fmt: skip
    records = train.records[:8]  # 4 steps an epoch
    plan = TrainingPlan(
        cfg=cfg, classes=train.classes, category_ids=train.category_ids, images=len(records),
        steps_per_epoch=len(records) // cfg.batch_size, dropped={}, skipped_rows={}, val_dropped={},
        keypoints=None, sigmas=None, weights=None,
        val=[[dict(r, annotations="[]") for r in val.records[:4]], dict(val.gt, images=val.gt["images"][:4])],
    )  # fmt: skip
    load = LoadExample(128, 192)
    return plan, [load(r) for r in records]


def _run(plan: TrainingPlan, rows: list[dict], fake: RayTrain, monkeypatch) -> list[tuple[dict, str | None]]:
    class Context:
        def get_world_rank(self) -> int:
            return 0

        def get_world_size(self) -> int:
            return 1

    monkeypatch.setattr(ray.train, "get_context", Context)
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: Shard(rows))
    monkeypatch.setattr(ray.train, "get_checkpoint", fake.get_checkpoint)
    monkeypatch.setattr(ray.train, "report", fake.report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
    monkeypatch.setattr(ray, "get", lambda value: value)  # the plan holds values, not object refs
    worker.worker_loop({"plan": plan})
    return fake.reports


def test_two_epochs_validate_checkpoint_keep_the_best_and_resume_exactly(plan, tmp_path, monkeypatch, capsys):
    """Two epochs of 4 steps: a metric line and report each step, checkpoints at steps 3 and 6
    (``--checkpoint-every 3``) and at each epoch's end, validation after each epoch, best.pt.
    Then a worker resumed from step 3's checkpoint (mid-epoch) skips the batches it trained
    and gives steps 4..8 the losses that the run without the stop gave them."""
    plan, rows = plan
    (tmp_path / "whole").mkdir()
    reports = _run(plan, rows, RayTrain(tmp_path / "whole"), monkeypatch)
    losses = {m["step"]: m["loss"] for m, _ in reports if "loss" in m}
    assert sorted(losses) == list(range(1, 9)) and all(map(math.isfinite, losses.values()))
    kept = [name for _, name in reports if name]
    assert kept == ["checkpoint_00000003", "checkpoint_00000004", "checkpoint_00000006", "checkpoint_00000008"]
    last = checkpoint.load(str(tmp_path / "whole" / "checkpoint_00000008" / checkpoint.FILENAME))
    assert (last["step"], last["epoch"], last["arch"]) == (8, 2, SMALL) and "val_segm_AP" in last["metrics"]
    assert last["classes"] == plan.classes and last["train_state"]["optimizer"]["state"]
    best = checkpoint.load(os.path.join(plan.cfg.run_dir, "best.pt"))
    assert best["metrics"]["val_segm_AP"] == max(m["val_segm_AP"] for m, _ in reports if "val_segm_AP" in m)
    out = capsys.readouterr().out
    assert "[train] epoch 0 step 1/8 loss" in out and "IoU metric: segm" in out
    assert "finished at step 8 (epoch 2 of 2)" in out
    lines = [json.loads(line) for line in Path(plan.cfg.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == list(range(1, 9))
    assert [x["step"] for x in lines if x["kind"] == "val"] == [4, 8]

    shutil.rmtree(plan.cfg.run_dir)
    (tmp_path / "again").mkdir()
    at_step_3 = str(tmp_path / "whole" / "checkpoint_00000003")
    resumed = _run(plan, rows, RayTrain(tmp_path / "again", at_step_3), monkeypatch)
    again = {m["step"]: m["loss"] for m, _ in resumed if "loss" in m}
    assert sorted(again) == [4, 5, 6, 7, 8]
    assert again == pytest.approx({s: losses[s] for s in again}, rel=1e-5)
    assert "resumed from checkpoint at step 3 (epoch 0)" in capsys.readouterr().out
