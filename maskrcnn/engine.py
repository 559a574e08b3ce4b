"""What one training worker does, independent of Ray: the LR schedule, the optimizer, one
step (:func:`train_step`) and validation (:func:`validate`).

The LR schedule is a pure function of the step, so resuming needs only the step count.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import nn

from maskrcnn import coco, data, devices, metric, transforms
from maskrcnn.errors import UserError
from maskrcnn.predictor import EVAL_SCORE_THRESHOLD, Predictor


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; training cannot continue meaningfully."""


@dataclass
class Schedule:
    base_lr: float
    total_steps: int
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    kind: str = "multistep"  # or "cosine"
    milestones: tuple[float, ...] = (0.67, 0.89)  # fractions of total_steps
    gamma: float = 0.1

    def lr(self, step: int) -> float:
        """Linear warmup, then multistep or cosine decay (the Detectron recipe)."""
        if step < self.warmup_steps:
            alpha = step / max(1, self.warmup_steps)
            return self.base_lr * (self.warmup_factor * (1 - alpha) + alpha)
        if self.kind == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return self.base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        passed = sum(step >= int(m * self.total_steps) for m in self.milestones)
        return self.base_lr * self.gamma**passed


OPTIMIZERS = ("sgd", "adamw")


def default_lr(optimizer: str, global_batch: int) -> float:
    """SGD: the linear scaling rule, 0.02 at 16 images per step. AdamW: 1e-4, DETR's."""
    return 0.02 * global_batch / 16 if optimizer == "sgd" else 1e-4


def default_warmup_steps(global_batch: int) -> int:
    """The warm-up grows with the global batch, as the LR does: NVIDIA's Mask R-CNN reference
    (DeepLearningExamples, PyTorch/Segmentation/MaskRCNN) warms up 625 steps at a global batch
    of 32 or more. Here 625 x global batch / 32 steps, from 100 (the small runs' warm-up) to 625."""
    return min(625, max(100, round(625 * global_batch / 32)))


def make_optimizer(name: str, params: list, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum (torchvision's recipe, for fine-tuning) or AdamW, which trains a
    model from random weights several times faster at the same number of steps."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def _blank_row(model: nn.Module) -> dict[str, Any]:
    """An image with no objects. A worker whose whole batch was unusable trains on it with
    weight 0: DDP needs every worker to run forward (buffer broadcast) and backward
    (gradient all-reduce) in step, or the others hang."""
    row = {
        "image": np.zeros((3, 64, 64), np.uint8),
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int64),
        "masks": "",
    }
    heads = getattr(getattr(model, "module", model), "roi_heads", None)
    if heads is not None and heads.has_keypoint():
        row["keypoints"] = np.zeros((0, heads.keypoint_predictor.kps_score_lowres.out_channels, 3), np.float32)
    return row


@dataclass
class StepResult:
    losses: dict[str, float]  # averaged over workers
    images: int  # images trained on, summed over workers


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rows: list[dict[str, Any]],
    device: torch.device,
    *,
    lr: float,
    clip_norm: float | None,
    amp: bool,
    step: int,
    augment: transforms.Augment | None = None,
) -> StepResult:
    for group in optimizer.param_groups:
        group["lr"] = lr
    weight = 1.0 if rows else 0.0
    with torch.autocast(device.type, enabled=amp):
        images, targets = transforms.to_model_inputs(rows or [_blank_row(model)], device, augment)
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values()) * weight
    names = tuple(loss_dict)  # the model's losses (loss_mask, loss_keypoint, ...), in the same order on every worker
    parts = devices.all_reduce([weight * float(loss_dict[n].detach()) for n in names] + [weight, len(rows)], device)
    workers_with_data = max(1.0, parts[-2])
    losses = {n: float(v) / workers_with_data for n, v in zip(names, parts[:-2])}
    losses["loss"] = sum(losses.values())
    if not math.isfinite(losses["loss"]):
        raise NonFiniteLoss(f"non-finite loss at step {step}: {losses}; lower --lr or check the data")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_norm:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return StepResult(losses=losses, images=int(parts[-1]))


def usable_rows(batch: list[dict[str, Any]], skipped: Counter) -> list[dict[str, Any]]:
    """Drop (and count by kind) the rows whose image could not be loaded."""
    rows = []
    for row in batch:
        if row["error"]:
            skipped[str(row["error"])] += 1
        else:
            rows.append(row)
    return rows


def validate(
    model: nn.Module,
    val: coco.CocoIndex,
    api: COCO,
    rank: int,
    world: int,
    *,
    amp: bool,
    iou_types: tuple[str, ...],
    sigmas: list[float] | None = None,
) -> tuple[metric.Scores, Counter] | None:
    """COCO AP of the live model on the validation set (``api``: its ground truth, indexed).
    Each worker predicts every ``world``-th image from ``rank`` and matches its own
    predictions (:func:`maskrcnn.metric.score_part`); rank 0 merges everyone's matches and
    summarises them, and returns the scores with the images skipped, by error kind. The
    others return None. It runs on the training workers, between epochs: the GPUs are theirs."""
    predictor = Predictor(model, val.classes, val.category_ids, score_threshold=EVAL_SCORE_THRESHOLD, amp=amp)
    records = val.records[rank::world]
    results, skipped = predict_records(predictor, records)
    part = metric.score_part(api, results, [r["image_id"] for r in records], iou_types, sigmas)
    gathered = devices.gather((part, skipped), world)
    if rank != 0:
        return None
    total: Counter = Counter()
    for _, counts in gathered:
        total.update(counts)
    return metric.summarize(api, [p for p, _ in gathered], sigmas), total


def predict_records(predictor: Predictor, records: Iterable[dict], batch_size: int = 2) -> tuple[list[dict], Counter]:
    """Fetch, decode (in each record's orientation) and predict COCO records; return COCO
    results and the counts of images skipped, by error kind."""
    results: list[dict] = []
    skipped: Counter = Counter()
    pending: list[dict] = []

    def flush() -> None:
        hwc = [np.ascontiguousarray(r["image"].transpose(1, 2, 0)) for r in pending]
        for row, instances in zip(pending, predictor.predict(hwc)):
            results.extend(metric.to_results(instances, row["image_id"]))
        pending.clear()

    for row in _loaded(records):
        if row["error"]:
            skipped[row["error"]] += 1
            continue
        pending.append(row)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return results, skipped


def _loaded(records: Iterable[dict], ahead: int = 4) -> Iterator[dict]:
    """:func:`maskrcnn.data.load_example` of each record, in order, fetched and decoded in a
    thread ``ahead`` images in advance, so the device predicts while the next images decode."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        for record in records:
            pending.append(pool.submit(data.load_example, record))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
