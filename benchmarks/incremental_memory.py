"""What an incremental run finds new, at two dataset sizes: the driver's peak RSS and the
wall time of the anti-join (maskrcnn.incremental.new_inputs) and of writing the new run's
manifest, with 10,000 and 200,000 rows in the earlier runs and 1,000 new inputs each time.

    python benchmarks/incremental_memory.py
    python benchmarks/incremental_memory.py --rows 10000 1000000

1. Writes a labels dataset of N rows (part files of 1,000 rows, as --rows-per-file
   writes them; error rows, the smallest rows there are) and a .txt manifest that lists
   those N URIs and 1,000 more, as an archive that grew would.
2. In a fresh process each (a local Ray on this machine), runs what
   ``jobs/segment_bucket.py --incremental`` runs before its new run's first image, and
   reads the driver's peak RSS (ru_maxrss), and how much of it came after Ray had started
   (the growth). The driver must not grow with the dataset.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 1000
MEASURE = """
import resource, sys, time
sys.path.insert(0, {repo!r})
from maskrcnn import incremental, output
from maskrcnn.runtime import init_ray
from maskrcnn.segment import SegmentConfig

init_ray(min_cpus=2)
cfg = SegmentConfig(input=sys.argv[1], output=sys.argv[2], model="unused.pt", incremental=True)
start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
new = incremental.write_manifest(incremental.new_inputs(cfg, output.part_files(cfg.output)), sys.argv[3])
print("RESULT", new, time.perf_counter() - start, start_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=(10_000, 200_000), metavar=("SMALL", "LARGE"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            root = os.path.join(tmp, f"labels{rows}")
            manifest = write_dataset(root, rows)
            results[rows] = measure(manifest, root, os.path.join(tmp, f"new{rows}.parquet"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'earlier rows':>14} {'new':>6} {'join + manifest s':>18} {'peak driver RSS MB':>19} {'of it, growth':>14}")
    for rows, (new, wall, start_rss, peak) in results.items():
        print(f"{rows:>14,} {new:>6} {wall:>18.1f} {peak / 1024:>19.0f} {(peak - start_rss) / 1024:>14.0f}")
    (*_, small_peak), (*_, large_peak) = results.values()
    print(f"peak driver RSS, {args.rows[1]:,} rows / {args.rows[0]:,} rows: {large_peak / small_peak:.2f}x")


def write_dataset(root: str, rows: int) -> str:
    """N rows of earlier runs at ``root``, and the grown archive's manifest; returns its path."""
    sys.path.insert(0, REPO)
    from maskrcnn import output

    os.makedirs(os.path.join(root, "run-20261201T000000Z"))
    uri = "/archive/photo{:08d}.jpg".format
    for part in range(0, rows, 1000):
        batch = [output.row(uri(i), (0, 0), "missing: benchmark", "m") for i in range(part, min(rows, part + 1000))]
        output.write_part(os.path.join(root, "run-20261201T000000Z"), part // 1000, batch)
    manifest = os.path.join(root + ".txt")
    with open(manifest, "w") as f:
        f.writelines(f"{uri(i)}\n" for i in range(rows + NEW))
    return manifest


def measure(manifest: str, root: str, new: str) -> tuple[int, float, int, int]:
    code = MEASURE.format(repo=REPO)
    done = subprocess.run([sys.executable, "-c", code, manifest, root, new], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode or not lines:
        sys.exit(f"benchmark run failed:\n{done.stderr[-3000:]}")
    count, wall, start_rss, peak = lines[0].split()[1:]
    return int(count), float(wall), int(start_rss), int(peak)


if __name__ == "__main__":
    main()
