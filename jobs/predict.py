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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import checkpoint, draw, export, images, storage
from maskrcnn.cli import BOXES_HELP, add_model_arguments, job_parser, run_main
from maskrcnn.model import inference_size
from maskrcnn.predictor import Predictor
from maskrcnn.progress import Progress


def parser() -> argparse.ArgumentParser:
    p = job_parser("jobs/predict.py", __doc__)
    p.add_argument(
        "--input", nargs="+", required=True, help="image files, folders, globs ('photos/**/*.jpg') or s3:// prefixes"
    )
    add_model_arguments(p)
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the pictures and JSON")
    p.add_argument("--score-threshold", type=float, default=0.5, help="drop detections below this score")
    p.add_argument("--max-detections", type=int, default=100, help="keep at most this many instances per image")
    p.add_argument("--classes", help="comma-separated class names to keep (default: all)")
    p.add_argument("--device", help="torch device (default: cuda if there is one, else cpu)")
    p.add_argument(
        "--max-side", type=int, default=1024, help="longest side of a picture, pixels (default: %(default)s)"
    )
    p.add_argument("--boxes", action="store_true", help=BOXES_HELP)
    p.add_argument("--json-per-image", action="store_true", help="also write one JSON per image beside its picture")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    # 1. The inputs, listed before the model loads, so a wrong path fails at once.
    inputs = [found for spec in args.input for found in _listed(spec)]
    # 2. The model (any --model form), on this process's device.
    ckpt = checkpoint.load(args.model, args.arch)
    short, long = inference_size(ckpt["arch"], **ckpt["arch_kwargs"])
    fit = (max(short, args.max_side), max(long, args.max_side))  # decode once, big enough for both
    predictor = Predictor.from_checkpoint(
        ckpt,
        device=args.device,
        score_threshold=args.score_threshold,
        max_detections=args.max_detections,
        keep_classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
    )
    categories, keypoints = checkpoint.categories(ckpt), checkpoint.keypoint_spec(ckpt)
    skeleton = keypoints.skeleton if keypoints else ()
    del ckpt
    # 3. Each image: predict, draw, and add its row to the COCO files.
    progress = Progress("predict", len(inputs), every=0)
    failed: list[dict] = []
    with contextlib.ExitStack() as stack:
        dataset = stack.enter_context(
            export.CocoDataset(
                storage.join(args.output, "coco_dataset.json"), categories=categories, keypoints=keypoints
            )
        )
        results = stack.enter_context(export.CocoResults(storage.join(args.output, "coco_results.json")))
        names = export.PictureNames()  # one picture per image, however their names collide
        for uri, root in inputs:
            row, rgb = _predict(predictor, uri, fit)
            dataset.add(row)
            results.add(row)
            progress.add(1, _write(args, row, rgb, names(uri, root), skeleton))
            failed += [row] if row["error"] else []
    print(f"[predict] {results.items.count} instances in {results.rows} images -> {args.output}")
    if failed:
        raise ValueError(f"{len(failed)} of {len(inputs)} images failed, e.g. {failed[0]['uri']}: {failed[0]['error']}")


def _listed(spec: str) -> list[tuple[str, str]]:
    found = list(storage.expand(spec, images.IMAGE_EXTENSIONS))
    if not found:
        raise storage.StorageError(f"no images found in {spec}")
    return found


def _predict(predictor: Predictor, uri: str, fit: tuple[int, int]) -> tuple[dict, object]:
    """One image -> an output row (as jobs/segment_bucket.py writes it) and its pixels."""
    decoded, error = images.read(uri, fit)
    instances = [] if error else predictor.predict([decoded.pixels], [(decoded.height, decoded.width)])[0]
    row = {
        "uri": uri,
        "width": None if error else decoded.width,
        "height": None if error else decoded.height,
        "instances": instances,
        "model": predictor.model_id,
        "error": error,
    }
    return row, decoded.pixels


def _write(args: argparse.Namespace, row: dict, rgb: object, name: str, skeleton: tuple) -> str:
    """The row's picture (and JSON); returns what the progress line says of it."""
    label = name.removesuffix(".png")
    if row["error"]:
        return f"{label}: {row['error']}"
    target = storage.join(args.output, *name.split("/"))
    size = (row["height"], row["width"])
    picture = draw.picture(rgb, row["instances"], size, max_side=args.max_side, boxes=args.boxes, skeleton=skeleton)
    storage.write_bytes(target, draw.png(picture))
    if args.json_per_image:
        storage.write_text(target.removesuffix(".png") + ".json", json.dumps(row))
    return f"{label}: {draw.legend(row['instances'])}"


if __name__ == "__main__":
    run_main(main)
