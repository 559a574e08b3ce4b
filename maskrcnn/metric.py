"""The COCO metric: box, mask and keypoint AP (overall and per category) with pycocotools.

:func:`to_results` turns predicted instances into COCO results, and :func:`score`
scores them in one process. Training splits it as torchvision's
reference does: each worker matches its own images (:func:`score_part`, COCOeval's
per-image step, most of the time) and one merges the parts and summarises them
(:func:`summarize`), to the same figures.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

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


def to_results(instances: list[dict[str, Any]], image_id: int) -> list[dict[str, Any]]:
    """Predicted instances (see :class:`maskrcnn.predictor.Predictor`) -> COCO result dicts:
    ``segmentation`` where there is a mask, ``keypoints`` ``[x, y, 1] * K`` where there are
    keypoints (visibility 1, as torchvision's references write them; COCOeval reads only x, y)."""
    results = []
    for i in instances:
        result = {"image_id": int(image_id), "category_id": i["category_id"], "bbox": i["bbox"], "score": i["score"]}
        if i.get("mask") is not None:
            result["segmentation"] = i["mask"]
        if i.get("keypoints") is not None:
            result["keypoints"] = [v for x, y, _ in i["keypoints"] for v in (x, y, 1)]
        results.append(result)
    return results


def stat_names(iou_type: str) -> tuple[str, ...]:
    return KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES


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


def score(
    gt: dict[str, Any] | COCO,
    results: list[dict],
    image_ids: list[int] | None = None,
    iou_types: tuple[str, ...] = IOU_TYPES,
    sigmas: np.ndarray | None = None,
) -> Scores:
    """Score COCO results against ground truth (already cleaned: see :func:`maskrcnn.coco.load_coco`),
    for each of ``iou_types`` (``bbox``, ``segm``, ``keypoints``; ``sigmas``: see
    :func:`maskrcnn.keypoints.sigmas`), on ``image_ids`` (default: every image of ``gt``).

    With no detections at all every stat is 0.0 (pycocotools cannot load an empty result).
    """
    api = gt if isinstance(gt, COCO) else coco_api(gt)
    image_ids = sorted(api.getImgIds()) if image_ids is None else image_ids
    return summarize(api, [score_part(api, results, image_ids, iou_types, sigmas)], sigmas)


@dataclass
class Part:
    """One worker's share of a COCO evaluation: its images and, per IoU type, COCOeval's
    per-image matches of them (``evalImgs``, category x area range x image)."""

    image_ids: list[int]
    detections: int
    matches: dict[str, np.ndarray] = field(default_factory=dict)


def score_part(
    api: COCO,
    results: list[dict],
    image_ids: list[int],
    iou_types: tuple[str, ...] = IOU_TYPES,
    sigmas: np.ndarray | None = None,
) -> Part:
    """COCOeval's per-image step for ``image_ids`` only, with ``results`` on those images."""
    ids = sorted(set(image_ids))
    part = Part(ids, len(results))
    detections = _detections(api, results)
    for iou_type in iou_types:
        ev = _cocoeval(api, detections, iou_type, sigmas)
        ev.params.imgIds = ids
        shape = (len(ev.params.catIds), len(ev.params.areaRng), len(ids))
        if ids:  # COCOeval reads every image's annotations when given none
            with _quiet():
                ev.evaluate()
        part.matches[iou_type] = np.asarray(ev.evalImgs if ids else [], dtype=object).reshape(shape)
    return part


def summarize(api: COCO, parts: list[Part], sigmas: np.ndarray | None = None) -> Scores:
    """Merge the parts' matches and accumulate them: the scores of one :func:`score` of
    all their images together."""
    iou_types = tuple(parts[0].matches) if parts else IOU_TYPES
    names = {c["id"]: c["name"] for c in api.dataset.get("categories", [])}
    if not sum(p.detections for p in parts):
        return Scores(
            {t: [0.0] * len(stat_names(t)) for t in iou_types},
            {t: dict.fromkeys(names.values(), 0.0) for t in iou_types},
        )
    ids, order = np.unique(np.concatenate([np.asarray(p.image_ids, dtype=np.int64) for p in parts]), return_index=True)
    scores = Scores({}, {})
    for iou_type in iou_types:
        ev = _cocoeval(api, None, iou_type, sigmas)
        ev.params.imgIds = [int(i) for i in ids]
        ev._paramsEval = copy.deepcopy(ev.params)
        ev.evalImgs = list(np.concatenate([p.matches[iou_type] for p in parts], axis=2)[:, :, order].ravel())
        with _quiet():
            ev.accumulate()
            ev.summarize()
        scores.stats[iou_type] = [float(x) for x in ev.stats]
        scores.per_class[iou_type] = _per_class(ev, names)
    return scores


def _detections(api: COCO, results: list[dict]) -> COCO:
    """The results as pycocotools' COCO object; one with no annotations for no results
    (which ``loadRes`` refuses)."""
    if results:
        with _quiet():
            return api.loadRes(copy.deepcopy(results))
    empty = COCO()
    empty.dataset = {
        "images": api.dataset["images"],
        "categories": api.dataset.get("categories", []),
        "annotations": [],
    }
    with _quiet():
        empty.createIndex()
    return empty


def _cocoeval(api: COCO, detections: COCO | None, iou_type: str, sigmas: np.ndarray | None) -> COCOeval:
    ev = COCOeval(api, detections, iou_type)
    if iou_type == "keypoints" and sigmas is not None:
        ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=float)
    return ev


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
