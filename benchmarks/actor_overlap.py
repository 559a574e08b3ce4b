"""Post-processing beside the forward pass: a GPU actor's two calls at once (issue #34).

    python benchmarks/actor_overlap.py [--forward-ms 60] [--instances 30]

On a GPU, the forward pass is the device's time and the host waits for it with the GIL
released; pasting and encoding the masks, building the rows, is the host's. Here the model
is stubbed by a fixed delay (a sleep, which releases the GIL as a CUDA sync does) that
returns the same detections for every image: ``--instances`` masks on a 12 MP photo; the
canvas, built on the GPU there, is taken as built. The rest is the real
:class:`maskrcnn.predictor.Predictor` path: 28x28 masks pasted and encoded to full-image
RLE, instance dicts, one output row each.

Calls of one window (4 forward passes of 4 images) run one at a time, as a CPU actor does,
and two at once in threads, as a GPU actor does (``InferenceOptions.calls_per_actor``).
Prints rows/s and the device's idle share (the time it was not in a forward pass).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from maskrcnn import output
from maskrcnn.model import build_model
from maskrcnn.predictor import Predictor

FULL = (3024, 4032)  # a 12 MP photo, as the rows give it
INPUT = (800, 1066)  # what the decode task hands the actor


class StubbedPredictor(Predictor):
    """The real post-processing after a forward pass that takes ``delay`` seconds."""

    def __init__(self, delay: float, instances: int):
        model = build_model("maskrcnn_resnet18_fpn_small", num_classes=4, min_size=INPUT[0], max_size=1333)
        super().__init__(model.eval(), ["a", "b", "c"], [1, 2, 3], score_threshold=0.05, batch_images=True)
        self.delay, self.busy, self.lock = delay, 0.0, threading.Lock()
        rng = np.random.default_rng(0)
        x0, y0 = rng.uniform(0, INPUT[1] - 300, instances), rng.uniform(0, INPUT[0] - 300, instances)
        sizes = rng.uniform(40, 300, (instances, 2))
        boxes = np.stack([x0, y0, x0 + sizes[:, 0], y0 + sizes[:, 1]], 1)
        yy, xx = np.mgrid[:28, :28]
        blob = (((yy - 13.5) / 12) ** 2 + ((xx - 13.5) / 12) ** 2 < 1).astype(np.float32)
        self.canvas = (torch.zeros(1, 3, 800, 1088), INPUT)
        self.detections = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor(rng.integers(1, 4, instances)),
            "scores": torch.tensor(np.sort(rng.uniform(0.1, 1, instances))[::-1].copy(), dtype=torch.float32),
            "masks": torch.tensor(blob).expand(instances, 1, 28, 28).clone(),
        }

    def _canvas(self, image):
        """On a GPU the canvas is built there (device time, in the forward pass's delay)."""
        return self.canvas

    def _forward(self, canvases):
        start = time.perf_counter()
        time.sleep(self.delay)
        with self.lock:
            self.busy += time.perf_counter() - start
        return [dict(self.detections) for _ in canvases]


def call(predictor: StubbedPredictor, images: list[np.ndarray]) -> list[dict]:
    """What an actor call does with a window of decoded images: instances, then rows."""
    results, _ = predictor.predict_each(images, [FULL] * len(images))
    return [output.row(f"s3://b/{i}.jpg", FULL, r, "stub") for i, r in enumerate(results)]


def run(predictor: StubbedPredictor, calls: int, window: int, at_once: int) -> tuple[float, float]:
    images = [np.zeros((*INPUT, 3), np.uint8)] * window
    predictor.busy = 0.0
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        rows = sum(len(r) for r in pool.map(lambda _: call(predictor, images), range(calls)))
    wall = time.perf_counter() - start
    return rows / wall, 1 - predictor.busy / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forward-ms", type=float, default=100.0, help="a forward pass of 4 images (default: %(default)s)")
    p.add_argument("--instances", type=int, default=30, help="masks per image (default: %(default)s)")
    p.add_argument("--calls", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    predictor = StubbedPredictor(args.forward_ms / 1000, args.instances)
    predictor.group_size = 4
    call(predictor, [np.zeros((*INPUT, 3), np.uint8)] * 4)  # warm up
    print(f"forward pass {args.forward_ms:.0f} ms per 4 images, {args.instances} masks an image, 12 MP rows:")
    for at_once in (1, 2):
        rate, idle = run(predictor, args.calls, 16, at_once)
        print(f"  {at_once} call(s) at once: {rate:5.1f} rows/s, device idle {100 * idle:4.1f}%")


if __name__ == "__main__":
    main()
