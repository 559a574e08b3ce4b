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
  python jobs/segment_bucket.py --input s3://archive/photos/ --output s3://labels/archive/ \\
      --model s3://models/best.pt --incremental
  python jobs/segment_bucket.py --status s3://labels/archive/   # its runs, without Ray

Re-running with the same --output skips images that already have rows; --overwrite starts
over; --incremental labels what the input gained as a new run (maskrcnn/incremental.py).
The output holds part-NNNNNN.parquet files, _summary.json and, at the end, _SUCCESS
(see maskrcnn/segment.py for the pipeline, maskrcnn/output.py for the files). The last
line of stdout is the summary as JSON.

Exit status: 0 done; 2 a usage or input error (one line names it); 3 a run over
--max-error-rate (rows and _summary.json written, _SUCCESS not); 75 another run holds the
labels dataset (--incremental): try again later; 1 a defect (with its traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn import incremental, storage, upkeep
from maskrcnn.cli import add_options, job_parser, parse_config, parse_loosely, run_main
from maskrcnn.segment import SegmentConfig, budget_error, run


def parser() -> argparse.ArgumentParser:
    return add_options(add_options(job_parser("jobs/segment_bucket.py", __doc__), SegmentConfig), upkeep.Modes)


def main(argv: list[str] | None = None) -> None:
    mode = parse_loosely(parser(), argv)
    if mode.status:
        report = upkeep.status(storage.absolute(mode.status))
        print(upkeep.status_text(report) + "\n" + json.dumps(report))
        return
    if mode.repair:
        model = storage.absolute(mode.model) if mode.model else None
        print(json.dumps(upkeep.repair(storage.absolute(mode.repair), model)))
        return
    # 1. The flags; 2. the run (an incremental one holds the dataset's lease); 3. the
    #    summary, as the last line of stdout; exit 3 when a run is over its error budget.
    cfg = parse_config(parser(), SegmentConfig, argv)
    if cfg.incremental:
        summary = incremental.run(cfg)
        finished = list(summary["runs"].values())
    else:
        summary = run(cfg)
        summary.pop("config")
        finished = [summary]
    ray.shutdown()  # no log line of Ray's comes after the summary: a scheduler reads the last line
    print(json.dumps(summary), flush=True)
    over = [s for s in finished if s["status"] != "ok"]
    if over:
        raise budget_error(over[-1])


if __name__ == "__main__":
    run_main(main)
