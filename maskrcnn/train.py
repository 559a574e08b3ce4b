"""Distributed Mask R-CNN training on Ray Train (``TorchTrainer``, DDP).

The driver (:func:`run`) indexes the COCO files, fails fast on unusable input, builds the
Ray Dataset whose CPU tasks fetch, decode and augment images, and starts the trainer.
Each worker (:func:`worker_loop`) reads its dataset shard, steps the DDP model, reports
metrics, checkpoints, and evaluates COCO AP on the validation set after every epoch.

Resume: Ray Train restores the latest checkpoint after a worker failure
(``FailureConfig``) and when the same ``--name`` and ``--storage`` are run again.

Reproducible: the data order is the seed's (Ray Data keeps it: ``preserve_order``), and the
random parts of a step (flip, scale, RPN and RoI sampling) draw from a generator seeded with
(seed, step, rank), so two runs with the same seed see the same data, and a run resumed from
an end-of-epoch checkpoint goes on exactly as the uninterrupted one. (A resume from a
mid-epoch checkpoint re-reads that epoch's data from its start.)
Everything a run writes lives in ``STORAGE/NAME/``: Ray's ``checkpoint_*`` directories,
``best.pt``, and the history (:mod:`maskrcnn.history`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data import ExecutionOptions
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from maskrcnn import checkpoint, data, engine, history, storage
from maskrcnn.evaluate import EVAL_SCORE_THRESHOLD, as_metrics, evaluate, format_table, predict_records
from maskrcnn.model import SMALL, build_model, init_model
from maskrcnn.predictor import Predictor
from maskrcnn.progress import clock
from maskrcnn.runtime import init_ray, without_false_alarms

IMAGE_ERRORS = ("missing_image", "undecodable_image", "size_mismatch")
SCORE = "val_segm_AP"


@dataclass
class TrainConfig:
    train_annotations: str
    train_images: str
    storage: str
    name: str
    val_annotations: str | None = None
    val_images: str | None = None
    arch: str = SMALL
    weights: str | None = None
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 2  # images per worker per step
    epochs: int = 12
    lr: float | None = None  # None: SGD 0.02 * global batch / 16, AdamW 1e-4
    optimizer: str = "sgd"  # or "adamw"
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "multistep"
    clip_norm: float | None = 10.0
    amp: bool = True  # only ever enabled on GPU
    scales: tuple[int, ...] | None = None  # shortest-side choices; the largest is used to evaluate
    max_size: int | None = None
    checkpoint_every: int = 500  # steps; a checkpoint is also written after every epoch
    eval_every: int = 1  # epochs between validations; the last epoch is always evaluated
    log_every: int = 20
    max_failures: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_annotations", "train_images", "val_annotations", "val_images", "storage"):
            if getattr(self, name):
                setattr(self, name, storage.absolute(getattr(self, name)))
        if self.weights and os.path.exists(self.weights):  # a local file, not a weight name
            self.weights = storage.absolute(self.weights)
        if self.scales is None:
            self.scales = (256, 288, 320) if self.arch == SMALL else (640, 672, 704, 736, 768, 800)
        if self.max_size is None:
            self.max_size = 512 if self.arch == SMALL else 1333
        self.scales = tuple(sorted(int(s) for s in self.scales))

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)


# ---------------------------------------------------------------- worker side


class _Worker:
    """State of one training worker; the methods are the phases of :func:`worker_loop`."""

    def __init__(self, cfg: TrainConfig, meta: dict[str, Any]):
        self.cfg, self.meta = cfg, meta
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.amp = cfg.amp and self.device.type == "cuda"
        self.skipped: Counter = Counter()
        self.step, self.epoch, self.best = 0, 0, float("-inf")
        self.augment = data.train_transform(cfg.scales, cfg.max_size)
        self.val: data.CocoDataset | None = None
        self.schedule = engine.Schedule(
            base_lr=cfg.lr or engine.default_lr(cfg.optimizer, cfg.global_batch),
            total_steps=meta["steps_per_epoch"] * cfg.epochs,
            warmup_steps=min(cfg.warmup_steps, meta["steps_per_epoch"] * cfg.epochs // 4),
            kind=cfg.schedule,
        )
        self._build()
        self.first_step, self.start = self.step, time.perf_counter()
        self.history: history.History | None = None  # rank 0's, opened once there is work

    def _build(self) -> None:
        cfg, meta = self.cfg, self.meta
        torch.manual_seed(cfg.seed)
        restored = ray.train.get_checkpoint()
        state = None
        if restored:
            with restored.as_directory() as d:
                with open(os.path.join(d, checkpoint.FILENAME), "rb") as f:
                    state = checkpoint.from_bytes(f.read(), restored.path)
        if state:  # the checkpoint's own structure (e.g. frozen BN when it began from --weights)
            self.arch_kwargs = state["arch_kwargs"]
            model = build_model(cfg.arch, skip_resize=True, **self.arch_kwargs)
            model.load_state_dict(state["state_dict"])
        else:
            kwargs = {"num_classes": len(meta["classes"]) + 1, "min_size": cfg.scales, "max_size": cfg.max_size}
            model, self.arch_kwargs = init_model(cfg.arch, kwargs, cfg.weights, skip_resize=True)
        self.model = ray.train.torch.prepare_model(model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = engine.make_optimizer(
            cfg.optimizer, params, self.schedule.base_lr, cfg.momentum, cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        if state:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        self.step, self.epoch = state["step"], state["epoch"]
        self.best = state["metrics"].get("best_" + SCORE, float("-inf"))
        if state.get("train_state"):
            self.optimizer.load_state_dict(state["train_state"]["optimizer"])
            self.scaler.load_state_dict(state["train_state"]["scaler"])
        self.skipped.update(state["train_state"].get("skipped", {}) if state.get("train_state") else {})
        self.log(f"resumed from checkpoint at step {self.step} (epoch {self.epoch})")

    def log(self, message: str) -> None:
        # Written to stdout directly: Ray Train re-routes print() through its logger.
        if self.rank == 0:
            sys.stdout.write(f"[train] {message}\n")
            sys.stdout.flush()

    def record(self, kind: str, metrics: dict[str, float]) -> None:
        """Rank 0 appends to the run's history (metrics.jsonl and TensorBoard)."""
        if self.history:
            self.history.log(kind, self.step, metrics)
            self.history.flush()

    def _eta(self) -> str:
        done, left = self.step - self.first_step, self.schedule.total_steps - self.step
        elapsed = time.perf_counter() - self.start
        return f"elapsed {clock(elapsed)}, ETA {clock(left * elapsed / done) if done else '?'}"

    def _skipped_totals(self) -> dict[str, float]:
        counts = torch.tensor([float(self.skipped[k]) for k in IMAGE_ERRORS])
        if dist.is_initialized():
            dist.all_reduce(counts)
        totals = {f"skipped_{k}": float(v) for k, v in zip(IMAGE_ERRORS, counts)}
        totals.update({f"dropped_annotations_{k}": float(v) for k, v in self.meta["dropped"].items()})
        return totals

    def _checkpoint(self, metrics: dict[str, float]) -> dict:
        return checkpoint.make(
            self.model,
            arch=self.cfg.arch,
            arch_kwargs=self.arch_kwargs,
            classes=self.meta["classes"],
            category_ids=self.meta["category_ids"],
            step=self.step,
            epoch=self.epoch,
            metrics=metrics,
            train_state={
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "skipped": dict(self.skipped),
            },
        )

    def report(self, metrics: dict[str, float], with_checkpoint: bool) -> None:
        """Every worker calls this the same number of times (it is a barrier); only rank 0
        writes the checkpoint file."""
        metrics = dict(metrics, step=self.step, epoch=self.epoch, **self._skipped_totals())
        metrics.setdefault(SCORE, float("nan"))  # unevaluated checkpoints rank lowest
        if self.best > float("-inf"):
            metrics["best_" + SCORE] = self.best
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        name = f"checkpoint_{self.step:08d}"
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                checkpoint.save(os.path.join(tmp, checkpoint.FILENAME), self._checkpoint(metrics))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            else:
                ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)

    def train_epoch(self, shard: Any) -> dict[str, float]:
        """Train until the epoch's step count; return the epoch's global images/s."""
        cfg, spe = self.cfg, self.meta["steps_per_epoch"]
        start = self.step - self.epoch * spe  # > 0 when resuming mid-epoch
        batches = shard.iter_batches(
            batch_size=cfg.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=4 * cfg.batch_size,
            local_shuffle_seed=cfg.seed + self.epoch,
        )
        window_images, window_start = 0, time.perf_counter()
        epoch_images, epoch_start = 0, window_start
        self.model.train()
        for index, batch in enumerate(batches, start=start):
            if index >= spe:
                break
            rows = engine.usable_rows(batch, self.skipped)
            lr = self.schedule.lr(self.step)
            torch.manual_seed(step_seed(cfg.seed, self.step, self.rank))
            result = engine.train_step(
                self.model,
                self.optimizer,
                self.scaler,
                rows,
                self.device,
                lr=lr,
                clip_norm=cfg.clip_norm,
                amp=self.amp,
                step=self.step,
                augment=self.augment,
            )
            self.step += 1
            window_images += result.images
            epoch_images += result.images
            checkpoint_now = self.step % cfg.checkpoint_every == 0 and index + 1 < spe
            if self.step % cfg.log_every == 0:
                rate = window_images / (time.perf_counter() - window_start)
                metrics = dict(result.losses, lr=lr, images_per_s=rate)
                self.log(
                    f"epoch {self.epoch} step {self.step}/{self.schedule.total_steps} loss {result.losses['loss']:.4f} "
                    f"lr {lr:.5f} {rate:.1f} img/s, {self._eta()}"
                )
                self.record("train", metrics)
                self.report(metrics, with_checkpoint=checkpoint_now)
                window_images, window_start = 0, time.perf_counter()
            elif checkpoint_now:
                self.report(dict(result.losses, lr=lr), with_checkpoint=True)
        self.epoch += 1
        totals = {k: int(v) for k, v in self._skipped_totals().items() if v}
        rate = epoch_images / (time.perf_counter() - epoch_start)
        self.log(
            f"epoch {self.epoch} done at step {self.step}, {rate:.2f} img/s, {self._eta()}; "
            f"skipped images and dropped annotations: {totals or 'none'}"
        )
        return {"train_images_per_s": rate}

    def validate(self) -> dict[str, float]:
        """COCO AP on the validation set: each worker predicts its slice, rank 0 scores.
        The ground truth is cleaned by the training rules (:func:`maskrcnn.data.load_coco`)."""
        cfg = self.cfg
        if not cfg.val_annotations:
            return {}
        if self.val is None:
            self.val = data.load_coco(cfg.val_annotations, cfg.val_images)
        predictor = Predictor(
            getattr(self.model, "module", self.model),
            self.meta["classes"],
            self.meta["category_ids"],
            score_threshold=EVAL_SCORE_THRESHOLD,
            fp16=self.amp,
        )
        results, skipped = predict_records(predictor, self.val.records[self.rank :: self.world])
        gathered: list[Any] = [None] * self.world
        if dist.is_initialized():
            dist.all_gather_object(gathered, (results, dict(skipped)))
        else:
            gathered = [(results, dict(skipped))]
        self.model.train()
        if self.rank != 0:
            return {}
        all_results = [r for part, _ in gathered for r in part]
        scores = evaluate(self.val.gt, all_results, image_ids=[r["image_id"] for r in self.val.records])
        self.log(f"validation after epoch {self.epoch}:\n{format_table(scores)}")
        metrics = {f"val_{k}": v for k, v in as_metrics(scores).items()}
        metrics["val_skipped_images"] = float(sum(sum(s.values()) for _, s in gathered))
        metrics.update({f"val_dropped_annotations_{k}": float(v) for k, v in self.val.dropped.items()})
        self.record("val", metrics)
        return metrics

    def keep_best(self, metrics: dict[str, float]) -> None:
        """Rank 0 writes ``best.pt`` next to the run whenever the segm AP improves."""
        if self.rank != 0 or SCORE not in metrics or metrics[SCORE] <= self.best:
            return
        self.best = metrics[SCORE]
        uri = storage.join(self.cfg.run_dir, "best.pt")
        # No optimizer state: best.pt is for inference and fine-tuning, and AdamW's state would
        # triple the file every inference actor downloads. Resume uses Ray's checkpoints.
        best = dict(self._checkpoint(dict(metrics, **{"best_" + SCORE: self.best})), train_state=None)
        checkpoint.save(uri, best)
        self.log(f"new best {SCORE} {self.best:.4f} -> {uri}")


