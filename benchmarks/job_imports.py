"""What each job loads before it says anything: the modules ``python jobs/<job>.py --help``
imports (the project's own, all of them, and whether torch is among them), and the time
to its first line of output (issue #36).

    python benchmarks/job_imports.py [--repo PATH] [--runs 5]

``--repo`` measures another checkout (an older commit, for a before and after) with this
interpreter. The time is the median of ``--runs`` fresh processes, each timed from its start
to the first byte on stdout.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = ["train", "segment_bucket", "coco_to_parquet", "evaluate", "export", "predict"]


def imported(repo: str, job: str) -> list[str]:
    """The modules ``jobs/<job>.py --help`` imports, from ``-X importtime``'s report."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", f"jobs/{job}.py", "--help"], cwd=repo, capture_output=True, text=True
    )
    return [line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")][1:]


def first_line(repo: str, job: str) -> float:
    """Seconds from the process's start to the first byte of its --help."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, f"jobs/{job}.py", "--help"], cwd=repo, stdout=subprocess.PIPE)
    proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.communicate()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=HERE, help="the checkout to measure (default: this one)")
    p.add_argument("--runs", type=int, default=5, help="fresh processes per job for the time (default: %(default)s)")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; {args.repo}")
    print("| job | project modules | all modules | torch | draw, export | first line (s) |")
    print("|---|---|---|---|---|---|")
    for job in JOBS:
        modules = imported(args.repo, job)
        own = [m for m in modules if m.startswith("maskrcnn.")]
        torch = "yes" if "torch" in modules else "no"
        leaks = ", ".join(m for m in ("maskrcnn.draw", "maskrcnn.export") if m in modules) or "none"
        seconds = statistics.median(first_line(args.repo, job) for _ in range(args.runs))
        print(f"| `{job}.py` | {len(own)} | {len(modules)} | {torch} | {leaks} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
