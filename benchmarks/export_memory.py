"""Export memory: the driver's peak RSS against the number of rows exported.

    python benchmarks/export_memory.py                 # 1k and 10k rows
    python benchmarks/export_memory.py --rows 1000,10000,30000

1. Writes segmentation outputs of each size (part files of 1000 rows, as the job writes
   them): 640x480 images with ``--instances`` instances each, real RLE masks of ellipses,
   every 50th row an error row.
2. Runs ``jobs/export.py --coco-results --coco-dataset`` on each, in a fresh process, and
   reads that process's peak RSS; then, for contrast, the same two files built the way
   export worked before it streamed (every row in a list, the JSON dumped whole).

Prints one line per size and the ratio of the largest to the smallest: streaming export
should stay flat (about 1x) while the whole-list way grows with the rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from maskrcnn import masks, output

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURE = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
WHOLE_LIST = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from maskrcnn import export, masks, metric
rows = list(export.read_rows(sys.argv[2]))
results, images, annotations = [], [], []
for row in (r for r in rows if not r["error"]):
    images.append({"id": len(images) + 1, "file_name": row["uri"], "width": row["width"], "height": row["height"]})
    results += metric.to_results(row["instances"], len(images))
    annotations += [dict(r, id=len(annotations) + k + 1, area=masks.area(r["segmentation"]), iscrowd=0)
                    for k, r in enumerate(metric.to_results(row["instances"], len(images)))]
open(sys.argv[3] + "/r.json", "w").write(json.dumps(results))
open(sys.argv[3] + "/d.json", "w").write(json.dumps({"images": images, "annotations": annotations, "categories": []}))
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_output(path: str, rows: int, per_image: int, rng: np.random.Generator) -> None:
    """Part files of 1000 rows with ``per_image`` elliptical instance masks per image."""
    yy, xx = np.mgrid[:480, :640]
    shapes = []
    for _ in range(64):  # a pool of distinct masks, reused: encoding is not what is measured
        cx, cy, rx, ry = rng.uniform(60, 580), rng.uniform(60, 420), rng.uniform(10, 120), rng.uniform(10, 120)
        binary = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1).astype(np.uint8)
        ys, xs = np.nonzero(binary)
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        shapes.append((masks.encode(binary[None])[0], box))
    for shard in range(0, rows, 1000):
        part = []
        for i in range(shard, min(rows, shard + 1000)):
            if i % 50 == 49:
                part.append(
                    {
                        "uri": f"s3://archive/{i:07d}.jpg",
                        "width": None,
                        "height": None,
                        "instances": [],
                        "model": "m",
                        "error": "corrupt: truncated",
                    }
                )
                continue
            chosen = rng.choice(len(shapes), per_image, replace=False)
            instances = [
                {
                    "category_id": int(k % 80) + 1,
                    "category": f"class{k % 80}",
                    "score": float(rng.uniform(0.5, 1)),
                    "bbox": shapes[k][1],
                    "mask": shapes[k][0],
                }
                for k in chosen
            ]
            part.append(
                {
                    "uri": f"s3://archive/{i:07d}.jpg",
                    "width": 640,
                    "height": 480,
                    "instances": instances,
                    "model": "m",
                    "error": None,
                }
            )
        output.write_part(path, shard // 1000, part)


def peak(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return its peak RSS in MiB and its wall time in seconds."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-2000:])
    kb = int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("PEAK_KB")))
    return kb / 1024, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1000,10000", help="output sizes, comma-separated (default: %(default)s)")
    p.add_argument("--instances", type=int, default=10, help="instances per image (default: %(default)s)")
    args = p.parse_args()
    sizes = [int(v) for v in args.rows.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.instances} instances per 640x480 image")
    print(f"{'rows':>7} {'JSON MiB':>9} {'streaming MiB':>14} {'s':>6} {'whole-list MiB':>15} {'s':>6}")
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            out = os.path.join(tmp, f"out{rows}")
            make_output(out, rows, args.instances, np.random.default_rng(0))
            res, ds = os.path.join(tmp, f"r{rows}.json"), os.path.join(tmp, f"d{rows}.json")
            streaming = peak(
                [
                    sys.executable,
                    "-c",
                    MEASURE,
                    "jobs/export.py",
                    "--predictions",
                    out,
                    "--coco-results",
                    res,
                    "--coco-dataset",
                    ds,
                ]
            )
            size = (os.path.getsize(res) + os.path.getsize(ds)) / 2**20
            whole = peak([sys.executable, "-c", WHOLE_LIST, REPO, out, tmp])
            figures.append((streaming[0], whole[0]))
            print(
                f"{rows:>7} {size:>9.1f} {streaming[0]:>14.0f} {streaming[1]:>6.1f} {whole[0]:>15.0f} {whole[1]:>6.1f}"
            )
    (s0, w0), (s1, w1) = figures[0], figures[-1]
    print(f"peak RSS at {sizes[-1]} rows over {sizes[0]}: streaming {s1 / s0:.2f}x, whole-list {w1 / w0:.2f}x")


if __name__ == "__main__":
    main()
