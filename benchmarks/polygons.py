"""Polygons from masks (maskrcnn.masks.to_polygons): how close they stay to the masks, how
many points they take, and what they cost, at several --polygon-tolerance values side by side.

    python benchmarks/polygons.py                              # coco_small, as taken and at 12 MP
    python benchmarks/polygons.py --labels demo_out/labels     # and a segmentation output's masks

Masks measured:
1. coco_small's real COCO masks (polygons, multi-part polygons, crowd RLEs) at their size (640 px);
2. the same masks at a 12 MP photo's size (4000 x 3000 px): their polygons scaled by 6.25 and
   drawn again, smooth as COCO_V1's pasted 28 x 28 masks are at photo size;
3. with --labels, every mask of that output (e.g. the demo's).

Each mask -> polygons -> the mask pycocotools draws from them; the IoU of the two is computed
on the runs (pycocotools.mask.iou).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from pycocotools import mask as mask_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maskrcnn import masks, output

SCALE = 6.25  # 640 x 480 -> 4000 x 3000
TOLERANCES = (0.0, 0.5, 1.0, 2.0)


def coco_masks(annotations: str, scale: float = 1.0) -> list[dict]:
    gt = json.load(open(annotations))
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    found = []
    for ann in gt["annotations"]:
        h, w = sizes[ann["image_id"]]
        segm = ann["segmentation"]
        if scale != 1.0:
            if not isinstance(segm, list):
                continue  # crowd RLEs are not scaled
            segm = [[v * scale for v in part] for part in segm]
            h, w = round(h * scale), round(w * scale)
        rle = masks.to_compressed(segm, h, w)
        if masks.area(rle) > 0:
            found.append(rle)
    return found


def output_masks(labels: str) -> list[dict]:
    return [i["mask"] for row in output.read_rows(labels) if not row["error"] for i in row["instances"] if i["mask"]]


def measure(rles: list[dict], tolerance: float) -> dict:
    ious, points, empty = [], [], 0
    start = time.perf_counter()
    for rle in rles:
        polygons = masks.to_polygons(rle, tolerance)
        if not polygons:
            empty += 1
            ious.append(0.0)
            continue
        points.append(sum(len(p) // 2 for p in polygons))
        drawn = masks.to_compressed(polygons, *rle["size"])
        ious.append(float(mask_utils.iou([dict(rle)], [drawn], [0])[0, 0]))
    seconds = time.perf_counter() - start
    ious = np.array(ious)
    return {
        "mean IoU": ious.mean(),
        "median": float(np.median(ious)),
        "min": ious.min(),
        "< 0.9": int((ious < 0.9).sum()),
        "no polygon": empty,
        "points": np.mean(points) if points else 0.0,
        "ms/mask": 1000 * seconds / max(len(rles), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = os.environ.get("MASKRCNN_TEST_DATA", os.path.join(REPO, "..", "shared", "data"))
    parser.add_argument("--annotations", default=os.path.join(data, "coco_small", "instances_val2017.json"))
    parser.add_argument("--labels", help="a segmentation output whose masks to measure too")
    args = parser.parse_args()
    sets = {
        "coco_small 640 px": coco_masks(args.annotations),
        "coco_small at 12 MP": coco_masks(args.annotations, SCALE),
    }
    if args.labels:
        sets[f"{args.labels}"] = output_masks(args.labels)
    print(f"# {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    columns = ["mean IoU", "median", "min", "< 0.9", "no polygon", "points", "ms/mask"]
    print(f"{'masks':28} {'n':>5} {'tol px':>6} " + " ".join(f"{c:>10}" for c in columns))
    for name, rles in sets.items():
        for tolerance in TOLERANCES:
            row = measure(rles, tolerance)
            cells = " ".join(f"{row[c]:>10.4f}" if isinstance(row[c], float) else f"{row[c]:>10}" for c in columns)
            print(f"{name[:28]:28} {len(rles):>5} {tolerance:>6} {cells}")


if __name__ == "__main__":
    main()
