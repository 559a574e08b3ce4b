"""Train torchvision Mask R-CNN on COCO-format data with Ray Train (data-parallel, DDP).

Examples:
  # on a laptop, 2 CPU workers, the small model
  python jobs/train.py --train-annotations data/train/annotations.json --train-images data/train/images \\
      --val-annotations data/val/annotations.json --val-images data/val/images \\
      --storage runs --name shapes --epochs 4

  # on a GPU cluster, COCO in S3, fine-tuning torchvision's COCO weights
  ray job submit --working-dir . -- python jobs/train.py \\
      --train-annotations s3://bucket/coco/annotations/instances_train2017.json \\
      --train-images s3://bucket/coco/train2017 \\
      --val-annotations s3://bucket/coco/annotations/instances_val2017.json \\
      --val-images s3://bucket/coco/val2017 \\
      --arch maskrcnn_resnet50_fpn --weights COCO_V1 --num-workers 8 --gpu \\
      --storage s3://bucket/runs --name r50-coco

Re-running with the same --storage and --name continues from the latest checkpoint.
The best checkpoint by validation mask AP is written to STORAGE/NAME/best.pt.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maskrcnn.cli import job_parser, run_main
from maskrcnn.engine import OPTIMIZERS
from maskrcnn.model import ARCHS, SMALL
from maskrcnn.train import TrainConfig, run


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = job_parser("jobs/train.py", __doc__)
    d = p.add_argument_group("data (local paths or s3:// URIs)")
    d.add_argument("--train-annotations", required=True, help="COCO instances JSON for training")
    d.add_argument("--train-images", required=True, help="directory holding the training images' file_names")
    d.add_argument("--val-annotations", help="COCO instances JSON evaluated after every epoch")
    d.add_argument("--val-images", help="directory holding the validation images")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default=SMALL, choices=ARCHS, help="architecture (default: %(default)s)")
    m.add_argument(
        "--weights",
        help="initial weights: a torchvision weight name (COCO_V1, MaskRCNN_ResNet50_FPN_Weights.COCO_V1, "
        "ResNet50_Weights.IMAGENET1K_V1), a .pth file or project checkpoint (path or s3://); default: random",
    )
    m.add_argument(
        "--scales", type=_ints, help="training shortest-side sizes, comma-separated; the largest is used to evaluate"
    )
    m.add_argument("--max-size", type=int, help="longest-side cap")
    r = p.add_argument_group("run")
    r.add_argument("--storage", required=True, help="directory or s3:// prefix for checkpoints")
    r.add_argument("--name", required=True, help="run name; re-using it resumes the run")
    r.add_argument("--num-workers", type=int, default=2, help="data-parallel workers (default: %(default)s)")
    r.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default: CPU workers (gloo)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default: %(default)s)")
    r.add_argument(
        "--max-failures", type=int, default=3, help="restarts from the latest checkpoint after a worker dies"
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=12)
    o.add_argument("--batch-size", type=int, default=2, help="images per worker per step (default: %(default)s)")
    o.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd",
        help="sgd (torchvision's recipe; fine-tuning) or adamw (faster from random weights) (default: %(default)s)",
    )
    o.add_argument("--lr", type=float, help="base LR (default: SGD 0.02 x global batch / 16, AdamW 1e-4)")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps")
    o.add_argument("--schedule", choices=("multistep", "cosine"), default="multistep", help="decay after warmup")
    o.add_argument("--clip-norm", type=float, default=10.0, help="gradient clipping norm; 0 disables")
    o.add_argument("--no-amp", action="store_true", help="disable mixed precision on GPU")
    o.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, default=20, help="steps between metric reports")
    g.add_argument(
        "--checkpoint-every", type=int, default=500, help="steps between checkpoints (also after each epoch)"
    )
    g.add_argument(
        "--eval-every", type=int, default=1, help="epochs between validations (the last epoch is always evaluated)"
    )
    return p


def config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        train_annotations=args.train_annotations,
        train_images=args.train_images,
        val_annotations=args.val_annotations,
        val_images=args.val_images,
        storage=args.storage,
        name=args.name,
        arch=args.arch,
        weights=args.weights,
        num_workers=args.num_workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
        epochs=args.epochs,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        clip_norm=args.clip_norm or None,
        amp=not args.no_amp,
        scales=args.scales,
        max_size=args.max_size,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        log_every=args.log_every,
        max_failures=args.max_failures,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.eval_every < 1:
        parser().error(f"--eval-every must be at least 1, got {args.eval_every}")
    cfg = config(args)
    result = run(cfg)
    if result.error:
        raise result.error
    print(f"[train] run directory: {cfg.run_dir}")
    if result.checkpoint:
        print(f"[train] latest checkpoint: {result.checkpoint.path}")
    print(f"[train] best checkpoint: {cfg.run_dir.rstrip('/')}/best.pt (if a validation set was given)")


if __name__ == "__main__":
    run_main(main)
