"""COCO box, mask and keypoint AP (overall and per category) with pycocotools, and scoring a
model on a COCO set through the inference actor pool (:func:`evaluate_model`)."""

from __future__ import annotations

import builtins
import contextlib
import copy
import io
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn import checkpoint, data, inference, keypoints, output, storage
from maskrcnn.cli import arch_option, embed, keypoint_sigmas_option, model_option, option
from maskrcnn.export import to_results
from maskrcnn.inference import InferenceOptions
from maskrcnn.model import has_keypoints, has_masks, is_path
from maskrcnn.predictor import EVAL_SCORE_THRESHOLD, check_classes
from maskrcnn.progress import Progress
from maskrcnn.runtime import without_false_alarms

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)
_STAT_LABELS = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)
# COCOeval's keypoint summary has its own 10 values (OKS instead of IoU, 20 detections).
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "AP_medium", "AP_large", "AR", "AR50", "AR75", "AR_medium", "AR_large")
_KEYPOINT_STAT_LABELS = tuple(
    f"Average {kind} @[ OKS={oks} | area={area} | maxDets= 20 ]"
    for kind, oks, area in zip(
        ["Precision  (AP)"] * 5 + ["Recall     (AR)"] * 5,
        ["0.50:0.95", "0.50     ", "0.75     ", "0.50:0.95", "0.50:0.95"] * 2,
        ["   all", "   all", "   all", "medium", " large"] * 2,
    )
)


def stat_names(iou_type: str) -> tuple[str, ...]:
    return KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES


def iou_types(arch: str) -> tuple[str, ...]:
    """What a model of ``arch`` is scored on: boxes, then masks and keypoints where it has them."""
    return ("bbox",) + (("segm",) if has_masks(arch) else ()) + (("keypoints",) if has_keypoints(arch) else ())


@contextlib.contextmanager
def _quiet():
    """Silence pycocotools' progress prints. Ray Train routes ``print`` to its logger in
    workers, so redirecting stdout is not enough: swap ``print`` itself meanwhile."""
    saved = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        builtins.print = saved


def coco_api(gt: dict[str, Any]) -> COCO:
    """A pycocotools COCO object from an in-memory dataset dict, without its chatter."""
    api = COCO()
    api.dataset = copy.deepcopy(gt)
    api.dataset.setdefault("info", {})  # loadRes copies it; some files have none
    with _quiet():
        api.createIndex()
    return api


@dataclass
class Scores:
    """What pycocotools computes: the 12 summary stats and the AP of each category, per
    IoU type. A category with no ground truth has AP ``nan``, as in detectron2's table."""

    stats: dict[str, list[float]]  # iou type -> its values of stat_names(iou type)
    per_class: dict[str, dict[str, float]]  # iou type -> {category name: AP}


def evaluate(
    gt: dict[str, Any] | COCO,
    results: list[dict],
    image_ids: list[int] | None = None,
    iou_types: tuple[str, ...] = IOU_TYPES,
    sigmas: np.ndarray | None = None,
) -> Scores:
    """Score COCO results against ground truth (already cleaned: see :func:`maskrcnn.data.load_coco`),
    for each of ``iou_types`` (``bbox``, ``segm``, ``keypoints``; ``sigmas``: see :func:`maskrcnn.keypoints.sigmas`).

    With no detections at all every stat is 0.0 (pycocotools cannot load an empty result).
    """
    api = gt if isinstance(gt, COCO) else coco_api(gt)
    names = {c["id"]: c["name"] for c in api.dataset.get("categories", [])}
    if not results:
        return Scores(
            {t: [0.0] * len(stat_names(t)) for t in iou_types},
            {t: dict.fromkeys(names.values(), 0.0) for t in iou_types},
        )
    scores = Scores({}, {})
    with _quiet():
        detections = api.loadRes(copy.deepcopy(results))
        for iou_type in iou_types:
            ev = COCOeval(api, detections, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(image_ids)
            if iou_type == "keypoints" and sigmas is not None:
                ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=float)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            scores.stats[iou_type] = [float(x) for x in ev.stats]
            scores.per_class[iou_type] = _per_class(ev, names)
    return scores


def _per_class(ev: COCOeval, names: dict[int, str]) -> dict[str, float]:
    """AP at IoU 0.50:0.95, all areas, 100 detections, for each category (detectron2's way)."""
    precision = ev.eval["precision"]  # [IoU threshold, recall, category, area range, max dets]
    per_class = {}
    for k, category_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[names.get(category_id, str(category_id))] = float(p.mean()) if p.size else float("nan")
    return per_class


def as_metrics(scores: Scores) -> dict[str, float]:
    """Flatten to ``{"bbox_AP": .., "segm_AP50": .., ...}`` for reporting."""
    return {f"{t}_{name}": float(v) for t, values in scores.stats.items() for name, v in zip(stat_names(t), values)}


def as_json(scores: Scores) -> dict[str, Any]:
    """``{"bbox": {"AP": ..}, "segm": {..}, "per_class_AP": {"segm": {name: AP or null}}}``."""
    report: dict[str, Any] = {t: dict(zip(stat_names(t), values)) for t, values in scores.stats.items()}
    report["per_class_AP"] = {
        t: {name: (None if math.isnan(ap) else ap) for name, ap in aps.items()} for t, aps in scores.per_class.items()
    }
    return report


