"""Padded pixels per training batch on real COCO shapes, before and after grouping (issue #34).

    python benchmarks/padding.py

torchvision pads every image of a batch to the batch's largest height and width (rounded
up to 32). Before: batches in the stream's order, each image at its own random scale.
After: :func:`maskrcnn.transforms.batches` (landscape with landscape, portrait with
portrait) and one scale per batch (:meth:`maskrcnn.transforms.Augment.batch_scale`). The
images are ../shared/data/coco_small_train's sizes, in a seeded order, 20 epochs; the
scales are R50's defaults. Prints the mean and 95th percentile of a batch's padded pixels
over its images' own pixels. Nothing here needs Ray; the figures depend only on the sizes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from maskrcnn import transforms
from maskrcnn.model import default_sizes

SHARED = REPO.parent / "shared" / "data"


def scaled(hw: tuple[int, int], scale: int, max_size: int) -> tuple[int, int]:
    """RandomShortestSize's rule."""
    h, w = hw
    r = min(scale / min(h, w), max_size / max(h, w))
    return int(h * r), int(w * r)


def padding(shapes: list[tuple[int, int]]) -> float:
    height, width = (-(-max(s[i] for s in shapes) // 32) * 32 for i in (0, 1))
    return height * width * len(shapes) / sum(h * w for h, w in shapes)


def before(order: list[tuple[int, int]], batch: int, scales: tuple[int, ...], max_size: int) -> list[float]:
    rng = random.Random(0)
    chunks = [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]
    return [padding([scaled(hw, rng.choice(scales), max_size) for hw in chunk]) for chunk in chunks]


def after(order: list[tuple[int, int]], batch: int, scales: tuple[int, ...], max_size: int) -> list[float]:
    augment = transforms.Augment(scales, max_size)
    rows = [{"image_id": np.array(i), "image": np.zeros((0, h, w), np.uint8)} for i, (h, w) in enumerate(order)]
    stream = ({k: [r[k] for r in rows[i : i + 64]] for k in ("image_id", "image")} for i in range(0, len(rows), 64))
    out = []
    for step, group in enumerate(transforms.batches(stream, batch)):
        torch.manual_seed(step)  # as the worker seeds each step
        scale = augment.batch_scale()
        out.append(padding([scaled(np.shape(r["image"])[-2:], scale, max_size) for r in group]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", default=str(SHARED / "coco_small_train" / "instances_train2017.json"))
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    sizes = [(im["height"], im["width"]) for im in json.loads(Path(args.annotations).read_text())["images"]]
    portrait = sum(h > w for h, w in sizes)
    scales, max_size = default_sizes("maskrcnn_resnet50_fpn")
    order = []
    for epoch in range(args.epochs):
        shuffled = sizes[:]
        random.Random(epoch).shuffle(shuffled)
        order += [scaled(hw, max(scales), max_size) if min(hw) > max(scales) else hw for hw in shuffled]
    print(f"{len(sizes)} COCO image sizes ({portrait} portrait), scales {scales}, longest side {max_size}")
    print("batch | before: mean, p95 | after: mean, p95")
    for batch in (2, 4, 8):
        b, a = before(order, batch, scales, max_size), after(order, batch, scales, max_size)
        print(
            f"{batch:5} | {np.mean(b):.3f}, {np.percentile(b, 95):.3f} | {np.mean(a):.3f}, {np.percentile(a, 95):.3f}"
        )


if __name__ == "__main__":
    main()
