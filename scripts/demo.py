"""The demo behind ``make demo``: generate data, train, evaluate, segment, show.

Every step runs one of the project's real commands as a subprocess and prints it first,
so what you see is what you would type. Nothing needs a GPU, a cloud account or the
internet; Ray starts locally inside each job.

    make demo              # everything under demo_out/
    DEMO_S3=1 make demo    # data, checkpoints and Parquet on a local S3 endpoint (moto)
    make demo-keypoints    # the keypoint path: stick figures, Keypoint R-CNN, skeletons drawn

Re-running reuses what is finished: the generated data, the training run (Ray Train
resumes it, or says it is complete) and a segmentation output that has _SUCCESS.
``make demo-clean`` deletes demo_out/ (and demo_out_keypoints/) to start over.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from maskrcnn import local_s3, storage


@dataclass(frozen=True)
class Recipe:
    """What the demo generates, trains and checks."""

    name: str  # the training run's name
    data: str  # python -m maskrcnn.synthetic's flags
    train: str  # jobs/train.py's flags, besides the data and where it writes
    metric: str  # the AP the summary checks: segm, or keypoints
    promised_ap: float  # on the val split
    minutes: int  # the most `make demo` takes from a fresh clone on 2 cores, install included (as README says)
    archive: str  # what jobs/segment_bucket.py labels, under the data directory


# Small images, the small model from random weights, AdamW (several times faster than SGD
# from scratch), 2 CPU workers (DEMO_EPOCHS=N shortens it for a quick look). Training is
# seeded (model, data order, augmentation), so every run on one machine reaches the same AP.
# Up to 8 shapes an image, each at least half in view: more instances a step teach more per
# step. Landscape images pad to one canvas in a batch. Batch 4 per worker, not 2: batch norm
# trained from scratch needs the larger batches. Validation runs once, at the end. The
# promise sits 0.05 below the worst of benchmarks/demo_spread.py's runs (docs/benchmarks.md).
EPOCHS = os.environ.get("DEMO_EPOCHS")
COMMON = "--optimizer adamw --lr 0.002 --schedule cosine --warmup-steps 30 --log-every 25 --num-workers 2"
SHAPES = Recipe(
    name="shapes",
    data="--train 400 --val 48 --archive 40 --min-side 96 --max-side 160 --max-instances 8 "
    "--shape-sizes 0.15,0.5 --min-visible 0.5 --landscape --seed 0",
    train=f"--epochs {EPOCHS or 4} --batch-size 4 --scales 128 --max-size 192 --eval-every {EPOCHS or 4} {COMMON}",
    metric="segm",
    promised_ap=0.15,
    minutes=15,
    archive="archive",
)
# The keypoint path (issue #12's learning check): stick figures with 11 named joints, the
# small Keypoint R-CNN from random weights; its archive is the val images.
FIGURES = Recipe(
    name="figures",
    data="--kind figures --train 400 --val 48 --min-side 128 --max-side 192 --seed 0",
    train=f"--arch keypointrcnn_resnet18_fpn_small --epochs {EPOCHS or 5} --batch-size 4 --scales 192 "
    f"--max-size 288 --eval-every 5 {COMMON}",
    metric="keypoints",
    promised_ap=0.3,
    minutes=12,
    archive="val/images",
)
RECIPE = FIGURES if os.environ.get("DEMO_KEYPOINTS") == "1" else SHAPES
PICTURES = 12
BUCKET = "maskrcnn-demo"


def say(text: str) -> None:
    print(f"\n[demo] {text}", flush=True)


def run(*args: str) -> None:
    """Run one project command, streaming its output; stop the demo if it fails."""
    command = [sys.executable, *args]
    print("$ " + shlex.join(["python", *args]), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"[demo] failed: {shlex.join(['python', *args])}")


@contextlib.contextmanager
def demo_bucket() -> Iterator[None]:
    """A local S3 endpoint (:mod:`maskrcnn.local_s3`) holding the demo's bucket."""
    import boto3

    with local_s3.serve() as endpoint:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        say(f"local S3 endpoint at {endpoint}, bucket s3://{BUCKET} (in memory: gone when the demo ends)")
        yield


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 1)


def demo(root: str, local: Path) -> dict:
    """The five steps, each one of the project's commands, timed."""
    data, runs, labels = (storage.join(root, p) for p in ("data", "runs", "labels"))
    model, metrics = f"{runs}/{RECIPE.name}/best.pt", f"{root}/evaluation.json"
    timings: dict[str, float] = {}
    step = functools.partial(timed, timings)
    with step("generate"):
        generate(data)
    with step("train"):
        train(data, runs)
    with step("evaluate"):
        evaluate(data, model, metrics)
    with step("segment"):
        segment(data, labels, model)
    summary = json.loads(storage.read_text(storage.join(labels, "_summary.json")))
    drawable = summary["instances"] > 0
    with step("export"):
        show(root, data, labels, model, local, drawable)
    return {
        "root": root,
        "local": local,
        "metrics": metrics,
        "labels": labels,
        "model": model,
        "timings": timings,
        "drawn": drawable,
        "summary": summary,
    }


def generate(data: str) -> None:
    if storage.exists(storage.join(data, "_COMPLETE")):
        say(f"1/5 generate: reusing the dataset in {data}")
        return
    what = "stick figures with keypoints" if RECIPE is FIGURES else "shapes"
    say(f"1/5 generate: synthetic {what} in COCO format (train, val, and an archive with damaged files)")
    run("-m", "maskrcnn.synthetic", "--out", data, *RECIPE.data.split())
    storage.write_text(storage.join(data, "_COMPLETE"), "")


