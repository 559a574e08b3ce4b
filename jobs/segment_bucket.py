"""Segment every image under a bucket prefix, directory or manifest, writing instance masks
(COCO RLE) to Parquet: one row per input image, exactly once, resumable.

Examples:
  python jobs/segment_bucket.py --input photos/ --output labels/run1/ --model runs/shapes/best.pt

  # torchvision's COCO Mask R-CNN, no training (a local copy of the .pth where there is no internet)
  python jobs/segment_bucket.py --input photos/ --output labels/coco/ --model COCO_V1

  ray job submit --working-dir . -- python jobs/segment_bucket.py \\
      --input s3://archive/photos/ --output s3://labels/run1/ --model s3://models/best.pt \\
      --num-gpus-per-actor 1 --concurrency 1,16 --batch-size 8

Re-running with the same --output skips images that already have rows; --overwrite starts
over. The output holds part-NNNNNN.parquet files, _summary.json and, at the end, _SUCCESS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn.cli import add_model_arguments, job_parser, run_main
from maskrcnn.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from maskrcnn.segment import SegmentConfig, run


def _pair(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1 or parts[0] > parts[-1]:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return parts[0], parts[-1]


def _extensions(text: str) -> tuple[str, ...] | None:
    if text.strip() == "*":
        return None
    return tuple("." + e.strip().lstrip(".").lower() for e in text.split(",") if e.strip())


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object of positive amounts like '{{\"gpu_node\": 1}}', got {text!r}"
        )
    return {str(k): float(v) for k, v in value.items()}


def parser() -> argparse.ArgumentParser:
    p = job_parser("jobs/segment_bucket.py", __doc__)
    io = p.add_argument_group("input and output (local paths or s3:// URIs)")
    io.add_argument(
        "--input",
        required=True,
        help="a directory or prefix (listed recursively), or a .parquet/.csv/.txt manifest of URIs",
    )
    io.add_argument("--output", required=True, help="directory or prefix for the Parquet files")
    add_model_arguments(io)
    io.add_argument(
        "--extensions",
        type=_extensions,
        default=IMAGE_EXTENSIONS,
        help="comma-separated file extensions to keep when listing, case-insensitive; '*' keeps every file "
        f"(default: {','.join(e[1:] for e in IMAGE_EXTENSIONS)})",
    )
    io.add_argument("--limit", type=int, help="process only the first N inputs (a quick trial)")
    io.add_argument("--rows-per-file", type=int, default=1000, help="rows per Parquet part file (default: %(default)s)")
    io.add_argument("--overwrite", action="store_true", help="delete what --output holds and start over")
    m = p.add_argument_group("inference")
    m.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: %(default)s)")
    m.add_argument("--concurrency", type=_pair, default=(1, 1), help="actor pool size N or MIN,MAX (autoscaling)")
    m.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="GPUs per inference actor; 0 runs on CPU")
    m.add_argument(
        "--cpus-per-actor", type=float, default=1.0, help="CPUs (and torch threads) per actor (default: %(default)s)"
    )
    m.add_argument(
        "--actor-resources",
        type=_resources,
        help="custom Ray resources per inference actor, JSON, e.g. '{\"gpu_node\": 1}' (see cluster/README.md)",
    )
    m.add_argument(
        "--decode-resources",
        type=_resources,
        help="custom Ray resources per decode task, JSON, e.g. '{\"decode_node\": 1}' keeps decoding on CPU nodes",
    )
    m.add_argument("--no-fp16", action="store_true", help="run GPU inference in fp32 instead of fp16 autocast")
    m.add_argument("--score-threshold", type=float, default=0.5, help="drop detections below this score")
    m.add_argument("--max-detections", type=int, default=100, help="keep at most this many instances per image")
    m.add_argument("--classes", help="comma-separated class names to keep (default: all)")
    m.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images become error rows")
    m.add_argument(
        "--full-decode",
        action="store_true",
        help="decode every JPEG at full size; by default one at least twice the model's input size "
        "decodes at 1/2, 1/4 or 1/8 scale (labels stay in full-image coordinates)",
    )
    g = p.add_argument_group("progress")
    g.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    cfg = SegmentConfig(
        input=args.input,
        output=args.output,
        model=args.model,
        arch=args.arch,
        extensions=args.extensions,
        limit=args.limit,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        num_gpus_per_actor=args.num_gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        actor_resources=args.actor_resources,
        decode_resources=args.decode_resources,
        score_threshold=args.score_threshold,
        max_detections=args.max_detections,
        classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
        max_pixels=args.max_pixels,
        full_decode=args.full_decode,
        rows_per_file=args.rows_per_file,
        log_every=args.log_every,
        overwrite=args.overwrite,
        fp16=not args.no_fp16,
    )
    summary = run(cfg)
    summary.pop("config")
    print("[segment] summary:\n" + json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_main(main)
