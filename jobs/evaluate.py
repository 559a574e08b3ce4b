"""Evaluate a model on a COCO set: COCO box, mask and keypoint AP (those the model
predicts), overall and per category, printed and written as JSON.

The driver checks and cleans the ground truth by the training rules and scores with
pycocotools; inference runs in the same Ray actor pool as jobs/segment_bucket.py (--actors,
--gpus-per-actor), so under `ray job submit` it runs on the GPU nodes, not on the head node.

Examples:
  python jobs/evaluate.py --model runs/shapes/best.pt \\
      --annotations data/val/annotations.json --images data/val/images --output runs/shapes/eval.json

  ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/evaluate.py \\
      --model s3://bucket/runs/r50/best.pt \\
      --annotations s3://bucket/coco/annotations/instances_val2017.json --images s3://bucket/coco/val2017 \\
      --actors 4 --gpus-per-actor 1 --output s3://bucket/runs/r50/eval_val2017.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import storage
from maskrcnn.cli import add_options, job_parser, parse_config, run_main
from maskrcnn.evaluate import EvaluateConfig, evaluate_model
from maskrcnn.metric import as_json, format_table


def parser() -> argparse.ArgumentParser:
    return add_options(job_parser("jobs/evaluate.py", __doc__), EvaluateConfig)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(parser(), EvaluateConfig, argv)
    report = evaluate_model(cfg)
    scores = report.pop("scores")
    print(f"[evaluate] {report['model']} on {report['images']} images; skipped: {report['skipped_images'] or 'none'}")
    print(format_table(scores))
    if cfg.output:
        storage.write_text(cfg.output, json.dumps(dict(report, **as_json(scores)), indent=2))
        print(f"[evaluate] wrote {cfg.output}")


if __name__ == "__main__":
    run_main(main)
