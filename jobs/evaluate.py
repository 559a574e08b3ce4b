"""Evaluate a checkpoint on a COCO set: COCO box and mask AP, printed and written as JSON.

Examples:
  python jobs/evaluate.py --checkpoint runs/shapes/best.pt \\
      --annotations data/val/annotations.json --images data/val/images --output runs/shapes/eval.json

  ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint s3://bucket/runs/r50/best.pt \\
      --annotations s3://bucket/coco/annotations/instances_val2017.json --images s3://bucket/coco/val2017 \\
      --output s3://bucket/runs/r50/eval_val2017.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import storage  # noqa: E402
from maskrcnn.cli import job_parser, run_main  # noqa: E402
from maskrcnn.engine import evaluate_checkpoint  # noqa: E402
from maskrcnn.evaluate import STAT_NAMES, format_table  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = job_parser("jobs/evaluate.py", __doc__)
    p.add_argument("--checkpoint", required=True, help="project checkpoint (.pt), local path or s3:// URI")
    p.add_argument("--annotations", required=True, help="COCO instances JSON with the ground truth")
    p.add_argument("--images", required=True, help="directory holding the images' file_names")
    p.add_argument("--output", help="write the AP tables as JSON here (local path or s3:// URI)")
    p.add_argument("--batch-size", type=int, default=2, help="images per forward pass (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    start, last = time.perf_counter(), [0.0]

    def progress(done: int) -> None:
        if time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            print(f"[evaluate] {done} images, {done / (last[0] - start):.1f} img/s", flush=True)

    report = evaluate_checkpoint(args.checkpoint, args.annotations, args.images, batch_size=args.batch_size, progress=progress)
    print(f"[evaluate] {report['model']} on {report['images']} images; skipped: {report['skipped_images'] or 'none'}")
    print(format_table(report["stats"]))
    if args.output:
        stats = report.pop("stats")
        report.update({t: dict(zip(STAT_NAMES, values)) for t, values in stats.items()})
        storage.write_text(args.output, json.dumps(report, indent=2))
        print(f"[evaluate] wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
