"""Distributed Mask R-CNN training on Ray Train (``TorchTrainer``, DDP): the recipe.

1. The driver (:func:`run`) indexes the COCO files, reads ``--weights`` (downloading a
   weight name once) and fails fast on unusable input (:func:`prepare`), then builds the Ray
   Dataset whose CPU tasks fetch, decode and resize the images, and starts one ``TorchTrainer``.
2. Each worker (:func:`maskrcnn.worker.worker_loop`) builds the model (from the latest checkpoint
   when there is one, else from the driver's ``--weights``, through Ray's object store), wraps
   it in DDP, and for each epoch trains on its dataset shard
   (:meth:`~maskrcnn.worker.Worker.train_epoch`), evaluates COCO AP on the validation set
   (:meth:`~maskrcnn.worker.Worker.validate`), keeps ``best.pt`` and reports a checkpoint.

Where a run writes (all under ``STORAGE/NAME/``, local or S3):

- ``checkpoint_NNNNNNNN/model.pt``: Ray Train's checkpoints, by step (:meth:`~maskrcnn.worker.Worker.report`
  names them; Ray keeps the latest and the best two);
- ``best.pt``: the best validation score so far (mask AP; keypoint AP for Keypoint R-CNN),
  without optimizer state
  (:meth:`~maskrcnn.worker.Worker.keep_best`);
- ``config.json``, ``metrics.jsonl`` and TensorBoard events (:mod:`maskrcnn.history`).

Resume: Ray Train restores the latest checkpoint after a worker failure
(``FailureConfig``) and when the same ``--name`` and ``--storage`` are run again; the model
is rebuilt from the checkpoint's own architecture.

Reproducible: the data order is the seed's (Ray Data keeps it: ``preserve_order``), and the
random parts of a step (flip, scale, RPN and RoI sampling) draw from a generator seeded with
(seed, step, rank), so two runs with the same seed see the same data, and a run resumed from
any checkpoint goes on exactly as the uninterrupted one: a mid-epoch resume reads that epoch's
data from its start and skips the batches trained before the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from maskrcnn import checkpoint, data, history, keypoints, storage
from maskrcnn.cli import KEYPOINT_SIGMAS_HELP, floats, ints, option
from maskrcnn.engine import OPTIMIZERS
from maskrcnn.model import ARCHS, SMALL, default_sizes, has_keypoints
from maskrcnn.runtime import init_ray, without_false_alarms
from maskrcnn.worker import score_name, worker_loop

DATA, MODEL, RUN = "data (local paths or s3:// URIs)", "model", "run"
OPTIM, LOGS = "optimisation", "logging and checkpoints"


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a run is told; ``jobs/train.py``'s flags are these fields."""

    train_annotations: str = option("COCO instances JSON for training", group=DATA)
    train_images: str = option("directory holding the training images' file_names", group=DATA)
    val_annotations: str | None = option("COCO instances JSON evaluated after every epoch", None, group=DATA)
    val_images: str | None = option("directory holding the validation images", None, group=DATA)
    keypoint_sigmas: tuple[float, ...] | None = option(KEYPOINT_SIGMAS_HELP, None, group=DATA, type=floats)
    arch: str = option("architecture", SMALL, group=MODEL, choices=ARCHS)
    weights: str | None = option(
        "initial weights: a torchvision weight name (COCO_V1, MaskRCNN_ResNet50_FPN_Weights.COCO_V1, "
        "ResNet50_Weights.IMAGENET1K_V1), a .pth file or project checkpoint (path or s3://) (default: random)",
        None,
        group=MODEL,
    )
    scales: tuple[int, ...] | None = option(
        "training shortest-side sizes, comma-separated; the largest is used to evaluate "
        "(default: 256,288,320 for the small model, 640..800 for R50)",
        None,
        group=MODEL,
        type=ints,
    )
    max_size: int | None = option("longest-side cap (default: 512 small, 1333 R50)", None, group=MODEL)
    storage: str = option("directory or s3:// prefix for checkpoints", group=RUN)
    name: str = option("run name; re-using it resumes the run: STORAGE/NAME/", group=RUN)
    num_workers: int = option("data-parallel workers", 2, group=RUN)
    gpu: bool = option("one GPU per worker (NCCL); default: CPU workers (gloo)", False, group=RUN)
    cpus_per_worker: float = option("CPUs reserved per worker", 1.0, group=RUN)
    max_failures: int = option("restarts from the latest checkpoint after a worker dies", 3, group=RUN)
    epochs: int = option("passes over the training set", 12, group=OPTIM)
    batch_size: int = option("images per worker per step", 2, group=OPTIM)
    optimizer: str = option(
        "sgd (torchvision's recipe; fine-tuning) or adamw (faster from random weights)",
        "sgd",
        group=OPTIM,
        choices=OPTIMIZERS,
    )
    lr: float | None = option("base LR (default: SGD 0.02 x global batch / 16, AdamW 1e-4)", None, group=OPTIM)
    momentum: float = option("SGD momentum", 0.9, group=OPTIM)
    weight_decay: float = option("weight decay (both optimizers)", 1e-4, group=OPTIM)
    warmup_steps: int = option("linear warmup steps", 100, group=OPTIM)
    schedule: str = option(
        "decay after warmup: multistep (x0.1 at 2/3 and 8/9 of the steps) or cosine",
        "multistep",
        group=OPTIM,
        choices=("multistep", "cosine"),
    )
    clip_norm: float = option("gradient clipping norm; 0 disables", 10.0, group=OPTIM)
    amp: bool = option("disable mixed precision on GPU", True, group=OPTIM, flag="--no-amp")
    seed: int = option("seed of the model initialisation, the data order and the augmentation", 0, group=OPTIM)
    log_every: int = option("steps between metric lines", 20, group=LOGS)
    checkpoint_every: int = option("steps between checkpoints (also one after each epoch)", 500, group=LOGS)
    eval_every: int = option("epochs between validations; the last epoch is always evaluated", 1, group=LOGS)

    def __post_init__(self) -> None:
        """Checks that name a flag (the job turns them into usage errors), then absolute paths
        and the architecture's default sizes."""
        if bool(self.val_annotations) != bool(self.val_images):
            raise ValueError("--val-annotations and --val-images go together")
        for name in ("num_workers", "batch_size", "epochs", "log_every", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("train_annotations", "train_images", "val_annotations", "val_images", "storage"):
            if getattr(self, name):
                setattr(self, name, storage.absolute(getattr(self, name)))
        if self.weights and os.path.exists(self.weights):  # a local file, not a weight name
            self.weights = storage.absolute(self.weights)
        scales, max_size = default_sizes(self.arch)
        self.scales = tuple(sorted(int(s) for s in self.scales or scales))
        self.max_size = self.max_size or max_size

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)


