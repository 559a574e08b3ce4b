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
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from maskrcnn import checkpoint, coco, devices, history, keypoints, labels, loading, storage
from maskrcnn.model import has_keypoints, initial_weights
from maskrcnn.runtime import init_ray, without_false_alarms
from maskrcnn.train_config import TrainConfig, TrainingPlan
from maskrcnn.worker import score_name, worker_loop

__all__ = ["TrainConfig", "run"]

CHECKPOINT = re.compile(r"/checkpoint_(\d{8})/model\.pt$")  # Worker.report's names


# ---------------------------------------------------------------- the driver


def run(cfg: TrainConfig) -> ray.train.Result | None:
    """Train; return Ray Train's result (its ``checkpoint`` is the latest), or None when the
    run had already trained its last step."""
    train, initial = prepare(cfg)
    init_ray(int(cfg.num_workers * cfg.cpus_per_worker) + 2, dashboard=True)
    weights = [ray.put(initial)] if initial else None  # the workers read them here; none downloads
    del initial
    plan = count(cfg, train, weights, _shared_validation(train))
    _announce(cfg, train, plan)
    if finished(cfg, plan):
        return None
    dataset = training_data(cfg, train)
    train.records.clear()  # in Ray's object store now
    fs, path = storage.filesystem(cfg.storage)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend=devices.backend(cfg.gpu)),
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
    val: coco.CocoIndex | None  # indexed once, here; the workers get it from Ray's object store
    sigmas: list[float] | None  # the OKS sigmas validation scores keypoints with
    cleaned: labels.Cleaned | None = None  # with Parquet labels: every record, cleaned (see count)


def prepare(cfg: TrainConfig) -> tuple[TrainingSet, list | None]:
    """Everything that can fail on bad input before Ray starts; returns the training set and
    the ``--weights`` tensors (None without)."""
    found: dict[str, list[dict]] = {}
    records, dropped = [], Counter()
    sources = [labels.open_labels(source) for source in cfg.train_sources if labels.is_labels(source)]
    like = sources[0].categories if sources else None  # COCO files' classes are matched to these by name
    for source in cfg.train_sources:
        if labels.is_labels(source):
            found[source] = next(s.categories for s in sources if s.source == source)
            continue
        indexed = coco.load_coco(source, cfg.train_images, like)
        records += indexed.records
        dropped.update(indexed.dropped)
        found[source] = indexed.gt["categories"]
        like = like or indexed.gt["categories"]
        del indexed  # its ground truth: evaluation scores the validation set's only
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
    initial = initial_weights(cfg.weights, cfg.arch) if cfg.weights else None
    if storage.is_s3(cfg.storage):
        storage.check_readable_dir(cfg.storage)
    else:
        storage.make_dirs(cfg.storage)
    spec = _keypoints(cfg, categories)
    if spec and val and val.keypoints != spec:
        raise coco.DatasetError(f"{cfg.val_annotations}: its keypoints differ from {cfg.train_sources[0]}'s")
    if spec is None:
        for record in records:
            record.pop("num_keypoints", None)
    cats = tuple((c["id"], c["name"]) for c in categories)
    rules = labels.Rules(cats, spec, cfg.min_score, labels.reviewed_images(records, sources))
    return TrainingSet(categories, rules, records, sources, dropped, val, _sigmas(cfg, spec)), initial


def _shared_validation(train: TrainingSet) -> list[ray.ObjectRef] | None:
    """The validation set in Ray's object store, once: the images every worker predicts its
    share of, and the ground truth each scores its share against. (A list, so Ray passes the references.)"""
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
        raise coco.DatasetError(f"{cfg.train_sources[0]}: no category lists 'keypoints', which --arch {cfg.arch} needs")
    return spec


def _sigmas(cfg: TrainConfig, spec: keypoints.KeypointSpec | None) -> list[float] | None:
    if spec is None:
        return None
    sigmas, warning = keypoints.sigmas(spec.names, cfg.keypoint_sigmas)
    if warning:
        print(f"[train] warning: {warning}", flush=True)
    return sigmas.tolist()


def count(
    cfg: TrainConfig,
    train: TrainingSet,
    weights: list[ray.ObjectRef] | None = None,
    val: list[ray.ObjectRef] | None = None,
) -> TrainingPlan:
    """What the workers need to know of the training set. Parquet labels are cleaned here,
    once, in Ray Data tasks that keep the records in Ray's object store (:func:`maskrcnn.labels.clean`)."""
    images, dropped, skipped = len(train.records), Counter(train.dropped), Counter()
    if train.sources:
        train.cleaned = labels.clean(train.sources, train.rules, train.records)
        images = train.cleaned.images
        dropped.update(train.cleaned.dropped)
        skipped.update(train.cleaned.skipped)
    return TrainingPlan(
        cfg=cfg,
        classes=[c["name"] for c in train.categories],
        category_ids=[c["id"] for c in train.categories],
        images=images,
        steps_per_epoch=_steps_per_epoch(cfg, images),
        dropped=dict(dropped),
        skipped_rows=dict(skipped),
        val_dropped=dict(train.val.dropped) if train.val else {},
        keypoints=train.rules.keypoints,
        sigmas=train.sigmas,
        weights=weights,
        val=val,
    )


def finished(cfg: TrainConfig, plan: TrainingPlan) -> bool:
    """Whether the run's latest checkpoint has trained the last step already (a re-run of a
    finished run), so that no worker need start. It is read as a resumed worker would read
    it; one that does not load (cut short by a crash) is left to Ray Train's own resume."""
    steps = [int(m.group(1)) for m in map(CHECKPOINT.search, storage.iter_files(cfg.run_dir)) if m]
    if not steps or max(steps) < plan.last_step:  # read no checkpoint to resume from: the workers do
        return False
    uri = storage.join(cfg.run_dir, f"checkpoint_{max(steps):08d}", checkpoint.FILENAME)
    try:
        ckpt = checkpoint.load(uri)
    except checkpoint.CheckpointError:
        return False
    if ckpt["arch"] != cfg.arch:
        print(f"[train] the run's checkpoints are {ckpt['arch']}; --arch {cfg.arch} does not apply", flush=True)
    print(f"[train] run already complete at step {ckpt['step']} (epoch {ckpt['epoch']}); nothing to do", flush=True)
    return True


def _steps_per_epoch(cfg: TrainConfig, images: int) -> int:
    steps = images // cfg.num_workers // cfg.batch_size
    if steps == 0:
        raise coco.DatasetError(
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
    return dataset.map(loading.LoadExample(max(cfg.scales), cfg.max_size))


def _announce(cfg: TrainConfig, train: TrainingSet, plan: TrainingPlan) -> None:
    print(
        f"[train] {plan.images} images, {len(plan.classes)} classes, {plan.steps_per_epoch} steps/epoch "
        f"x {cfg.epochs} epochs on {cfg.num_workers} workers; dropped annotations: {plan.dropped or 'none'}"
        + (f"; skipped label rows: {plan.skipped_rows or 'none'}" if train.sources else ""),
        flush=True,
    )
    if cfg.val_annotations:
        print(f"[train] validation set: dropped annotations: {plan.val_dropped or 'none'}", flush=True)
    if plan.warmup_steps < plan.wanted_warmup_steps:
        total = plan.steps_per_epoch * cfg.epochs
        print(f"[train] warmup: {plan.warmup_steps} steps, a quarter of the run's {total} steps", flush=True)
    print(f"[train] configuration: {history.write_config(cfg.run_dir, dataclasses.asdict(cfg))}", flush=True)
