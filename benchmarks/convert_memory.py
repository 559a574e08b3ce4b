"""COCO -> Parquet labels on a COCO file of train2017's size and shape: peak RSS and wall time
of jobs/coco_to_parquet.py, beside json.load of the same file and the COCO path's driver
(maskrcnn.coco.load_coco, what jobs/train.py does with a COCO file before its first worker).

    python benchmarks/convert_memory.py                    # 118,287 images (train2017's count)
    python benchmarks/convert_memory.py --images 11829     # a tenth

1. Writes the file, streamed: per image 7.3 annotations on average (train2017's 860,832 /
   118,287), polygons of 12..40 points, 7.9% of them in two parts, 1.2% crowd regions as
   uncompressed RLE, sparse category ids (COCO's 80 of 1..90).
2. Runs each reader in a fresh process and reads its peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
READERS = {
    "(importing maskrcnn.data: torch)": "from maskrcnn import data",
    "(importing maskrcnn.convert: no torch)": "from maskrcnn import convert",
    "json.load": "import json; json.load(open(sys.argv[1]))",
    "load_coco (the COCO path's driver)": "from maskrcnn import coco; coco.load_coco(sys.argv[1], '/images')",
}
MEASURE = """
import resource, sys, time
sys.path.insert(0, {repo!r})
start = time.perf_counter()
{code}
print("RESULT", time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_coco(path: str, images: int, seed: int = 0) -> int:
    """A train2017-shaped instances file at ``path``; returns the annotation count."""
    rng = random.Random(seed)
    ann_id = 0
    with open(path, "w") as f:
        f.write('{"images": [')
        sizes = []
        for i in range(1, images + 1):
            w, h = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375), (640, 360)])
            sizes.append((w, h))
            f.write(
                ("," if i > 1 else "") + json.dumps({"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
            )
        f.write('], "annotations": [')
        for i, (w, h) in enumerate(sizes, start=1):
            for _ in range(max(0, round(rng.gauss(7.28, 4)))):
                ann_id += 1
                f.write(("," if ann_id > 1 else "") + json.dumps(_annotation(rng, ann_id, i, w, h)))
        categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in COCO_IDS]
        f.write(f'], "categories": {json.dumps(categories)}}}')
    return ann_id


def _annotation(rng: random.Random, ann_id: int, image_id: int, w: int, h: int) -> dict:
    cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(8, min(w, h) / 4)
    ann = {"id": ann_id, "image_id": image_id, "category_id": rng.choice(COCO_IDS), "iscrowd": 0}
    if rng.random() < 0.012:  # a crowd region: uncompressed RLE of a box
        x0, y0, bw, bh = int(cx - r), int(cy - r), int(2 * r), int(2 * r)
        counts, at = [], 0
        for col in range(w):
            if x0 <= col < x0 + bw:
                counts += [col * h + y0 - at, bh]
                at = col * h + y0 + bh
        counts.append(w * h - at)
        ann.update(iscrowd=1, segmentation={"size": [h, w], "counts": counts}, bbox=[x0, y0, bw, bh], area=bw * bh)
        return ann
    parts = [_polygon(rng, cx, cy, r)] + ([_polygon(rng, cx + r, cy, r / 2)] if rng.random() < 0.079 else [])
    xs = [v for p in parts for v in p[0::2]]
    ys = [v for p in parts for v in p[1::2]]
    ann.update(segmentation=parts, bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)])
    ann["area"] = round(math.pi * r * r, 2)
    return ann


def _polygon(rng: random.Random, cx: float, cy: float, r: float) -> list[float]:
    n = rng.randint(12, 40)
    points = []
    for k in range(n):
        a, rr = 2 * math.pi * k / n, r * rng.uniform(0.7, 1.0)
        points += [round(max(0.0, cx + rr * math.cos(a)), 2), round(max(0.0, cy + rr * math.sin(a)), 2)]
    return points


def measure(code: str, *args: str) -> tuple[float, float]:
    script = MEASURE.format(repo=REPO, code=code)
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT")]
    if done.returncode != 0 or not line:
        raise SystemExit(f"failed: {done.stderr[-2000:]}")
    _, seconds, kb = line[0].split()
    return float(seconds), int(kb) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=118_287)
    p.add_argument("--skip-load-coco", action="store_true", help="leave out the slowest reader")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="convert-memory-") as tmp:
        path = os.path.join(tmp, "instances.json")
        start = time.perf_counter()
        annotations = write_coco(path, args.images)
        size = os.path.getsize(path) / 2**20
        print(f"[bench] {args.images} images, {annotations} annotations, {size:.0f} MiB "
              f"(written in {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        rows = []
        for name, code in READERS.items():
            if args.skip_load_coco and "load_coco" in name:
                continue
            rows.append((name, *measure(code, path)))
            print(f"[bench] {name}: {rows[-1][1]:.1f} s, {rows[-1][2]:.0f} MiB", flush=True)
        convert = (
            "import runpy; sys.argv = ['jobs/coco_to_parquet.py', '--annotations', sys.argv[1], '--images', "
            "'/images', '--output', sys.argv[2]]; runpy.run_path('jobs/coco_to_parquet.py', run_name='__main__')"
        )
        rows.append(("jobs/coco_to_parquet.py", *measure(convert, path, os.path.join(tmp, "labels"))))
        labels = sum(os.path.getsize(os.path.join(tmp, "labels", n)) for n in os.listdir(os.path.join(tmp, "labels")))
    print(f"\n{args.images} images, {annotations} annotations, {size:.0f} MiB of JSON -> {labels / 2**20:.0f} MiB "
          f"of Parquet; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'reader':<36} {'wall s':>7} {'peak RSS MiB':>13}")
    for name, seconds, mib in rows:
        print(f"{name:<36} {seconds:>7.1f} {mib:>13.0f}")


if __name__ == "__main__":
    main()