def train(data: str, runs: str) -> None:
    say("2/5 train: the small Mask R-CNN on 2 Ray Train CPU workers (re-running resumes or says complete)")
    run("jobs/train.py", *train_flags(data, runs), "--name", RECIPE.name)


def train_flags(data: str, runs: str) -> list[str]:
    """jobs/train.py's flags for the recipe, all but --name (benchmarks/demo_spread.py runs these too)."""
    train_set = ["--train-annotations", f"{data}/train/annotations.json", "--train-images", f"{data}/train/images"]
    val_set = ["--val-annotations", f"{data}/val/annotations.json", "--val-images", f"{data}/val/images"]
    return [*train_set, *val_set, "--storage", runs, *RECIPE.train.split()]


def evaluate(data: str, model: str, metrics: str) -> None:
    say("3/5 evaluate: COCO AP of the best checkpoint on the val split")
    val_set = ["--annotations", f"{data}/val/annotations.json", "--images", f"{data}/val/images"]
    run("jobs/evaluate.py", "--model", model, *val_set, "--cpus-per-actor", "2", "--output", metrics)


def segment(data: str, labels: str, model: str) -> None:
    if storage.exists(storage.join(labels, "_SUCCESS")):
        say(f"4/5 segment: reusing the finished output in {labels}")
        return
    say(f"4/5 segment: {RECIPE.archive} -> Parquet, one row per file")
    io = ["--input", f"{data}/{RECIPE.archive}", "--extensions", "*", "--output", labels, "--model", model]
    run("jobs/segment_bucket.py", *io, "--rows-per-file", "16", "--actors", "1", "--progress-seconds", "10")


def show(root: str, data: str, labels: str, model: str, local: Path, drawable: bool) -> None:
    say("5/5 show: COCO JSON, overlay pictures, a contact sheet and an HTML report; then quick predictions, no Ray")
    pictures = ["--render", str(PICTURES), "--render-dir", str(local / "pictures")]
    pictures += ["--contact-sheet", str(local / "contact_sheet.png"), "--html", str(local / "report")]
    if not drawable:
        say("no instances above the score threshold, so nothing to draw: train longer (DEMO_EPOCHS)")
    run(
        "jobs/export.py",
        "--predictions",
        labels,
        "--coco-dataset",
        f"{root}/labels.coco.json",
        *(pictures if drawable else []),
    )
    val_images = storage.join(data, "val", "images", "00000*.jpg")
    run("jobs/predict.py", "--input", val_images, "--model", model, "--output", str(local / "predictions"))


def report(result: dict, wall: float) -> None:
    metrics = json.loads(storage.read_text(result["metrics"]))
    summary = result["summary"]
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "none"
    local = result["local"]
    label = {"segm": "mask", "keypoints": "keypoint"}[RECIPE.metric]
    lines = [
        f"{label} AP (val): {metrics[RECIPE.metric]['AP']:.3f}   box AP: {metrics['bbox']['AP']:.3f}   "
        f"{label} AP50: {metrics[RECIPE.metric]['AP50']:.3f}",
        f"segmentation: {summary['images_in']} files -> {summary['rows_out']} rows, {summary['instances']} instances, "
        f"errors: {errors}; {summary['images_per_s']} images/s",
        f"checkpoint:   {result['model']}",
        f"parquet:      {result['labels']}/part-*.parquet",
        f"coco json:    {result['root']}/labels.coco.json",
        f"pictures:     {local / 'pictures'}/ ({PICTURES} overlays)"
        if result["drawn"]
        else "pictures:     none (no instances)",
        f"contact sheet: {local / 'contact_sheet.png'}" if result["drawn"] else "",
        f"report:       {local / 'report' / 'index.html'}" if result["drawn"] else "",
        f"predictions:  {local / 'predictions'}/ (jobs/predict.py on 9 val images)",
        "step times (s): " + ", ".join(f"{k} {v}" for k, v in result["timings"].items()),
        wall_time(wall),
    ]
    say("summary\n  " + "\n  ".join(line for line in lines if line))
    achieved = metrics[RECIPE.metric]["AP"]
    if achieved < RECIPE.promised_ap and EPOCHS is None:
        raise SystemExit(f"[demo] {label} AP {achieved:.3f} is below the promised {RECIPE.promised_ap}")


def wall_time(seconds: float) -> str:
    """The demo's time against the README's figure, which counts `make demo`'s install too."""
    limit = f"at most {RECIPE.minutes} min from a fresh clone on 2 cores, install included"
    if "DEMO_STARTED" not in os.environ:
        return f"demo wall time: {seconds / 60:.1f} min, install not counted (make demo: {limit})"
    return f"make demo wall time: {seconds / 60:.1f} min, install included ({limit})"


def main() -> None:
    start = float(os.environ.get("DEMO_STARTED", time.time()))
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # the jobs print their own progress
    s3 = os.environ.get("DEMO_S3") == "1"
    default = "demo_out" + ("_keypoints" if RECIPE is FIGURES else "") + ("_s3" if s3 else "")
    local = Path(os.environ.get("DEMO_DIR", default)).resolve()
    local.mkdir(parents=True, exist_ok=True)
    if s3:
        say(f"DEMO_S3=1: a clean start on a fresh local S3 endpoint; pictures go to {local}")
        try:
            with demo_bucket():
                result = demo(f"s3://{BUCKET}", local)
                report(result, time.time() - start)
        except RuntimeError as err:  # the endpoint did not start
            raise SystemExit(f"[demo] {err}") from None
        return
    say(f"working in {local} ({'reusing finished steps' if any(local.iterdir()) else 'a clean start'})")
    result = demo(str(local), local)
    report(result, time.time() - start)


if __name__ == "__main__":
    main()
