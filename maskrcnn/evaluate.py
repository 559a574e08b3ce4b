"""COCO box and mask AP with pycocotools, and turning model outputs into COCO results."""

from __future__ import annotations

import builtins
import contextlib
import copy
import io
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip
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


def to_results(instances: list[dict[str, Any]], image_id: int) -> list[dict[str, Any]]:
    """Predicted instances (see :class:`maskrcnn.predictor.Predictor`) -> COCO result dicts."""
    return [
        {"image_id": int(image_id), "category_id": i["category_id"], "bbox": i["bbox"], "score": i["score"], "segmentation": i["mask"]}
        for i in instances
    ]


def evaluate(gt: dict[str, Any] | COCO, results: list[dict], image_ids: list[int] | None = None) -> dict[str, list[float]]:
    """Return ``{"bbox": [12 stats], "segm": [12 stats]}`` as pycocotools computes them.

    With no detections at all every stat is 0.0 (pycocotools cannot load an empty result).
    """
    api = gt if isinstance(gt, COCO) else coco_api(gt)
    if not results:
        return {t: [0.0] * len(STAT_NAMES) for t in IOU_TYPES}
    stats = {}
    with _quiet():
        detections = api.loadRes(copy.deepcopy(results))
        for iou_type in IOU_TYPES:
            ev = COCOeval(api, detections, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats[iou_type] = [float(x) for x in ev.stats]
    return stats


def as_metrics(stats: dict[str, list[float]]) -> dict[str, float]:
    """Flatten to ``{"bbox_AP": .., "segm_AP50": .., ...}`` for reporting."""
    return {f"{t}_{name}": float(v) for t, values in stats.items() for name, v in zip(STAT_NAMES, values)}


def format_table(stats: dict[str, list[float]]) -> str:
    """The standard 12-line COCO summary for each IoU type."""
    lines = []
    for iou_type, values in stats.items():
        lines.append(f"IoU metric: {iou_type}")
        lines += [f" {label} = {value:0.3f}" for label, value in zip(_STAT_LABELS, values)]
    return "\n".join(lines)

