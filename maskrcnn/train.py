"""Distributed Mask R-CNN training on Ray Train (``TorchTrainer``, DDP): the recipe.

1. The driver (:func:`run`) indexes the COCO files, checks the Parquet labels (their
   categories, never their rows), reads ``--weights`` (downloading a weight name once) and
   fails fast on unusable input (:func:`prepare`); then it counts the Parquet labels in Ray
   Data tasks (:func:`count`), builds the Ray Dataset whose CPU tasks clean the labels and
   fetch, decode and resize the images (:func:`training_data`), and starts one ``TorchTrainer``.
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

Reproducible: the data order is the seed's (COCO records are shuffled on the driver; with
Parquet labels, every record is shuffled by Ray Data with the seed; ``preserve_order`` keeps
it), and the random parts of a step (flip, scale, RPN and RoI sampling) draw from a generator seeded with
(seed, step, rank), so two runs with the same seed see the same data, and a run resumed from
any checkpoint goes on exactly as the uninterrupted one: a mid-epoch resume reads that epoch's
data from its start and skips the batches trained before the checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from maskrcnn import checkpoint, data, history, keypoints, labels, storage
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

    train_annotations: str = option(
        "COCO instances JSON, or Parquet labels (a directory or prefix: a segmentation output, or "
        "jobs/coco_to_parquet.py's); several, comma-separated, train together",
        group=DATA,
    )
    train_images: str | None = option(
        "directory holding the COCO files' file_names (Parquet rows hold URIs)", None, group=DATA
    )
    min_score: float | None = option(
        "keep pseudo-label instances (Parquet rows with scores) scoring at least S; rows left with "
        "none are skipped (default: all)",
        None,
        group=DATA,
        metavar="S",
    )
    val_annotations: str | None = option(
        "COCO instances JSON or Parquet labels, evaluated after every epoch", None, group=DATA
    )
    val_images: str | None = option("directory holding the validation COCO file's images", None, group=DATA)
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
    max_steps: int | None = option(
        "stop after N steps (a quick trial), validated and checkpointed; the LR schedule stays the epochs'",
        None,
        group=OPTIM,
        metavar="N",
    )
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
        self.train_annotations = ",".join(storage.absolute(s) for s in self.train_sources)
        if not self.train_sources:
            raise ValueError("--train-annotations names no file or directory")
        if self.train_images is None and not all(map(labels.is_labels, self.train_sources)):
            raise ValueError("--train-images is needed with a COCO file in --train-annotations")
        if self.val_images and not self.val_annotations:
            raise ValueError("--val-images needs --val-annotations")
        if self.val_annotations and not self.val_images and not labels.is_labels(self.val_annotations):
            raise ValueError("--val-images is needed with a COCO file in --val-annotations")
        for name in ("num_workers", "batch_size", "epochs", "log_every", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        for name in ("train_images", "val_annotations", "val_images", "storage"):
            if getattr(self, name):
                setattr(self, name, storage.absolute(getattr(self, name)))
        if self.weights and os.path.exists(self.weights):  # a local file, not a weight name
            self.weights = storage.absolute(self.weights)
        scales, max_size = default_sizes(self.arch)
        self.scales = tuple(sorted(int(s) for s in self.scales or scales))
        self.max_size = self.max_size or max_size

    @property
    def train_sources(self) -> list[str]:
        return [s for s in self.train_annotations.split(",") if s]

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)


# ---------------------------------------------------------------- the driver


def run(cfg: TrainConfig) -> ray.train.Result:
    """Train; return Ray Train's result (its ``checkpoint`` is the latest)."""
    train, initial = prepare(cfg)
    init_ray(int(cfg.num_workers * cfg.cpus_per_worker) + 2)
    weights = [ray.put(initial)] if initial else None  # the workers read them here; none downloads
    del initial
    val = _shared_validation(train)
    meta = count(cfg, train)
    _announce(cfg, train, meta)
    dataset = training_data(cfg, train)
    train.records.clear()  # in Ray's object store now
    fs, path = storage.filesystem(cfg.storage)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": cfg, "meta": meta, "weights": weights, "val": val},
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


@dataclass
class TrainingSet:
    """What the driver keeps of the training sources: the COCO files' records (their ground
    truth is dropped once indexed), the Parquet labels (never read here), and their categories."""

    categories: list[dict[str, Any]]
    rules: labels.Rules
    records: list[dict[str, Any]]
    sources: list[labels.Labels]
    dropped: Counter
    val: data.CocoDataset | None  # indexed once, here; the workers get it from Ray's object store
    sigmas: list[float] | None  # the OKS sigmas validation scores keypoints with
    cleaned: labels.Cleaned | None = None  # with Parquet labels: every record, cleaned (see count)


