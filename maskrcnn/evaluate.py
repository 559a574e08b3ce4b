"""The evaluate job: scoring a model on a COCO set through the inference actor pool
(:func:`evaluate_model`), with the COCO metric of :mod:`maskrcnn.metric`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from maskrcnn import checkpoint, coco, inference, keypoints, labels, output, storage
from maskrcnn.config import arch_option, embed, keypoint_sigmas_option, model_option, option
from maskrcnn.inference import InferenceOptions
from maskrcnn.metric import score, to_results
from maskrcnn.model import iou_types
from maskrcnn.predictor import EVAL_SCORE_THRESHOLD, check_classes
from maskrcnn.progress import Progress
from maskrcnn.runtime import without_false_alarms
from maskrcnn.weights import is_path

DATA, MODEL = "data (local paths or s3:// URIs)", "model"
IMAGE_ID = pa.schema([("image_id", pa.int64())])  # the key the inference rows carry back


@dataclass(kw_only=True)
class EvaluateConfig:
    """Everything an evaluation is told; ``jobs/evaluate.py``'s flags are these fields."""

    model: str = model_option(MODEL)
    arch: str | None = arch_option(MODEL)
    annotations: str = option(
        "the ground truth: a COCO instances JSON, or Parquet labels (a directory or prefix: "
        "jobs/coco_to_parquet.py's, or a reviewed segmentation output)",
        group=DATA,
    )
    images: str | None = option(
        "directory holding the COCO file's file_names (Parquet rows hold URIs)", None, group=DATA
    )
    output: str | None = option("write the AP tables as JSON here", None, group=DATA)
    keypoint_sigmas: tuple[float, ...] | None = keypoint_sigmas_option(DATA)
    # COCO AP is reported at torchvision's low threshold: a high one would cut the recall curve.
    inference: InferenceOptions = embed(InferenceOptions, score_threshold=EVAL_SCORE_THRESHOLD)

    def __post_init__(self) -> None:
        if self.images is None and not labels.is_labels(self.annotations):
            raise ValueError(f"--images is needed with a COCO file ({self.annotations}): where its file_names are")
        self.annotations = storage.absolute(self.annotations)
        self.images = storage.absolute(self.images) if self.images else None
        self.model = storage.absolute(self.model) if is_path(self.model) else self.model


def evaluate_model(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a model (anything :func:`maskrcnn.checkpoint.load` takes) on a COCO set. The
    driver checks the ground truth and scores; the images go through the inference actor
    pool (:mod:`maskrcnn.inference`), so under ``ray job submit`` they run where the GPUs are."""
    ckpt = checkpoint.load(cfg.model, cfg.arch)  # fail fast (and fetch once), before any actor starts
    check_classes(ckpt["classes"], cfg.inference.classes)
    model_id, known = checkpoint.identity(ckpt), set(ckpt["category_ids"])
    dataset = labels.load_dataset(cfg.annotations, cfg.images)
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
        "scores": score(dataset.gt, results, [r["image_id"] for r in dataset.records], types, sigmas),
    }


def _predict(
    options: InferenceOptions, dataset: coco.CocoIndex, model: list[ray.ObjectRef]
) -> tuple[list[dict], Counter]:
    """The records through decode tasks and the actor pool, in their orientation (a COCO
    file's sizes are the stored pixels; a segmentation output's, the displayed picture's);
    return COCO results and the images skipped, by error kind (a name outside the image
    root is skipped unread)."""
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in dataset.records}
    ready = [r for r in dataset.records if not r.get("error")]
    skipped: Counter = Counter(r["error"] for r in dataset.records if r.get("error"))
    exif = bool(ready) and ready[0]["orientation"] == output.DISPLAYED  # one source: one orientation
    ds = ray.data.from_items([{"image_id": r["image_id"], "uri": r["uri"]} for r in ready])
    ds = inference.predict(inference.decode(ds, options.batch_size, fit=None, exif=exif), options, model, IMAGE_ID)
    progress = Progress("evaluate", len(ready))
    results: list[dict] = []
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
    ckpt: dict[str, Any], dataset: coco.CocoIndex, annotations: str, given: tuple[float, ...] | None
) -> tuple[tuple[str, ...], np.ndarray | None]:
    """What to score a model on (:func:`maskrcnn.model.iou_types`), and the OKS sigmas of its keypoints. A
    keypoint model needs ground truth with the same keypoints; without any, it is scored on boxes."""
    types, spec = iou_types(ckpt["arch"]), checkpoint.keypoint_spec(ckpt)
    if spec is None:
        return types, None
    if dataset.keypoints is None:
        print(f"[evaluate] warning: {annotations} has no keypoints; scoring boxes and masks only", flush=True)
        return tuple(t for t in types if t != "keypoints"), None
    if dataset.keypoints.names != spec.names:
        raise coco.DatasetError(f"{annotations}: its keypoints are not the model's ({', '.join(spec.names[:3])}, ...)")
    sigmas, warning = keypoints.sigmas(spec.names, list(given) if given else None)
    if warning:
        print(f"[evaluate] warning: {warning}", flush=True)
    return types, sigmas