def format_table(scores: Scores, columns: int = 3) -> str:
    """The standard 12-line COCO summary, then a per-category AP table, for each IoU type."""
    lines = []
    for iou_type, values in scores.stats.items():
        lines.append(f"IoU metric: {iou_type}")
        labels = _KEYPOINT_STAT_LABELS if iou_type == "keypoints" else _STAT_LABELS
        lines += [f" {label} = {value:0.3f}" for label, value in zip(labels, values)]
        cells = [f"{name[:18]:<18} {100 * ap:6.2f}" for name, ap in scores.per_class.get(iou_type, {}).items()]
        if cells:
            lines.append(f"Per-category {iou_type} AP (%):")
            lines += ["  " + " | ".join(cells[i : i + columns]) for i in range(0, len(cells), columns)]
    return "\n".join(lines)


# ---------------------------------------------------------------- a model on a COCO set

DATA, MODEL = "data (local paths or s3:// URIs)", "model"
IMAGE_ID = pa.schema([("image_id", pa.int64())])  # the key the inference rows carry back


@dataclass(kw_only=True)
class EvaluateConfig:
    """Everything an evaluation is told; ``jobs/evaluate.py``'s flags are these fields."""

    model: str = model_option(MODEL)
    arch: str | None = arch_option(MODEL)
    annotations: str = option("COCO instances JSON with the ground truth", group=DATA)
    images: str = option("directory holding the images' file_names", group=DATA)
    output: str | None = option("write the AP tables as JSON here", None, group=DATA)
    keypoint_sigmas: tuple[float, ...] | None = keypoint_sigmas_option(DATA)
    # COCO AP is reported at torchvision's low threshold: a high one would cut the recall curve.
    inference: InferenceOptions = embed(InferenceOptions, score_threshold=EVAL_SCORE_THRESHOLD)

    def __post_init__(self) -> None:
        self.annotations, self.images = storage.absolute(self.annotations), storage.absolute(self.images)
        self.model = storage.absolute(self.model) if is_path(self.model) else self.model


def evaluate_model(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a model (anything :func:`maskrcnn.checkpoint.load` takes) on a COCO set. The
    driver checks the ground truth and scores; the images go through the inference actor
    pool (:mod:`maskrcnn.inference`), so under ``ray job submit`` they run where the GPUs are."""
    ckpt = checkpoint.load(cfg.model, cfg.arch)  # fail fast (and fetch once), before any actor starts
    check_classes(ckpt["classes"], cfg.inference.classes)
    model_id, known = checkpoint.identity(ckpt), set(ckpt["category_ids"])
    dataset = data.load_coco(cfg.annotations, cfg.images)
    types, sigmas = _scored(ckpt, dataset, cfg.annotations, cfg.keypoint_sigmas)
    unknown = sorted(set(dataset.category_ids) - known)
    if unknown and dataset.gt["annotations"]:
        print(f"[evaluate] warning: the model does not know category ids {unknown}; they score 0 AP", flush=True)
    print(
        f"[evaluate] {len(dataset.records)} images; dropped annotations: {dict(dataset.dropped) or 'none'}", flush=True
    )
    inference.start(cfg.inference, min_cpus=1)
    model = inference.share(ckpt)
    del ckpt
    with without_false_alarms():
        results, skipped = _predict(cfg.inference, dataset, model)
    return {
        "model_source": cfg.model,
        "model": model_id,
        "annotations": cfg.annotations,
        "images": len(dataset.records),
        "detections": len(results),
        "skipped_images": dict(skipped),
        "dropped_annotations": dict(dataset.dropped),
        "scores": evaluate(dataset.gt, results, [r["image_id"] for r in dataset.records], types, sigmas),
    }


def _predict(
    options: InferenceOptions, dataset: data.CocoDataset, model: list[ray.ObjectRef]
) -> tuple[list[dict], Counter]:
    """The records through decode tasks and the actor pool, as stored (no EXIF rotation: COCO
    sizes are the stored pixels); return COCO results and the images skipped, by error kind."""
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in dataset.records}
    ds = ray.data.from_items([{"image_id": r["image_id"], "uri": r["uri"]} for r in dataset.records])
    ds = inference.predict(inference.decode(ds, options.batch_size, fit=None, exif=False), options, model, IMAGE_ID)
    progress = Progress("evaluate", len(dataset.records))
    results: list[dict] = []
    skipped: Counter = Counter()
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in table.to_pylist():
            if row["error"]:
                skipped[output.error_kind(row["error"])] += 1
            elif (row["height"], row["width"]) != sizes[row["image_id"]]:
                skipped["size_mismatch"] += 1
            else:
                results += to_results(row["instances"], row["image_id"])
        progress.add(table.num_rows, f"{sum(skipped.values())} skipped")
    progress.finish(f"{sum(skipped.values())} skipped")
    return sorted(results, key=lambda r: r["image_id"]), skipped


def _scored(
    ckpt: dict[str, Any], dataset: data.CocoDataset, annotations: str, given: tuple[float, ...] | None
) -> tuple[tuple[str, ...], np.ndarray | None]:
    """What to score a model on (:func:`iou_types`), and the OKS sigmas of its keypoints. A
    keypoint model needs ground truth with the same keypoints; without any, it is scored on boxes."""
    types, spec = iou_types(ckpt["arch"]), checkpoint.keypoint_spec(ckpt)
    if spec is None:
        return types, None
    if dataset.keypoints is None:
        print(f"[evaluate] warning: {annotations} has no keypoints; scoring boxes and masks only", flush=True)
        return tuple(t for t in types if t != "keypoints"), None
    if dataset.keypoints.names != spec.names:
        raise data.DatasetError(f"{annotations}: its keypoints are not the model's ({', '.join(spec.names[:3])}, ...)")
    sigmas, warning = keypoints.sigmas(spec.names, list(given) if given else None)
    if warning:
        print(f"[evaluate] warning: {warning}", flush=True)
    return types, sigmas
