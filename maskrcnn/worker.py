"""What each Ray Train worker runs (:func:`worker_loop`): build the model, then for each
epoch train on this worker's dataset shard, validate, keep ``best.pt`` and report a
checkpoint. :mod:`maskrcnn.train` holds the recipe and the driver; :mod:`maskrcnn.engine`
the step itself."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from pycocotools.coco import COCO
from ray.train import Checkpoint

from maskrcnn import checkpoint, coco, data, devices, engine, history, storage, transforms
from maskrcnn.metric import as_metrics, coco_api, format_table
from maskrcnn.model import has_keypoints, has_masks, init_model, iou_types
from maskrcnn.progress import Progress
from maskrcnn.train_config import TrainingPlan

UNEVALUATED = -1.0  # the score Ray ranks a checkpoint by before any validation


def score_name(arch: str) -> str:
    """The validation metric that picks ``best.pt`` and the checkpoints Ray keeps: mask AP,
    or keypoint AP for a model without masks."""
    return "val_segm_AP" if has_masks(arch) else "val_keypoints_AP"


def worker_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    # Ray Train V2 logs every report at INFO ("Reporting training result ...") on a logger
    # named by its file path, which only the root logger's level governs. This job prints
    # its own progress, so the worker's root logger shows warnings and errors only.
    logging.getLogger().setLevel(logging.WARNING)
    worker = Worker(config["plan"])
    cfg = worker.cfg
    if worker.finished:
        worker.log(f"run already complete at step {worker.step} (epoch {worker.epoch}); nothing to do")
        return
    if worker.rank == 0:
        worker.history = history.History(cfg.run_dir, resume_step=worker.step)
    shard = ray.train.get_dataset_shard("train")
    while not worker.finished:
        metrics = worker.train_epoch(shard)
        if worker.epoch % cfg.eval_every == 0 or worker.finished:
            metrics.update(worker.validate())
        worker.keep_best(metrics)
        worker.report(metrics, with_checkpoint=True)
    if worker.history:
        worker.history.close()
    worker.log(f"finished at step {worker.step} (epoch {worker.epoch} of {cfg.epochs})")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The generator seed of one worker's step: distinct per step and rank, fixed per run."""
    return (seed * 1_000_003 + step) * 4099 + rank


