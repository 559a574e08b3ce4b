"""Segment every image under a bucket prefix, directory or manifest, writing instance masks
(COCO RLE) to Parquet: one row per input image, exactly once, resumable.

Examples:
  python jobs/segment_bucket.py --input photos/ --output labels/run1/ --model runs/shapes/best.pt

  # torchvision's COCO Mask R-CNN, no training (a local copy of the .pth where there is no internet)
  python jobs/segment_bucket.py --input photos/ --output labels/coco/ --model COCO_V1

  # torchvision's Keypoint R-CNN: boxes and 17 person keypoints per instance
  python jobs/segment_bucket.py --input photos/ --output labels/persons/ \\
      --model COCO_V1 --arch keypointrcnn_resnet50_fpn

  ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/segment_bucket.py \\
      --input s3://archive/photos/ --output s3://labels/run1/ --model s3://models/best.pt \\
      --gpus-per-actor 1 --actors 1,16 --batch-size 8

  # every night: label only what is new in the archive, as a run of the dataset labels/archive/
  python jobs/segment_bucket.py --input s3://archive/photos/ --output s3://labels/archive/ \
      --model s3://models/best.pt --incremental

Re-running with the same --output skips images that already have rows; --overwrite starts
over; --incremental labels what the input gained as a new run (maskrcnn/incremental.py).
The output holds part-NNNNNN.parquet files, _summary.json and, at the end, _SUCCESS
(see maskrcnn/segment.py for the pipeline, maskrcnn/output.py for the files).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import incremental
from maskrcnn.cli import add_options, job_parser, parse_config, run_main
from maskrcnn.segment import SegmentConfig, run


def parser() -> argparse.ArgumentParser:
    return add_options(job_parser("jobs/segment_bucket.py", __doc__), SegmentConfig)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(parser(), SegmentConfig, argv)
    if cfg.incremental:
        summary = incremental.run(cfg)
    else:
        summary = run(cfg)
        summary.pop("config")
    print("[segment] summary:\n" + json.dumps(summary, indent=2))


if __name__ == "__main__":
    run_main(main)