def worker_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    # Ray Train V2 logs every report at INFO ("Reporting training result ...") on a logger
    # named by its file path, which only the root logger's level governs. This job prints
    # its own progress, so the worker's root logger shows warnings and errors only.
    logging.getLogger().setLevel(logging.WARNING)
    cfg = TrainConfig(**config["cfg"])
    worker = _Worker(cfg, config["meta"])
    if worker.epoch >= cfg.epochs:
        worker.log(f"run already complete at step {worker.step} (epoch {worker.epoch}); nothing to do")
        return
    if worker.rank == 0:
        worker.history = history.History(cfg.run_dir, resume_step=worker.step)
    shard = ray.train.get_dataset_shard("train")
    while worker.epoch < cfg.epochs:
        metrics = worker.train_epoch(shard)
        if worker.epoch % cfg.eval_every == 0 or worker.epoch == cfg.epochs:
            metrics.update(worker.validate())
        worker.keep_best(metrics)
        worker.report(metrics, with_checkpoint=True)
    if worker.history:
        worker.history.close()
    worker.log(f"finished {cfg.epochs} epochs at step {worker.step}")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The generator seed of one worker's step: distinct per step and rank, fixed per run."""
    return (seed * 1_000_003 + step) * 4099 + rank


# ---------------------------------------------------------------- driver side


