"""What a training run is told (:class:`TrainConfig`, the flags of ``jobs/train.py``) and
what the driver tells each of its workers (:class:`TrainingPlan`): the contract between
:mod:`maskrcnn.train` and :mod:`maskrcnn.worker`, so that neither imports the other's internals."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from maskrcnn import labels, storage
from maskrcnn.config import ints, keypoint_sigmas_option, option
from maskrcnn.engine import OPTIMIZERS, default_warmup_steps
from maskrcnn.keypoints import KeypointSpec
from maskrcnn.model import ARCHS, SMALL, default_sizes

DATA, MODEL, RUN = "data (local paths or s3:// URIs)", "model", "run"
OPTIM, LOGS = "optimisation", "logging and checkpoints"
SYNC_BN = ("auto", "on", "off")


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
        "keep pseudo-label instances (Parquet rows with scores) scoring at least S; rows left with none are skipped",
        None,
        group=DATA,
        default_text="all",
        metavar="S",
    )
    val_annotations: str | None = option(
        "COCO instances JSON or Parquet labels, evaluated after every epoch", None, group=DATA
    )
    val_images: str | None = option("directory holding the validation COCO file's images", None, group=DATA)
    keypoint_sigmas: tuple[float, ...] | None = keypoint_sigmas_option(DATA)
    arch: str = option("architecture", SMALL, group=MODEL, choices=ARCHS)
    weights: str | None = option(
        "initial weights: a torchvision weight name (COCO_V1, MaskRCNN_ResNet50_FPN_Weights.COCO_V1, "
        "ResNet50_Weights.IMAGENET1K_V1), a .pth file or project checkpoint (path or s3://)",
        None,
        group=MODEL,
        default_text="random",
    )
    scales: tuple[int, ...] | None = option(
        "training shortest-side sizes, comma-separated; the largest is used to evaluate",
        None,
        group=MODEL,
        default_text="256,288,320 for the small model, 640..800 for R50",
        type=ints,
    )
    max_size: int | None = option("longest-side cap", None, group=MODEL, default_text="512 small, 1333 R50")
    storage: str = option("directory or s3:// prefix for checkpoints", group=RUN)
    name: str = option("run name; re-using it resumes the run: STORAGE/NAME/", group=RUN)
    num_workers: int = option("data-parallel workers", 2, group=RUN)
    gpu: bool = option("one GPU per worker (NCCL); default: CPU workers (gloo)", False, group=RUN)
    sync_bn: str = option(
        "synchronise batch norm across the GPU workers: auto (with --gpu, for a model whose batch norm learns), "
        "on, off",
        "auto",
        group=RUN,
        choices=SYNC_BN,
    )
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
    lr: float | None = option("base LR", None, group=OPTIM, default_text="SGD 0.02 x global batch / 16, AdamW 1e-4")
    momentum: float = option("SGD momentum", 0.9, group=OPTIM)
    weight_decay: float = option("weight decay (both optimizers)", 1e-4, group=OPTIM)
    warmup_steps: int | None = option(
        "linear warmup steps, at most a quarter of the run's steps (a shorter run warms up for that quarter)",
        None,
        group=OPTIM,
        default_text="625 x global batch / 32, from 100 to 625",
    )
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
        if self.sync_bn == "on" and not self.gpu:
            raise ValueError("--sync-bn on needs --gpu: batch norm synchronises across GPU workers only")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be at least 0, got {self.warmup_steps}")
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


@dataclass(frozen=True)
class TrainingPlan:
    """What the driver tells every worker (Ray Train's ``train_loop_config`` carries it)."""

    cfg: TrainConfig
    classes: list[str]  # label i+1 -> classes[i]; label 0 is background
    category_ids: list[int]  # label i+1 -> category_ids[i]
    images: int  # the training images of one epoch
    steps_per_epoch: int
    dropped: dict[str, int]  # training annotations not trained on, by reason
    skipped_rows: dict[str, int]  # Parquet label rows not trained on, by reason
    val_dropped: dict[str, int]  # validation annotations not scored, by reason
    keypoints: KeypointSpec | None  # a keypoint model's keypoint names and skeleton
    sigmas: list[float] | None  # the OKS sigmas validation scores keypoints with
    weights: list[ray.ObjectRef] | None = None  # the driver's --weights tensors, in the object store
    val: list[ray.ObjectRef] | None = None  # the validation images and ground truth, in the object store

    @property
    def wanted_warmup_steps(self) -> int:
        """--warmup-steps, or by default the global batch's (:func:`maskrcnn.engine.default_warmup_steps`)."""
        cfg = self.cfg
        return default_warmup_steps(cfg.global_batch) if cfg.warmup_steps is None else cfg.warmup_steps

    @property
    def warmup_steps(self) -> int:
        """The wanted warm-up, at most a quarter of the schedule's steps, so that a short run (a
        quick trial, a small dataset) is not all warmup."""
        return min(self.wanted_warmup_steps, self.steps_per_epoch * self.cfg.epochs // 4)

    @property
    def last_step(self) -> int:
        """The step the run ends at: every epoch's, or ``--max-steps``."""
        total = self.steps_per_epoch * self.cfg.epochs
        return min(total, self.cfg.max_steps or total)
