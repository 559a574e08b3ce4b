"""Validation wall time in training, at 2 workers (issue #34).

    python benchmarks/validation_time.py [--workers 2] [--size 320]

Trains the small model for 2 steps on ../shared/data/coco_small_train, then validates on
../shared/data/coco_small (80 real COCO photos, 80 categories), as ``jobs/train.py`` does.
The figure is the time between the last training step's record and the validation record
in the run's metrics.jsonl: prediction, matching and scoring, and the wait for the other
workers. Run it on two commits to compare them.

Then the scoring alone, without Ray: coco_small's ground truth as results, jittered, 100
detections an image, scored in one process (as rank 0 did before) and split in 2 and 8
parts (each worker matches its share, then one merges and summarises): the time the
slowest worker spends, which every other one waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from maskrcnn import metric
from maskrcnn.train import TrainConfig, run

SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=320, help="shortest side (default: %(default)s)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            train_annotations=str(SHARED / "coco_small_train" / "instances_train2017.json"),
            train_images=str(SHARED / "coco_small_train" / "images"),
            val_annotations=str(SHARED / "coco_small" / "instances_val2017.json"),
            val_images=str(SHARED / "coco_small" / "images"),
            storage=tmp,
            name="validation",
            num_workers=args.workers,
            batch_size=1,
            scales=(args.size,),
            max_size=int(args.size * 5 / 3),
            max_steps=2,
            log_every=1,
            warmup_steps=1,
        )
        result = run(cfg)
        if result.error:
            raise result.error
        records = [json.loads(line) for line in Path(tmp, "validation", "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = next(r for r in records if r["kind"] == "val")
    print(f"{args.workers} workers, small model at {args.size} px, 80 COCO val photos, {os.cpu_count()} cores:")
    print(f"  validation wall time {val['time'] - train[-1]['time']:.1f} s; mask AP {val['val_segm_AP']:.3f}")
    scoring()


def scoring() -> None:
    gt = json.loads((SHARED / "coco_small" / "instances_val2017.json").read_text())
    rng = np.random.default_rng(0)
    results = []
    for ann in gt["annotations"]:
        if not ann.get("iscrowd"):
            for _ in range(3):
                box = [v + float(rng.normal(0, 4)) for v in ann["bbox"]]
                results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": box,
                                "segmentation": ann["segmentation"], "score": float(rng.uniform())})  # fmt: skip
    api = metric.coco_api(gt)
    ids = sorted(api.getImgIds())
    start = time.perf_counter()
    metric.score(api, results, ids)
    print(f"scoring {len(results)} results on {len(ids)} images: one process {time.perf_counter() - start:.2f} s")
    for world in (2, 8):
        slowest, parts = 0.0, []
        for rank in range(world):
            share, start = ids[rank::world], time.perf_counter()
            parts.append(metric.score_part(api, [r for r in results if r["image_id"] in share], share))
            slowest = max(slowest, time.perf_counter() - start)
        start = time.perf_counter()
        metric.summarize(api, parts)
        merge = time.perf_counter() - start
        print(f"  split in {world}: slowest part {slowest:.2f} s + merge {merge:.2f} s = {slowest + merge:.2f} s")


if __name__ == "__main__":
    main()
