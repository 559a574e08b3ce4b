"""Quick predictions, with no Ray: images in, overlay pictures (masks, and skeletons for a
keypoint model) and COCO JSON out.

Examples:
  python jobs/predict.py --input photos/ --model runs/shapes/best.pt --output predictions/

  # torchvision's COCO Mask R-CNN on a glob and a bucket prefix, one JSON per image as well
  python jobs/predict.py --input 'photos/**/*.jpg' s3://archive/sample/ --model COCO_V1 \\
      --output predictions/ --json-per-image

--output receives one PNG per image (named by its path under the folder, prefix or glob
it came from), coco_dataset.json (images, annotations with scores, categories) and
coco_results.json (what pycocotools' loadRes takes; its image ids are coco_dataset.json's).
An image that cannot be read is reported and skipped; the exit status is then 2.
For thousands of images, use jobs/segment_bucket.py: it is parallel and resumable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import checkpoint, draw, export, images, output, storage
from maskrcnn.cli import add_options, job_parser, parse_config, run_main
from maskrcnn.config import arch_option, embed, model_option, option
from maskrcnn.draw import PictureOptions
from maskrcnn.model import inference_size
from maskrcnn.predictor import PredictOptions, Predictor, model_input
from maskrcnn.progress import Progress

IO, MODEL = "input and output (local paths or s3:// URIs)", "model"


@dataclass(kw_only=True)
class PredictConfig:
    """Everything a prediction run is told: this job's flags."""

    input: list[str] = option("image files, folders, globs ('photos/**/*.jpg') or s3:// prefixes", group=IO, nargs="+")
    output: str = option("folder or s3:// prefix for the pictures and JSON", group=IO)
    json_per_image: bool = option("also write one JSON per image beside its picture", False, group=IO)
    model: str = model_option(MODEL)
    arch: str | None = arch_option(MODEL)
    device: str | None = option("torch device", None, group=MODEL, default_text="cuda if there is one, else cpu")
    predict: PredictOptions = embed(PredictOptions)
    pictures: PictureOptions = embed(PictureOptions)


def parser() -> argparse.ArgumentParser:
    return add_options(job_parser("jobs/predict.py", __doc__), PredictConfig)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(parser(), PredictConfig, argv)
    # 1. The inputs, listed before the model loads, so a wrong path fails at once.
    inputs = [found for spec in cfg.input for found in _listed(spec)]
    # 2. The model (any --model form), on this process's device.
    ckpt = checkpoint.load(cfg.model, cfg.arch)
    short, long = inference_size(ckpt["arch"], **ckpt["arch_kwargs"])
    fit = (max(short, cfg.pictures.max_side), max(long, cfg.pictures.max_side))  # decode once, big enough for both
    predictor = Predictor.with_options(ckpt, cfg.predict, device=cfg.device)
    categories, keypoints = checkpoint.categories(ckpt), checkpoint.keypoint_spec(ckpt)
    skeleton = keypoints.skeleton if keypoints else ()
    del ckpt
    # 3. Each image: predict, draw, and add its row to the COCO files.
    progress = Progress("predict", len(inputs), every=0)
    failed: list[dict] = []
    with contextlib.ExitStack() as stack:
        dataset = stack.enter_context(
            export.CocoDataset(
                storage.join(cfg.output, "coco_dataset.json"), categories=categories, keypoints=keypoints
            )
        )
        results = stack.enter_context(export.CocoResults(storage.join(cfg.output, "coco_results.json")))
        names = export.PictureNames()  # one picture per image, however their names collide
        for uri, root in inputs:
            row, rgb = _predict(predictor, uri, fit)
            dataset.add(row)
            results.add(row)
            progress.add(1, _write(cfg, row, rgb, names(uri, root), skeleton))
            failed += [row] if row["error"] else []
    print(f"[predict] {results.items.count} instances in {results.rows} images -> {cfg.output}")
    if failed:
        raise ValueError(f"{len(failed)} of {len(inputs)} images failed, e.g. {failed[0]['uri']}: {failed[0]['error']}")


def _listed(spec: str) -> list[tuple[str, str]]:
    found = list(storage.expand(spec, images.IMAGE_EXTENSIONS))
    if not found:
        raise storage.StorageError(f"no images found in {spec}")
    return found


def _predict(predictor: Predictor, uri: str, fit: tuple[int, int]) -> tuple[dict, object]:
    """One image -> an output row (as jobs/segment_bucket.py writes it, from the same input) and its pixels."""
    decoded, error = images.read(uri, fit)
    size, pixels = (decoded.height, decoded.width), decoded.pixels if error else model_input(decoded.pixels, fit)
    result = error or predictor.predict([pixels], [size])[0]
    return output.row(uri, size, result, predictor.model_id), pixels


def _write(cfg: PredictConfig, row: dict, rgb: object, name: str, skeleton: tuple) -> str:
    """The row's picture (and JSON); returns what the progress line says of it."""
    label = name.removesuffix(".png")
    if row["error"]:
        return f"{label}: {row['error']}"
    target = storage.join(cfg.output, *name.split("/"))
    size = (row["height"], row["width"])
    drawing = cfg.pictures
    picture = draw.picture(
        rgb, row["instances"], size, max_side=drawing.max_side, boxes=drawing.boxes, skeleton=skeleton
    )
    storage.write_bytes(target, draw.png(picture))
    if cfg.json_per_image:
        storage.write_text(target.removesuffix(".png") + ".json", json.dumps(row))
    return f"{label}: {draw.legend(row['instances'])}"


if __name__ == "__main__":
    run_main(main)
