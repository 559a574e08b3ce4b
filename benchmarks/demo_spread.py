"""How far the demo's AP moves: the demo's own data and training command (scripts/demo.py),
run with several training seeds, and once more with each worker on 2 threads instead of 1,
a different numerical path (other kernels' blocking, another summation order), as another
CPU would take. It prints each run's validation mask AP at every evaluation, the
worst, and the margin of the worst over the demo's promise.

    python benchmarks/demo_spread.py                       # seeds 0,1,2 and seed 0 on 2 threads
    python benchmarks/demo_spread.py --seeds 0 --threads 1 # one run

Each run takes as long as the demo's training step (most of `make demo`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from maskrcnn.config import ints  # noqa: E402


def _demo_script():
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look their module up
    spec.loader.exec_module(module)
    return module


DEMO = _demo_script()


def train(data: str, runs: str, seed: int, threads: int) -> list[tuple[int, float]]:
    """One demo training run; its validation mask APs as (step, AP)."""
    name = f"seed{seed}-threads{threads}"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), RAY_DATA_DISABLE_PROGRESS_BARS="1")
    command = [sys.executable, "jobs/train.py", *DEMO.train_flags(data, runs), "--seed", str(seed), "--name", name]
    start = time.perf_counter()
    with open(f"{runs}/{name}.log", "w") as log:
        subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    minutes = (time.perf_counter() - start) / 60
    rows = [json.loads(line) for line in Path(f"{runs}/{name}/metrics.jsonl").read_text().splitlines()]
    aps = [(r["step"], r["val_segm_AP"]) for r in rows if r["kind"] == "val"]
    print(
        f"seed {seed}, {threads} thread(s) a worker: "
        + ", ".join(f"step {s} {ap:.3f}" for s, ap in aps)
        + f" ({minutes:.1f} min)",
        flush=True,
    )
    return aps


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=ints, default=(0, 1, 2), help="training seeds (default: 0,1,2)")
    p.add_argument(
        "--threads",
        type=ints,
        default=(1, 2),
        help="threads a worker; the first runs every seed, the others seed 0 (default: 1,2)",
    )
    p.add_argument("--out", default=None, help="where the data and runs go (default: a temporary folder)")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        data, runs = f"{out}/data", f"{out}/runs"
        os.makedirs(runs, exist_ok=True)
        DEMO.generate(data)
        finals = [train(data, runs, seed, args.threads[0])[-1][1] for seed in args.seeds]
        finals += [train(data, runs, args.seeds[0], threads)[-1][1] for threads in args.threads[1:]]
    worst, promise = min(finals), DEMO.SHAPES.promised_ap
    print(
        f"final mask AP: worst {worst:.3f}, best {max(finals):.3f}, spread {max(finals) - worst:.3f}; "
        f"promise {promise}: the worst is {worst - promise:+.3f} above it"
    )


if __name__ == "__main__":
    main()
