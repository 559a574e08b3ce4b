"""Self-training, measured: a teacher trained on a few labelled images labels an archive, and
a student trains on the human labels plus the teacher's confident labels (Zoph et al.,
"Rethinking Pre-training and Self-training", NeurIPS 2020). Both start from random weights
and get the same number of optimizer steps, so what differs is the data.

    python benchmarks/self_training.py                        # 100 labelled, 600 unlabelled
    python benchmarks/self_training.py --labelled 100 --archive 1200 --steps 300

It runs the project's own jobs, in this order, the loop docs/training.md shows:
  1. jobs/train.py          the teacher, on the labelled split
  2. jobs/segment_bucket.py the teacher labels the archive split (its own labels unused)
  3. jobs/train.py          the student: --train-annotations train.json,labels/ --min-score S
  4. jobs/evaluate.py       both best.pt on the val split
and prints their AP side by side. Everything goes under --out (default bench_out/self_training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The demo's recipe (scripts/demo.py): the small model from random weights, AdamW, 2 CPU workers.
TRAIN = (
    "--batch-size 4 --scales 128 --max-size 192 --optimizer adamw --lr 0.002 --schedule cosine "
    "--warmup-steps 30 --log-every 50 --num-workers 2"
)
GLOBAL_BATCH = 8


def run(*args: str) -> None:
    command = [sys.executable, *args]
    print("$ " + shlex.join(command), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"failed: {shlex.join(command)}")


def train(out: Path, name: str, annotations: str, epochs: int, *extra: str) -> str:
    data = out / "data"
    run(
        "jobs/train.py", "--train-annotations", annotations, "--train-images", str(data / "train" / "images"),
        "--val-annotations", str(data / "val" / "annotations.json"), "--val-images", str(data / "val" / "images"),
        "--storage", str(out / "runs"), "--name", name, "--epochs", str(epochs), "--eval-every", str(epochs),
        *TRAIN.split(), *extra,
    )  # fmt: skip
    return str(out / "runs" / name / "best.pt")


def evaluate(out: Path, model: str, name: str) -> dict:
    data, metrics = out / "data", out / f"{name}.eval.json"
    run(
        "jobs/evaluate.py", "--model", model, "--annotations", str(data / "val" / "annotations.json"),
        "--images", str(data / "val" / "images"), "--cpus-per-actor", "2", "--output", str(metrics),
    )  # fmt: skip
    return json.loads(metrics.read_text())


def confident_rows(labels: Path, min_score: float) -> int:
    """Archive rows the student trains on: those with an instance at or above ``min_score``."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(labels), format="parquet").to_table(columns=["instances", "error"])
    return sum(
        1
        for row in table.to_pylist()
        if not row["error"] and any(i["score"] >= min_score for i in row["instances"] or [])
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "bench_out" / "self_training"))
    p.add_argument("--labelled", type=int, default=100, help="labelled training images")
    p.add_argument("--archive", type=int, default=600, help="unlabelled archive images")
    p.add_argument("--steps", type=int, default=240, help="optimizer steps for each model")
    p.add_argument("--min-score", type=float, default=0.5, help="the student's --min-score")
    args = p.parse_args()
    out, start = Path(args.out), time.perf_counter()
    if not (out / "data" / "val" / "annotations.json").exists():
        run(
            "-m", "maskrcnn.synthetic", "--out", str(out / "data"), "--train", str(args.labelled), "--val", "48",
            "--archive", str(args.archive), "--min-side", "96", "--max-side", "160", "--seed", "0",
        )  # fmt: skip
    human = str(out / "data" / "train" / "annotations.json")
    teacher_epochs = max(1, round(args.steps / (args.labelled // GLOBAL_BATCH)))
    teacher = train(out, "teacher", human, teacher_epochs)
    labels = out / "labels"
    run(
        "jobs/segment_bucket.py", "--input", str(out / "data" / "archive"), "--output", str(labels),
        "--model", teacher, "--rows-per-file", "200",
    )  # fmt: skip
    kept = confident_rows(labels, args.min_score)
    student_epochs = max(1, round(args.steps / ((args.labelled + kept) // GLOBAL_BATCH)))
    student = train(out, "student", f"{human},{labels}", student_epochs, "--min-score", str(args.min_score))
    scores = {"teacher": evaluate(out, teacher, "teacher"), "student": evaluate(out, student, "student")}
    steps = {
        "teacher": teacher_epochs * (args.labelled // GLOBAL_BATCH),
        "student": student_epochs * ((args.labelled + kept) // GLOBAL_BATCH),
    }
    print(f"\nself-training on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs:")
    print(
        f"  {args.labelled} labelled images; {args.archive} archive images, {kept} with an instance >= {args.min_score}"
    )
    print(f"  {'':8} {'images':>7} {'steps':>6} {'mask AP':>8} {'box AP':>7} {'mask AP50':>9}")
    for name in ("teacher", "student"):
        s, n = scores[name], args.labelled + (kept if name == "student" else 0)
        ap, box, ap50 = s["segm"]["AP"], s["bbox"]["AP"], s["segm"]["AP50"]
        print(f"  {name:8} {n:>7} {steps[name]:>6} {ap:>8.3f} {box:>7.3f} {ap50:>9.3f}")
    ratio = scores["student"]["segm"]["AP"] / max(scores["teacher"]["segm"]["AP"], 1e-9)
    print(f"  student / teacher mask AP: {ratio:.2f}x; wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