def prepare(cfg: TrainConfig) -> tuple[TrainingSet, list | None]:
    """Everything that can fail on bad input before Ray starts; returns the training set and
    the ``--weights`` tensors (None without)."""
    found: dict[str, list[dict]] = {}
    records, dropped, sources = [], Counter(), []
    for source in cfg.train_sources:
        if labels.is_labels(source):
            sources.append(labels.open_labels(source))
            found[source] = sources[-1].categories
            continue
        coco = data.load_coco(source, cfg.train_images)
        records += coco.records
        dropped.update(coco.dropped)
        found[source] = coco.gt["categories"]
        del coco  # its ground truth: evaluation scores the validation set's only
    if cfg.train_images and not all(map(labels.is_labels, cfg.train_sources)):
        storage.check_readable_dir(cfg.train_images)
    labels.same_categories(found)
    if not sources:
        _steps_per_epoch(cfg, len(records))
    categories = next(iter(found.values()))
    val = None
    if cfg.val_annotations:
        val = labels.load_dataset(cfg.val_annotations, cfg.val_images)
        if cfg.val_images:
            storage.check_readable_dir(cfg.val_images)
    initial = checkpoint.initial_weights(cfg.weights, cfg.arch) if cfg.weights else None
    if storage.is_s3(cfg.storage):
        storage.check_readable_dir(cfg.storage)
    else:
        storage.make_dirs(cfg.storage)
    spec = _keypoints(cfg, categories)
    if spec and val and val.keypoints != spec:
        raise data.DatasetError(f"{cfg.val_annotations}: its keypoints differ from {cfg.train_sources[0]}'s")
    if spec is None:
        for record in records:
            record.pop("num_keypoints", None)
    cats = tuple((c["id"], c["name"]) for c in categories)
    rules = labels.Rules(cats, spec, cfg.min_score)
    return TrainingSet(categories, rules, records, sources, dropped, val, _sigmas(cfg, spec)), initial


def _shared_validation(train: TrainingSet) -> list[ray.ObjectRef] | None:
    """The validation set in Ray's object store, once: the images every worker predicts its
    share of, and the ground truth rank 0 scores against. (A list, so Ray passes the references.)"""
    if train.val is None:
        return None
    images = [dict(r, annotations="[]") for r in train.val.records]  # what prediction reads
    return [ray.put(images), ray.put(train.val.gt)]


def _keypoints(cfg: TrainConfig, categories: list[dict]) -> keypoints.KeypointSpec | None:
    """A keypoint model's keypoint names and skeleton (the training set's category); None
    for a model without keypoints, which ignores them."""
    if not has_keypoints(cfg.arch):
        return None
    spec = keypoints.spec_of(categories, cfg.train_sources[0])
    if spec is None:
        raise data.DatasetError(f"{cfg.train_sources[0]}: no category lists 'keypoints', which --arch {cfg.arch} needs")
    return spec


def _sigmas(cfg: TrainConfig, spec: keypoints.KeypointSpec | None) -> list[float] | None:
    if spec is None:
        return None
    sigmas, warning = keypoints.sigmas(spec.names, cfg.keypoint_sigmas)
    if warning:
        print(f"[train] warning: {warning}", flush=True)
    return sigmas.tolist()


def count(cfg: TrainConfig, train: TrainingSet) -> dict[str, Any]:
    """What the workers need to know of the training set. Parquet labels are cleaned here,
    once, in Ray Data tasks that keep the records in Ray's object store (:func:`maskrcnn.labels.clean`)."""
    images, dropped, skipped = len(train.records), Counter(train.dropped), Counter()
    if train.sources:
        train.cleaned = labels.clean(train.sources, train.rules, train.records)
        images = train.cleaned.images
        dropped.update(train.cleaned.dropped)
        skipped.update(train.cleaned.skipped)
    steps_per_epoch = _steps_per_epoch(cfg, images)
    spec = train.rules.keypoints
    return {
        "classes": [c["name"] for c in train.categories],
        "category_ids": [c["id"] for c in train.categories],
        "images": images,
        "steps_per_epoch": steps_per_epoch,
        "dropped": dict(dropped),
        "skipped_rows": dict(skipped),
        "val_dropped": dict(train.val.dropped) if train.val else {},
        "keypoints": spec.as_dict() if spec else None,
        "sigmas": train.sigmas,
    }


def _steps_per_epoch(cfg: TrainConfig, images: int) -> int:
    steps = images // cfg.num_workers // cfg.batch_size
    if steps == 0:
        raise data.DatasetError(
            f"{cfg.train_annotations}: {images} images is fewer than one step "
            f"({cfg.num_workers} workers x batch {cfg.batch_size})"
        )
    return steps


def training_data(cfg: TrainConfig, train: TrainingSet) -> ray.data.Dataset:
    """The records in the seed's order, then fetched, decoded and resized by Ray Data CPU tasks.
    COCO files alone are shuffled here; with Parquet labels, Ray Data orders every record
    (:func:`maskrcnn.labels.shuffled`), so nothing gathers them on the driver."""
    if train.cleaned:
        dataset = labels.shuffled(train.cleaned, cfg.seed)
    else:
        records = list(train.records)
        random.Random(cfg.seed).shuffle(records)  # the data order is the seed's
        dataset = ray.data.from_items(records)
    load = functools.partial(data.load_example, transform=data.resize_transform(max(cfg.scales), cfg.max_size))
    return dataset.map(load)


def _announce(cfg: TrainConfig, train: TrainingSet, meta: dict[str, Any]) -> None:
    print(
        f"[train] {meta['images']} images, {len(meta['classes'])} classes, {meta['steps_per_epoch']} steps/epoch "
        f"x {cfg.epochs} epochs on {cfg.num_workers} workers; dropped annotations: {meta['dropped'] or 'none'}"
        + (f"; skipped label rows: {meta['skipped_rows'] or 'none'}" if train.sources else ""),
        flush=True,
    )
    if cfg.val_annotations:
        print(f"[train] validation set: dropped annotations: {meta['val_dropped'] or 'none'}", flush=True)
    print(f"[train] configuration: {history.write_config(cfg.run_dir, dataclasses.asdict(cfg))}", flush=True)
