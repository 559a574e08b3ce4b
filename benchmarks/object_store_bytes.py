"""Bytes per item that the CPU tasks hand the GPUs through Ray's object store (issue #34).

    python benchmarks/object_store_bytes.py

1. Training: each record of ../shared/data/coco_small_train (real COCO photos and
   polygons) through the training dataset's map function (:class:`maskrcnn.loading.LoadExample`)
   at 800 px, longest side 1333: the bytes of the row it returns, by column.
2. Segmentation: real photos scaled up to 12 MP (4032 x 3024) JPEGs through the decode task
   (:func:`maskrcnn.inference.fetch_and_decode`) for an 800 px model: the bytes of each row.

A row's bytes are what Ray stores for it: its arrays' ``nbytes`` and its strings' lengths.
Nothing here needs Ray or a GPU; the figures depend only on the data, not on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np
from PIL import Image

from maskrcnn import coco, inference, loading

SHARED = REPO.parent / "shared" / "data"


def row_bytes(row: dict) -> Counter:
    """Bytes per column of one row as Ray stores it."""
    sizes = Counter()
    for key, value in row.items():
        if isinstance(value, np.ndarray):
            sizes[key] += value.nbytes
        elif isinstance(value, (str, bytes)):
            sizes[key] += len(value)
        else:
            sizes[key] += 8
    return sizes


def training(annotations: str, images: str, size: int, max_size: int) -> None:
    records = coco.load_coco(annotations, images).records
    load = loading.LoadExample(size, max_size)
    total, instances = Counter(), 0
    for record in records:
        total += row_bytes(load(record))
        instances += len(json.loads(record["annotations"]))
    n = len(records)
    print(f"1. training example at {size} px, {n} COCO images, {instances / n:.1f} instances an image:")
    for key, value in total.most_common():
        print(f"   {key:10} {value / n / 1e6:8.3f} MB")
    print(f"   {'all':10} {sum(total.values()) / n / 1e6:8.3f} MB per example")


def segmentation(fit: tuple[int, int]) -> None:
    total = Counter()
    names = ("person1.jpg", "dog1.jpg", "astronaut.jpg", "dog2.jpg")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            photo = Image.open(SHARED / "photos" / name).convert("RGB").resize((4032, 3024), Image.BICUBIC)
            buf = io.BytesIO()
            photo.save(buf, "JPEG", quality=92)
            Path(tmp, name).write_bytes(buf.getvalue())
        batch = {"uri": np.array([os.path.join(tmp, n) for n in names], dtype=object)}
        out = inference.fetch_and_decode(batch, max_pixels=10**9, fit=fit)
        for i in range(len(names)):
            total += row_bytes({k: v[i] for k, v in out.items()})
        shape = out["image"][0].shape
    print(f"2. segmentation of a 12 MP JPEG for a {fit[0]} px model (image {shape[1]} x {shape[0]}):")
    print(f"   {sum(total.values()) / len(names) / 1e6:.3f} MB per image")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", default=str(SHARED / "coco_small_train" / "instances_train2017.json"))
    p.add_argument("--images", default=str(SHARED / "coco_small_train" / "images"))
    p.add_argument("--size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    args = p.parse_args()
    training(args.annotations, args.images, args.size, args.max_size)
    segmentation((args.size, args.max_size))


if __name__ == "__main__":
    main()
