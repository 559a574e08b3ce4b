"""Convert a COCO instances file to Parquet labels: one row per image, the training-data form
that jobs/train.py reads as it reads the segmentation job's output, in bounded memory.

Examples:
  python jobs/coco_to_parquet.py --annotations coco/annotations/instances_train2017.json \\
      --images coco/train2017 --output labels/coco-train/

  ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/coco_to_parquet.py \\
      --annotations s3://bucket/coco/annotations/instances_train2017.json \\
      --images s3://bucket/coco/train2017 --output s3://bucket/labels/coco-train/

Annotations are cleaned by the rules training applies (the summary counts what was dropped,
by reason); crowd regions are kept, marked iscrowd. The output holds part-NNNNNN.parquet
files, _categories.json, _summary.json and, at the end, _SUCCESS (see maskrcnn/convert.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn.cli import add_options, job_parser, parse_config, run_main
from maskrcnn.convert import ConvertConfig, run


def parser() -> argparse.ArgumentParser:
    return add_options(job_parser("jobs/coco_to_parquet.py", __doc__), ConvertConfig)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(parser(), ConvertConfig, argv)
    print("[convert] summary:\n" + json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    run_main(main)