def prepare(cfg: TrainConfig) -> tuple[data.CocoDataset, dict[str, Any]]:
    """Everything that can fail on bad input, before any worker starts."""
    train = data.load_coco(cfg.train_annotations, cfg.train_images)
    storage.check_readable_dir(cfg.train_images)
    val_dropped: dict[str, int] = {}
    if cfg.val_annotations:
        if not cfg.val_images:
            raise data.DatasetError("--val-annotations needs --val-images")
        val_dropped = dict(data.load_coco(cfg.val_annotations, cfg.val_images).dropped)
        storage.check_readable_dir(cfg.val_images)
    per_worker = len(train.records) // cfg.num_workers
    steps_per_epoch = per_worker // cfg.batch_size
    if steps_per_epoch == 0:
        raise data.DatasetError(
            f"{cfg.train_annotations}: {len(train.records)} images is fewer than one step "
            f"({cfg.num_workers} workers x batch {cfg.batch_size})"
        )
    if storage.is_s3(cfg.storage):
        storage.check_readable_dir(cfg.storage)
    else:
        storage.make_dirs(cfg.storage)
    meta = {
        "classes": train.classes,
        "category_ids": train.category_ids,
        "steps_per_epoch": steps_per_epoch,
        "dropped": dict(train.dropped),
        "val_dropped": val_dropped,
    }
    return train, meta


def run(cfg: TrainConfig) -> ray.train.Result:
    train, meta = prepare(cfg)
    init_ray(int(cfg.num_workers * cfg.cpus_per_worker) + 2)
    print(
        f"[train] {len(train.records)} images, {len(train.classes)} classes, {meta['steps_per_epoch']} steps/epoch "
        f"x {cfg.epochs} epochs on {cfg.num_workers} workers; dropped annotations: {meta['dropped'] or 'none'}",
        flush=True,
    )
    if cfg.val_annotations:
        print(f"[train] validation set: dropped annotations: {meta['val_dropped'] or 'none'}", flush=True)
    print(f"[train] configuration: {history.write_config(cfg.run_dir, dataclasses.asdict(cfg))}", flush=True)
    records = list(train.records)
    random.Random(cfg.seed).shuffle(records)  # the data order is the seed's
    load = functools.partial(data.load_example, transform=data.resize_transform(max(cfg.scales), cfg.max_size))
    dataset = ray.data.from_items(records).map(load)
    fs, path = storage.filesystem(cfg.storage)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "meta": meta},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
        # The same shard, in the same order, for each worker on every run.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    with without_false_alarms():
        return trainer.fit()
