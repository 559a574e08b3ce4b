"""The segmentation job's own CPU cost per 12 MP photo, by stage (issue #34).

    python benchmarks/pipeline_cost.py [--images 96] [--instances 10,30] [--s3]

Runs the real ``jobs/segment_bucket.py`` (its parser and ``segment.run``, in this process) on 4032x3024 JPEGs
(real photos scaled up), with one change: the model's forward pass is a stub that sleeps
``--forward-ms`` per image (a GPU's time; the GIL is released, as in a CUDA sync) and
returns ``--instances`` detections an image. The actors ask for a logical GPU, so the
stages are placed as on a GPU node: decoding in CPU tasks, the images through the object
store, each actor taking 1 + --cpus-per-actor calls at once. The stub runs them on the CPU.

Each stage's CPU time is measured in the process that runs it, with the thread's CPU clock
around the library function that does it:

  decode task   read (storage.read_bytes), decode (images.decode_to_fit: reduced JPEG
                decoding), resize (predictor.model_input)
  actor         canvas (Predictor._canvas), paste (the part of masks.paste_and_encode that runs
                on the masks' device): both the GPU's work on a GPU node; encode (run lengths
                on the host and pycocotools' RLE: the host's work on any node)
  driver        write (output.write_part: Parquet), progress

and in each: "other", the rest of the CPU time of the threads that ran those stages (a
task's or a call's thread: the batch into and out of the object store, Ray Data's blocks,
instance dicts, rows, Arrow; the driver's rows), and "Ray's threads", the rest of the
process's (Ray's own threads: the driver's streaming executor, gRPC). Each counts from a
thread's or process's first timed call to the end of its last, so Ray's start-up is left
out. Per image: CPU seconds over the images labelled. Prints a table for each
``--instances`` value, and the cores a GPU needs at 100 images/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch
from segment_throughput import large_jpegs, make_checkpoint  # benchmarks/: this script's folder

from maskrcnn import local_s3, runtime, segment, storage
from maskrcnn.cli import load_parser, parse_config
from maskrcnn.model import SMALL
from maskrcnn.segment import SegmentConfig

STAGES = {  # stage -> (module, attribute) of the function timed
    "read": ("maskrcnn.storage", "read_bytes"),
    "decode": ("maskrcnn.images", "decode_to_fit"),
    "resize": ("maskrcnn.inference", "model_input"),
    "canvas": ("maskrcnn.predictor", "Predictor._canvas"),
    "paste": ("maskrcnn.masks", "paste_and_encode"),
    "run lengths": ("maskrcnn.masks", "_run_lengths"),
    "rle": ("pycocotools.mask", "frPyObjects"),
    "write": ("maskrcnn.output", "write_part"),
    "progress": ("maskrcnn.progress", "Progress.add"),
}


def instrument(ledgers: str, forward_s: float, instances: int, stages: tuple[str, ...] = tuple(STAGES)):
    """In one process: time each of ``stages`` into a ledger file of its own (its pid), stub
    the forward pass, and give GPU actors the CPU. Returns a function that undoes it all."""
    import importlib

    from maskrcnn import devices, predictor

    # CPU seconds: each stage's; the process's and each working thread's, from its first
    # timed call to the end of its last (the threads' are [first, last] by thread id)
    ledger = {"stages": defaultdict(float), "first": None, "last": 0.0, "threads": {}}
    lock = threading.Lock()
    path = Path(ledgers) / f"{os.getpid()}.json"

    def timed(stage, fn):
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            with lock:
                if ledger["first"] is None:
                    ledger["first"] = time.process_time()
                ledger["threads"].setdefault(threading.get_ident(), [start, start])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.thread_time()
                with lock:
                    ledger["stages"][stage] += end - start
                    ledger["threads"][threading.get_ident()][1] = end
                    ledger["last"] = time.process_time()
                    path.write_text(json.dumps(ledger))

        return wrapper

    saved = [(predictor.Predictor, "_forward", predictor.Predictor._forward), (devices, "for_actor", devices.for_actor)]
    for stage in stages:
        module, name = STAGES[stage]
        owner = importlib.import_module(module)
        *outer, attr = name.split(".")
        for part in outer:
            owner = getattr(owner, part)
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, timed(stage, getattr(owner, attr)))

    predictor.Predictor._forward = stub_forward(forward_s, instances)
    devices.for_actor = lambda gpus: devices.CPU

    def undo() -> None:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)

    return undo


def stub_forward(forward_s: float, instances: int):
    """A stand-in for ``Predictor._forward``: sleeps ``forward_s`` an image and returns
    ``instances`` detections an image (boxes of 5-30% of a side, round 28x28 masks)."""
    import numpy as np

    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 0.7, (instances, 2))
    unit_boxes = torch.tensor(np.concatenate([corner, corner + rng.uniform(0.05, 0.3, (instances, 2))], 1))
    labels = torch.tensor(rng.integers(1, 4, instances))
    yy, xx = np.mgrid[:28, :28]
    blob = torch.tensor((((yy - 13.5) / 12) ** 2 + ((xx - 13.5) / 12) ** 2 < 1).astype(np.float32))

    def forward(self, canvases):
        time.sleep(forward_s * len(canvases))
        return [
            {
                "boxes": (unit_boxes * torch.tensor([w, h, w, h])).float(),
                "labels": labels,
                "scores": torch.linspace(0.99, 0.5, instances),
                "masks": blob.expand(instances, 1, 28, 28),
            }
            for _, (h, w) in canvases
        ]

    return forward


def worker_hook(ledgers: str, forward_s: float, instances: int):
    """Ray's ``worker_process_setup_hook`` for every worker: the job's own quiet logs, and
    :func:`instrument`."""

    def hook() -> None:
        runtime.quiet_logs()
        instrument(ledgers, forward_s, instances)

    return hook


def photos(folder: Path, count: int, s3: bool) -> str:
    """``count`` 4032x3024 JPEGs (:func:`segment_throughput.large_jpegs`) in ``folder``, or
    uploaded to loopback S3."""
    data = large_jpegs()
    root = "s3://pipeline-cost/photos" if s3 else str(folder)
    if s3:
        import boto3

        boto3.client("s3").create_bucket(Bucket="pipeline-cost")
    for i in range(count):
        storage.write_bytes(f"{root}/{i:05d}.jpg", data[i % len(data)])
    return root


def run(args: argparse.Namespace, images: str, weights: str, out: str, instances: int, tmp: Path) -> dict:
    """One job run on a fresh Ray; returns CPU seconds by (role, stage), and the image count."""
    import ray

    ledgers = tmp / f"ledgers-{instances}"
    ledgers.mkdir()
    forward_s = args.forward_ms / 1000
    ray.init(
        num_cpus=os.cpu_count(),
        num_gpus=1,
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": worker_hook(str(ledgers), forward_s, instances)},
    )
    undo = instrument(str(ledgers), forward_s, instances, stages=("write", "progress"))  # the driver's
    flags = f"--batch-size {args.batch_size} --gpus-per-actor 1 --cpus-per-actor {args.cpus_per_actor}"
    argv = ["--input", images, "--output", out, "--model", weights, "--score-threshold", "0.1", *flags.split()]
    cfg = parse_config(load_parser(str(REPO / "jobs" / "segment_bucket.py")), SegmentConfig, argv)
    with contextlib.redirect_stdout(sys.stderr):
        segment.run(cfg)  # what the job's main runs
    undo()
    ray.shutdown()
    return _costs(ledgers)


ROLES = (("decode task", "decode"), ("actor", "canvas"), ("driver", "progress"))  # a role, a stage it times


def _costs(ledgers: Path) -> dict[tuple[str, str], float]:
    """CPU seconds by (role, stage). A process's role is what it timed: decoding, the canvas
    (an actor), or writing (the driver); "other" is the rest of its CPU while it worked."""
    costs: dict[tuple[str, str], float] = defaultdict(float)
    for file in ledgers.glob("*.json"):
        ledger = json.loads(file.read_text())
        stages = ledger["stages"]
        roles = [role for role, stage in ROLES if stage in stages]
        if not roles:
            continue  # e.g. the listing task, which reads no image
        nested = stages.pop("run lengths", 0.0) + stages.pop("rle", 0.0)  # inside paste_and_encode
        if nested:
            stages["paste"] -= nested
            stages["encode"] = nested
        working = sum(last - first for first, last in ledger["threads"].values())
        for stage, seconds in stages.items():
            costs[(roles[0], stage)] += seconds
        costs[(roles[0], "other")] += working - sum(stages.values())
        costs[(roles[0], "Ray's threads")] += ledger["last"] - ledger["first"] - working
    return costs


ROWS = [
    ("decode task", "read"), ("decode task", "decode"), ("decode task", "resize"), ("decode task", "other"),
    ("decode task", "Ray's threads"),
    ("actor", "canvas"), ("actor", "paste"), ("actor", "encode"), ("actor", "other"), ("actor", "Ray's threads"),
    ("driver", "write"), ("driver", "progress"), ("driver", "other"), ("driver", "Ray's threads"),
]  # fmt: skip
ON_GPU = {("actor", "canvas"), ("actor", "paste")}  # the device's work on a GPU node


def report(costs: dict[int, dict[tuple[str, str], float]], images: int) -> None:
    ms = {n: {k: 1000 * v / images for k, v in c.items()} for n, c in costs.items()}
    print("\nCPU ms per 12 MP photo, by stage (masks an image: " + ", ".join(map(str, ms)) + ")")
    print(f"{'stage':<28}" + "".join(f"{n:>10}" for n in ms))
    for role, stage in ROWS:
        note = " *" if (role, stage) in ON_GPU else ""
        print(f"{role + ' ' + stage + note:<28}" + "".join(f"{m.get((role, stage), 0.0):10.1f}" for m in ms.values()))
    print("* the GPU's work on a GPU node (here the stub runs it on the CPU)")
    for n, m in ms.items():
        decode = sum(v for (role, _), v in m.items() if role == "decode task")
        host = sum(v for (role, stage), v in m.items() if role == "actor" and (role, stage) not in ON_GPU)
        driver = sum(v for (role, _), v in m.items() if role == "driver")
        print(
            f"{n} masks an image, at 100 images/s a GPU: decoding {decode / 10:.1f} cores, the actor's host work "
            f"{host / 10:.1f} cores, the driver {driver / 10:.1f} cores"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="12 MP photos a run (default: %(default)s)")
    p.add_argument("--instances", default="10,30", help="masks an image, a run each (default: %(default)s)")
    p.add_argument("--forward-ms", type=float, default=10.0, help="the stub's time an image (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="the job's --batch-size (default: %(default)s)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="the job's flag (default: %(default)s)")
    p.add_argument("--s3", action="store_true", help="read the photos from S3 on loopback (moto)")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp, local_s3.serve() if args.s3 else contextlib.nullcontext():
        root = Path(tmp)
        images = photos(root / "photos", args.images, args.s3)
        weights = make_checkpoint(str(root / "model.pt"), SMALL, 800)
        costs = {}
        for n in map(int, args.instances.split(",")):
            costs[n] = run(args, images, weights, str(root / f"out-{n}"), n, root)
    report(costs, args.images)


if __name__ == "__main__":
    main()
