"""Training from Parquet labels at scale: the driver's peak RSS and the time from start to the
first training step, against the number of label rows.

    python benchmarks/train_data_scale.py                          # 10k, 100k, 1M rows
    python benchmarks/train_data_scale.py --rows 10000,200000

1. Converts the 80 real COCO images of ../shared/data/coco_small_train to Parquet labels
   (jobs/coco_to_parquet.py), then repeats those rows (9 instances each on average, real RLE
   masks) into labels of each size, in part files of 1000 rows. The rows need not point at
   distinct images: only the labels grow.
2. Runs jobs/train.py on each (--max-steps 1, 2 CPU workers, the small model) in a fresh
   process, sampling that process's RSS (the driver's: Ray's own processes are apart) every
   50 ms, and timing the first ``step 1/`` line from the process's start.

Prints one line per size and each figure as a ratio of the smallest size's, measured in one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from maskrcnn import output  # noqa: E402

ROWS_PER_FILE = 1000


def make_labels(seed_labels: str, rows: int, out: str) -> None:
    """``rows`` label rows, the seed's rows over and over, in part files of 1000."""
    table = pa.concat_tables([pq.read_table(uri) for uri in output.part_files(seed_labels)])
    table = table.replace_schema_metadata(None)
    os.makedirs(out, exist_ok=True)
    repeats = pa.concat_tables([table] * (ROWS_PER_FILE // table.num_rows + 1)).slice(0, ROWS_PER_FILE)
    for part in range(rows // ROWS_PER_FILE):
        pq.write_table(repeats, output.part_uri(out, part), compression="zstd")
    meta = output.read_meta(seed_labels)
    output.write_categories(out, meta["categories"], meta.get("orientation", output.DISPLAYED))


def first_step(labels: str, runs: str) -> tuple[float, float]:
    """jobs/train.py on ``labels`` until its first step: (seconds from start, driver peak RSS MiB)."""
    args = "--num-workers 2 --batch-size 2 --scales 128 --max-size 192 --max-steps 1 --log-every 1 --epochs 1"
    command = [sys.executable, "jobs/train.py", "--train-annotations", labels, "--storage", runs, "--name", "r"]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*command, *args.split()], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        handle = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak = max(peak, handle.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds, tail = None, []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        if seconds is None and "step 1/" in line:
            seconds = time.perf_counter() - start
    proc.wait()
    done.set()
    sampler.join()
    if proc.returncode != 0 or seconds is None:
        raise SystemExit(f"training on {labels} failed:\n{''.join(tail)}")
    return seconds, peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="10000,100000,1000000", help="label row counts, comma-separated")
    p.add_argument("--coco", default=os.path.join(REPO, "..", "shared", "data", "coco_small_train"))
    args = p.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="train-data-scale-") as tmp:
        seed = os.path.join(tmp, "seed")
        convert = ["--annotations", f"{args.coco}/instances_train2017.json", "--images", f"{args.coco}/images"]
        subprocess.run([sys.executable, "jobs/coco_to_parquet.py", *convert, "--output", seed], cwd=REPO, check=True)
        results = []
        for rows in sizes:
            labels = os.path.join(tmp, f"labels-{rows}")
            make_labels(seed, rows, labels)
            seconds, rss = first_step(labels, os.path.join(tmp, f"runs-{rows}"))
            results.append((rows, seconds, rss))
            print(f"[bench] {rows} rows: first step after {seconds:.1f} s, driver peak RSS {rss:.0f} MiB", flush=True)
    print(f"\ntraining from Parquet labels on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'label rows':>11} {'first step s':>13} {'ratio':>6} {'driver peak MiB':>16} {'ratio':>6}")
    base_s, base_rss = results[0][1], results[0][2]
    for rows, seconds, rss in results:
        print(f"{rows:>11} {seconds:>13.1f} {seconds / base_s:>5.2f}x {rss:>16.0f} {rss / base_rss:>5.2f}x")


if __name__ == "__main__":
    main()
