"""Train torchvision Mask R-CNN (or Keypoint R-CNN, or both in one model) on COCO-format
data with Ray Train (data-parallel, DDP).

Examples:
  # on a laptop, 2 CPU workers, the small model
  python jobs/train.py --train-annotations data/train/annotations.json --train-images data/train/images \\
      --val-annotations data/val/annotations.json --val-images data/val/images \\
      --storage runs --name shapes --epochs 4

  # on a GPU cluster, COCO in S3, fine-tuning torchvision's COCO weights
  ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/train.py \\
      --train-annotations s3://bucket/coco/annotations/instances_train2017.json \\
      --train-images s3://bucket/coco/train2017 \\
      --val-annotations s3://bucket/coco/annotations/instances_val2017.json \\
      --val-images s3://bucket/coco/val2017 \\
      --arch maskrcnn_resnet50_fpn --weights COCO_V1 --num-workers 8 --gpu \\
      --storage s3://bucket/runs --name r50-coco

  # person keypoints: torchvision's Keypoint R-CNN, on COCO's person_keypoints files
  python jobs/train.py --arch keypointrcnn_resnet50_fpn --weights COCO_V1 \
      --train-annotations coco/annotations/person_keypoints_train2017.json --train-images coco/train2017 \
      --storage runs --name persons

Re-running with the same --storage and --name continues from the latest checkpoint.
Checkpoints go to STORAGE/NAME/checkpoint_NNNNNNNN/model.pt, and the best by validation
mask AP (keypoint AP for Keypoint R-CNN) to STORAGE/NAME/best.pt (see maskrcnn/train.py
for the recipe).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn.cli import add_options, job_parser, parse_config, run_main
from maskrcnn.train import TrainConfig, run


def parser() -> argparse.ArgumentParser:
    return add_options(job_parser("jobs/train.py", __doc__), TrainConfig)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(parser(), TrainConfig, argv)
    result = run(cfg)
    if result and result.error:
        raise result.error
    print(f"[train] run directory: {cfg.run_dir}")
    if result and result.checkpoint:
        print(f"[train] latest checkpoint: {result.checkpoint.path}/model.pt")
    print(f"[train] best checkpoint: {cfg.run_dir.rstrip('/')}/best.pt (if a validation set was given)")


if __name__ == "__main__":
    run_main(main)