# ---------------------------------------------------------------- the driver


def run(cfg: TrainConfig) -> ray.train.Result:
    """Train; return Ray Train's result (its ``checkpoint`` is the latest)."""
    train, meta, initial = prepare(cfg)
    init_ray(int(cfg.num_workers * cfg.cpus_per_worker) + 2)
    weights = [ray.put(initial)] if initial else None  # the workers read them here; none downloads
    del initial
    _announce(cfg, train, meta)
    records = list(train.records)
    random.Random(cfg.seed).shuffle(records)  # the data order is the seed's
    load = functools.partial(data.load_example, transform=data.resize_transform(max(cfg.scales), cfg.max_size))
    dataset = ray.data.from_items(records).map(load)
    fs, path = storage.filesystem(cfg.storage)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": cfg, "meta": meta, "weights": weights},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=cfg.name,  # with storage_path: the run's directory, STORAGE/NAME
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=score_name(cfg.arch), checkpoint_score_order="max"
            ),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
        # The same shard, in the same order, for each worker on every run.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    with without_false_alarms():
        return trainer.fit()


def prepare(cfg: TrainConfig) -> tuple[data.CocoDataset, dict[str, Any], list | None]:
    """Everything that can fail on bad input, before any worker starts; returns the training
    set, what the workers need to know of it, and the ``--weights`` tensors (None without)."""
    train = data.load_coco(cfg.train_annotations, cfg.train_images)
    storage.check_readable_dir(cfg.train_images)
    val_dropped: dict[str, int] = {}
    val_spec = None
    if cfg.val_annotations:
        val = data.load_coco(cfg.val_annotations, cfg.val_images)
        val_dropped, val_spec = dict(val.dropped), val.keypoints
        storage.check_readable_dir(cfg.val_images)
    steps_per_epoch = len(train.records) // cfg.num_workers // cfg.batch_size
    if steps_per_epoch == 0:
        raise data.DatasetError(
            f"{cfg.train_annotations}: {len(train.records)} images is fewer than one step "
            f"({cfg.num_workers} workers x batch {cfg.batch_size})"
        )
    initial = checkpoint.initial_weights(cfg.weights, cfg.arch) if cfg.weights else None
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
        **_keypoint_meta(cfg, train, val_spec),
    }
    return train, meta, initial


def _keypoint_meta(cfg: TrainConfig, train: data.CocoDataset, val_spec: keypoints.KeypointSpec | None) -> dict:
    """A keypoint model's keypoint names and skeleton (from the training set's category) and
    the OKS sigmas validation scores them with. A model without keypoints ignores them."""
    if not has_keypoints(cfg.arch):
        for record in train.records:
            record.pop("num_keypoints", None)
        return {"keypoints": None, "sigmas": None}
    spec = train.keypoints
    if spec is None:
        raise data.DatasetError(
            f"{cfg.train_annotations}: no category lists 'keypoints', which --arch {cfg.arch} needs"
        )
    if cfg.val_annotations and val_spec != spec:
        raise data.DatasetError(f"{cfg.val_annotations}: its keypoints differ from {cfg.train_annotations}'s")
    sigmas, warning = keypoints.sigmas(spec.names, cfg.keypoint_sigmas)
    if warning:
        print(f"[train] warning: {warning}", flush=True)
    return {"keypoints": spec.as_dict(), "sigmas": sigmas.tolist()}


def _announce(cfg: TrainConfig, train: data.CocoDataset, meta: dict[str, Any]) -> None:
    print(
        f"[train] {len(train.records)} images, {len(train.classes)} classes, {meta['steps_per_epoch']} steps/epoch "
        f"x {cfg.epochs} epochs on {cfg.num_workers} workers; dropped annotations: {meta['dropped'] or 'none'}",
        flush=True,
    )
    if cfg.val_annotations:
        print(f"[train] validation set: dropped annotations: {meta['val_dropped'] or 'none'}", flush=True)
    print(f"[train] configuration: {history.write_config(cfg.run_dir, dataclasses.asdict(cfg))}", flush=True)
