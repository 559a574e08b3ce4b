"""Evaluate a model on a COCO set: COCO box, mask and keypoint AP (those the model
predicts), overall and per category, printed and written as JSON.

The driver checks and cleans the ground truth by the training rules and scores with
pycocotools; inference runs in --num-workers Ray actors, each with one GPU when --gpu is
given, so under `ray job submit` it runs on the GPU nodes, not on the head node.

Examples:
  python jobs/evaluate.py --model runs/shapes/best.pt \\
      --annotations data/val/annotations.json --images data/val/images --output runs/shapes/eval.json

  ray job submit --working-dir . -- python jobs/evaluate.py --model s3://bucket/runs/r50/best.pt \\
      --annotations s3://bucket/coco/annotations/instances_val2017.json --images s3://bucket/coco/val2017 \\
      --num-workers 4 --gpu --output s3://bucket/runs/r50/eval_val2017.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import storage
from maskrcnn.cli import KEYPOINT_SIGMAS_HELP, add_model_arguments, floats, job_parser, run_main
from maskrcnn.evaluate import as_json, evaluate_model, format_table


def parser() -> argparse.ArgumentParser:
    p = job_parser("jobs/evaluate.py", __doc__)
    add_model_arguments(p)
    p.add_argument("--annotations", required=True, help="COCO instances JSON with the ground truth")
    p.add_argument("--images", required=True, help="directory holding the images' file_names")
    p.add_argument("--output", help="write the AP tables as JSON here (local path or s3:// URI)")
    p.add_argument("--num-workers", type=int, default=1, help="inference actors (default: %(default)s)")
    p.add_argument("--gpu", action="store_true", help="one GPU per inference actor; default: CPU")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per inference actor (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass (default: %(default)s)")
    p.add_argument("--keypoint-sigmas", type=floats, help=KEYPOINT_SIGMAS_HELP)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.num_workers < 1 or args.batch_size < 1:
        parser().error("--num-workers and --batch-size must be at least 1")
    report = evaluate_model(
        args.model,
        args.annotations,
        args.images,
        arch=args.arch,
        num_workers=args.num_workers,
        gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
        keypoint_sigmas=args.keypoint_sigmas,
    )
    scores = report.pop("scores")
    print(f"[evaluate] {report['model']} on {report['images']} images; skipped: {report['skipped_images'] or 'none'}")
    print(format_table(scores))
    if args.output:
        storage.write_text(args.output, json.dumps(dict(report, **as_json(scores)), indent=2))
        print(f"[evaluate] wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