class Worker:
    """State of one training worker; the methods are the phases of :func:`worker_loop`."""

    def __init__(self, plan: TrainingPlan):
        self.plan = plan
        self.cfg = cfg = plan.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.amp = cfg.amp and self.device.type == "cuda"
        self.skipped: Counter = Counter()
        self.step, self.epoch, self.best = 0, 0, float("-inf")
        self.keypoints = plan.keypoints
        self.augment = transforms.Augment(cfg.scales, cfg.max_size, self.keypoints)
        self.val: coco.CocoIndex | None = None
        self.val_api: COCO | None = None
        self.schedule = engine.Schedule(
            base_lr=cfg.lr or engine.default_lr(cfg.optimizer, cfg.global_batch),
            total_steps=plan.steps_per_epoch * cfg.epochs,
            warmup_steps=plan.warmup_steps,
            kind=cfg.schedule,
        )
        torch.manual_seed(cfg.seed)
        restored = self._restored()
        model = checkpoint.build(restored, skip_resize=True) if restored else self._initial_model()
        self.score = score_name(self.arch)
        if devices.sync_batch_norm(cfg.sync_bn, model, self.device):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.log(f"batch norm synchronised across the {self.world} workers (--sync-bn {cfg.sync_bn})")
        self.model = ray.train.torch.prepare_model(model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = engine.make_optimizer(
            cfg.optimizer, params, self.schedule.base_lr, cfg.momentum, cfg.weight_decay
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        if restored:
            self._resume(restored)
        self.progress = Progress("train", plan.last_step - self.step, unit="steps")
        self.history: history.History | None = None  # rank 0's, opened once there is work

    def _restored(self) -> dict[str, Any] | None:
        """The latest checkpoint of this run (after a failure, or a re-run), or None."""
        restored = ray.train.get_checkpoint()
        if not restored:
            return None
        with restored.as_directory() as d:
            ckpt = checkpoint.load(os.path.join(d, checkpoint.FILENAME))
        if ckpt["arch"] != self.cfg.arch:
            self.log(f"the run's checkpoints are {ckpt['arch']}; --arch {self.cfg.arch} does not apply")
        self.arch, self.arch_kwargs = ckpt["arch"], ckpt["arch_kwargs"]
        return ckpt

    def _initial_model(self) -> torch.nn.Module:
        cfg = self.cfg
        kwargs = {"num_classes": len(self.plan.classes) + 1, "min_size": cfg.scales, "max_size": cfg.max_size}
        if has_keypoints(cfg.arch):
            kwargs["num_keypoints"] = len(self.keypoints)
        loaded = ray.get(self.plan.weights[0]) if self.plan.weights else None
        model, self.arch_kwargs = init_model(cfg.arch, kwargs, cfg.weights, skip_resize=True, loaded=loaded)
        self.arch = cfg.arch
        return model

    def _resume(self, ckpt: dict[str, Any]) -> None:
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.best = ckpt["metrics"].get("best_" + self.score, float("-inf"))
        if ckpt.get("train_state"):
            self.optimizer.load_state_dict(ckpt["train_state"]["optimizer"])
            self.scaler.load_state_dict(ckpt["train_state"]["scaler"])
            self.skipped.update(ckpt["train_state"].get("skipped", {}))
        self.log(f"resumed from checkpoint at step {self.step} (epoch {self.epoch})")

    @property
    def finished(self) -> bool:
        """All epochs done, or ``--max-steps`` reached."""
        return self.epoch >= self.cfg.epochs or self.step >= self.plan.last_step

    def log(self, message: str) -> None:
        # Written to stdout directly: Ray Train re-routes print() through its logger.
        if self.rank == 0:
            sys.stdout.write(f"[train] {message}\n")
            sys.stdout.flush()

    def train_epoch(self, shard: Any) -> dict[str, float]:
        """Train until the epoch's step count; return the epoch's global images/s."""
        cfg, spe = self.cfg, self.plan.steps_per_epoch
        start = self.step - self.epoch * spe  # > 0 when resuming mid-epoch
        stream = shard.iter_batches(
            batch_size=cfg.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=4 * cfg.batch_size,
            local_shuffle_seed=cfg.seed + self.epoch,
        )
        batches = transforms.batches(stream, cfg.batch_size)  # landscape with landscape, portrait with portrait
        window_images, window_start = 0, time.perf_counter()
        epoch_images, epoch_start = 0, window_start
        self.model.train()
        for index, batch in enumerate(batches):
            if index < start:  # trained before the checkpoint this run resumed from: the same batch, in order
                continue
            if index >= spe or self.step >= self.plan.last_step:
                break
            result, lr = self._step(batch)
            window_images += result.images
            epoch_images += result.images
            checkpoint_now = self.step % cfg.checkpoint_every == 0 and index + 1 < spe and not self.finished
            if self.step % cfg.log_every == 0:
                rate = window_images / (time.perf_counter() - window_start)
                metrics = dict(result.losses, lr=lr, images_per_s=rate)
                self.log(
                    f"epoch {self.epoch} step {self.step}/{self.schedule.total_steps} "
                    f"loss {result.losses['loss']:.4f} lr {lr:.5f} {rate:.1f} img/s, {self.progress.timing()}"
                )
                self.record("train", metrics)
                self.report(metrics, with_checkpoint=checkpoint_now)
                window_images, window_start = 0, time.perf_counter()
            elif checkpoint_now:
                self.report(dict(result.losses, lr=lr), with_checkpoint=True)
        stopped = self.step >= self.plan.last_step and self.step < (self.epoch + 1) * spe  # --max-steps, mid-epoch
        if not stopped:
            self.epoch += 1
        totals = {k: int(v) for k, v in self._skipped_totals().items() if v}
        rate = epoch_images / (time.perf_counter() - epoch_start)
        done = f"stopped by --max-steps in epoch {self.epoch + 1}" if stopped else f"epoch {self.epoch} done"
        self.log(
            f"{done} at step {self.step}, {rate:.2f} img/s, {self.progress.timing()}; "
            f"skipped images and dropped annotations: {totals or 'none'}"
        )
        return {"train_images_per_s": rate}

    def _step(self, batch: list[dict[str, Any]]) -> tuple[engine.StepResult, float]:
        """One optimizer step on this worker's batch, its randomness seeded by (seed, step, rank)."""
        lr = self.schedule.lr(self.step)
        torch.manual_seed(step_seed(self.cfg.seed, self.step, self.rank))
        result = engine.train_step(
            self.model,
            self.optimizer,
            self.scaler,
            engine.usable_rows(batch, self.skipped),
            self.device,
            lr=lr,
            clip_norm=self.cfg.clip_norm or None,
            amp=self.amp,
            step=self.step,
            augment=self.augment,
        )
        self.step += 1
        self.progress.add(1, quiet=True)
        return result, lr

    def validate(self) -> dict[str, float]:
        """COCO AP on the validation set (:func:`maskrcnn.engine.validate`): every worker predicts
        and matches its share, rank 0 merges and scores. The ground truth is cleaned by the
        training rules (:func:`maskrcnn.coco.load_coco`)."""
        if not self.plan.val:
            return {}
        if self.val is None:
            self.val, self.val_api = self._validation_set()
        start = time.perf_counter()
        model = getattr(self.model, "module", self.model)
        scored = engine.validate(
            model,
            self.val,
            self.val_api,
            self.rank,
            self.world,
            amp=self.amp,
            iou_types=iou_types(self.arch),
            sigmas=self.plan.sigmas,
        )
        self.model.train()
        if scored is None:
            return {}
        scores, skipped = scored
        seconds = time.perf_counter() - start
        self.log(f"validation after epoch {self.epoch} ({seconds:.1f} s):\n{format_table(scores)}")
        metrics = {f"val_{k}": v for k, v in as_metrics(scores).items()}
        metrics["val_skipped_images"] = float(sum(skipped.values()))
        metrics["val_seconds"] = seconds
        metrics.update({f"val_dropped_annotations_{k}": float(v) for k, v in self.val.dropped.items()})
        self.record("val", metrics)
        return metrics

    def _validation_set(self) -> tuple[coco.CocoIndex, COCO]:
        """The driver's validation set, and its ground truth indexed for scoring: every
        worker matches the images it predicts."""
        images, gt = self.plan.val
        val = coco.CocoIndex(
            gt={},  # kept once, indexed
            classes=self.plan.classes,
            category_ids=self.plan.category_ids,
            records=ray.get(images),
            dropped=Counter(self.plan.val_dropped),
        )
        return val, coco_api(ray.get(gt))

    def keep_best(self, metrics: dict[str, float]) -> None:
        """Rank 0 writes ``STORAGE/NAME/best.pt`` whenever the score (:func:`score_name`) improves."""
        if self.rank != 0 or self.score not in metrics or metrics[self.score] <= self.best:
            return
        self.best = metrics[self.score]
        uri = storage.join(self.cfg.run_dir, "best.pt")
        # No optimizer state: best.pt is for inference and fine-tuning, and AdamW's state would
        # triple the file every inference actor downloads. Resume uses Ray's checkpoints.
        best = dict(self._checkpoint(dict(metrics, **{"best_" + self.score: self.best})), train_state=None)
        checkpoint.save(uri, best)
        self.log(f"new best {self.score} {self.best:.4f} -> {uri}")

    def report(self, metrics: dict[str, float], with_checkpoint: bool) -> None:
        """Every worker calls this the same number of times (it is a barrier); only rank 0
        writes the checkpoint file, which Ray Train copies to
        ``STORAGE/NAME/checkpoint_NNNNNNNN/model.pt`` (NNNNNNNN: the step)."""
        metrics = dict(metrics, step=self.step, epoch=self.epoch, **self._skipped_totals())
        if self.best > float("-inf"):
            metrics["best_" + self.score] = self.best
        # Ray ranks the checkpoints by --arch's score (not this one when a run resumes with
        # another --arch than its checkpoints'); unevaluated ones rank lowest, at COCO's -1.
        # Not NaN: Ray's checkpoint snapshot (JSON) stores NaN as null, and a re-run that
        # restores it then fails to rank its next checkpoint.
        reported = {name: UNEVALUATED for name in {self.score, score_name(self.cfg.arch)}} | metrics
        if not with_checkpoint:
            ray.train.report(reported)
            return
        name = f"checkpoint_{self.step:08d}"
        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                checkpoint.save(os.path.join(tmp, checkpoint.FILENAME), self._checkpoint(metrics))
                ray.train.report(reported, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            else:
                ray.train.report(reported, checkpoint=None, checkpoint_dir_name=name)

    def _checkpoint(self, metrics: dict[str, float]) -> dict:
        return checkpoint.make(
            self.model,
            arch=self.arch,
            arch_kwargs=self.arch_kwargs,
            classes=self.plan.classes,
            category_ids=self.plan.category_ids,
            step=self.step,
            epoch=self.epoch,
            metrics=metrics,
            keypoints=self.keypoints if has_keypoints(self.arch) else None,
            train_state={
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "skipped": dict(self.skipped),
            },
        )

    def _skipped_totals(self) -> dict[str, float]:
        """Images skipped by kind (summed over workers) and annotations dropped, as metrics."""
        counts = devices.all_reduce([self.skipped[k] for k in data.IMAGE_ERRORS], self.device)
        totals = {f"skipped_{k}": float(v) for k, v in zip(data.IMAGE_ERRORS, counts)}
        totals.update({f"dropped_annotations_{k}": float(v) for k, v in self.plan.dropped.items()})
        totals.update({f"skipped_label_rows_{k}": float(v) for k, v in self.plan.skipped_rows.items()})
        return totals

    def record(self, kind: str, metrics: dict[str, float]) -> None:
        """Rank 0 appends to the run's history (metrics.jsonl and TensorBoard)."""
        if self.history:
            self.history.log(kind, self.step, metrics)
            self.history.flush()
