"""Training throughput (images/s, all workers together) of the small and the R50-FPN
models with 1 and 2 Ray Train workers, on whatever this machine has (GPUs with --gpu).

    python benchmarks/train_throughput.py                  # CPU workers
    python benchmarks/train_throughput.py --gpu --size 512 # one GPU per worker

It trains on a generated shapes dataset for 2 epochs and prints the second epoch's rate
(the first includes start-up). Data loading runs in Ray Data tasks, as in real training.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ray
import torch

from maskrcnn.synthetic import generate_split
from maskrcnn.train import TrainConfig, run


def measure(root: str, arch: str, workers: int, args: argparse.Namespace) -> float:
    cfg = TrainConfig(
        train_annotations=f"{root}/train/annotations.json",
        train_images=f"{root}/train/images",
        storage=f"{root}/runs",
        name=f"{arch}-{workers}-{time.time_ns()}",
        arch=arch,
        num_workers=workers,
        gpu=args.gpu,
        batch_size=args.batch_size,
        epochs=2,
        scales=(args.size,),
        max_size=int(args.size * 1.5),
        log_every=1000,
        checkpoint_every=10**6,
        warmup_steps=2,
        lr=0.005,
    )
    result = run(cfg)
    if result.error:
        raise result.error
    return float(result.metrics["train_images_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--images", type=int, default=32, help="training images (default: %(default)s)")
    p.add_argument("--size", type=int, default=128, help="shortest side in pixels (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="images per worker per step (default: %(default)s)")
    p.add_argument("--archs", default="maskrcnn_resnet18_fpn_small,maskrcnn_resnet50_fpn")
    p.add_argument("--workers", default="1,2")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        generate_split(f"{root}/train", args.images, seed=0, size_range=(args.size, int(args.size * 1.25)))
        rows = [
            (a, int(w), measure(root, a, int(w), args)) for a in args.archs.split(",") for w in args.workers.split(",")
        ]
    device = (
        torch.cuda.get_device_name()
        if args.gpu
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(f"\nmachine: {device}; torch {torch.__version__}; ray {ray.__version__}")
    print(f"images ~{args.size} px, batch {args.batch_size} per worker\n")
    print(f"{'arch':32} {'workers':>7} {'images/s':>9}")
    for arch, workers, rate in rows:
        print(f"{arch:32} {workers:>7} {rate:>9.2f}")


if __name__ == "__main__":
    main()
