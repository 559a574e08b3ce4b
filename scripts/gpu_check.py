"""``make gpu-check``: prove the GPU paths on whatever GPU this machine has, in a few minutes.

Needs torch, torchvision and this library's own dependencies (numpy, Pillow, pyarrow,
pycocotools); not Ray, not the network: random weights, synthetic pictures. It prints one
table and exits 1 if a check fails:

1. train: ``maskrcnn_resnet50_fpn`` at 800 px through ``engine.train_step`` with AMP, DDP
   and synchronised batch norm in a one-rank NCCL process group (the training workers'
   collectives): finite losses, images/s.
2. fp16: the predictor with AMP against fp32 on the same images (mean mask IoU, box shift).
3. batched: same-canvas images in one forward pass against each image alone.
4. out of memory: a batch of 8 under a memory cap that fits 2 recovers by splitting.
5. images/s at batch 1, 4 and 8; the cost of a 12 MP photo over a 1.2 MP one.

Without a GPU it says so in one line and runs the same code on the CPU at small sizes (gloo,
fp32, a simulated out-of-memory error), so that CI keeps it from rotting.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn import devices, engine, masks
from maskrcnn.model import SMALL, build_model
from maskrcnn.predictor import Predictor
from maskrcnn.synthetic import CLASSES, make_image

DEVICE = devices.default()
GPU = DEVICE.type == "cuda"
ARCH, SIZE, MAX_SIZE = ("maskrcnn_resnet50_fpn", 800, 1333) if GPU else (SMALL, 160, 256)
PHOTO = (960, 1280) if GPU else (240, 320)  # 1.2 MP on a GPU; the 12 MP one is 3.15x each side
STEPS = 20 if GPU else 2
ROUNDS = 3 if GPU else 1  # timed rounds of each throughput figure
ROWS: list[tuple[str, str, bool]] = []


def check(name: str, figure: str, ok: bool) -> None:
    ROWS.append((name, figure, ok))
    print(f"  {'ok  ' if ok else 'FAIL'}  {name:<14} {figure}", flush=True)


def pictures(n: int, size: tuple[int, int], seed: int = 0) -> list[tuple[np.ndarray, list]]:
    rng = np.random.default_rng(seed)
    return [make_image(rng, (min(size), min(size)), 6, min_visible=0.5) for _ in range(n)]


def as_row(image: np.ndarray, instances: list[tuple[int, np.ndarray]]) -> dict[str, Any]:
    """A training row as the data pipeline gives it: CHW uint8, XYXY boxes, labels, packed masks."""
    boxes = []
    for _, mask in instances:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {
        "image": np.ascontiguousarray(image.transpose(2, 0, 1)),
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "labels": np.array([c + 1 for c, _ in instances], np.int64),
        "masks": masks.pack(np.stack([m for _, m in instances])),
    }


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ARCH, len(CLASSES) + 1, min_size=SIZE, max_size=MAX_SIZE).to(DEVICE)


# ---------------------------------------------------------------- 1. training


def train() -> None:
    """DDP training steps in a one-rank process group, as one Ray Train worker runs them."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(devices.backend(GPU), init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            net = model()
            synced = devices.sync_batch_norm("auto", net, DEVICE)
            if synced:
                net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
            ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[0] if GPU else None)
            params = [p for p in ddp.parameters() if p.requires_grad]
            optimizer = engine.make_optimizer("sgd", params, 0.002, 0.9, 1e-4)
            scaler = torch.amp.GradScaler(DEVICE.type, enabled=GPU)
            rows = [as_row(*p) for p in pictures(2, (SIZE, SIZE))]
            start, losses = 0.0, []
            for step in range(STEPS):
                if step == min(2, STEPS - 1):
                    start = _now()
                result = engine.train_step(
                    ddp, optimizer, scaler, rows, DEVICE, lr=0.002, clip_norm=10.0, amp=GPU, step=step
                )
                losses.append(result.losses["loss"])
            rate = 2 * (STEPS - min(2, STEPS - 1)) / (_now() - start)
        finally:
            dist.destroy_process_group()
    ok = all(np.isfinite(losses))
    bn = ", sync BN" if synced else ""
    check(
        "train",
        f"{STEPS} steps, {devices.backend(GPU)}{bn}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {rate:.1f} img/s",
        ok,
    )


def _now() -> float:
    if GPU:
        torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- 2-4. the predictor


def predictor(net: torch.nn.Module, **kwargs: Any) -> Predictor:
    return Predictor(net, list(CLASSES), [1, 2, 3], score_threshold=0.05, max_detections=50, **kwargs)


def agreement(a: list[list[dict]], b: list[list[dict]]) -> tuple[float, float]:
    """Mean mask IoU of each of ``a``'s instances with its best match in ``b``, and the largest
    box shift (pixels) between such matches."""
    ious, shifts = [], [0.0]
    for xs, ys in zip(a, b):
        for x in xs:
            same = [y for y in ys if y["category_id"] == x["category_id"]]
            if not same:
                ious.append(0.0)
                continue
            overlap = mask_utils.iou([y["mask"] for y in same], [x["mask"]], [0])[:, 0]
            best = int(np.argmax(overlap))
            ious.append(float(overlap[best]))
            shifts.append(float(np.abs(np.subtract(x["bbox"], same[best]["bbox"])).max()))
    return (float(np.mean(ious)) if ious else 1.0), max(shifts)


def precision(net: torch.nn.Module, images: list[np.ndarray]) -> None:
    fp32 = predictor(net, amp=False).predict(images)
    fp16 = predictor(net, amp=True).predict(images)
    iou, shift = agreement(fp32, fp16)
    what = "fp16 vs fp32" if GPU else "fp32 (no fp16 on CPU)"
    check("fp16", f"{what}: mask IoU {iou:.3f}, box shift {shift:.1f} px", iou >= 0.9)


def batched(net: torch.nn.Module, images: list[np.ndarray]) -> None:
    alone = predictor(net, batch_images=False).predict(images)
    together = predictor(net, batch_images=True).predict(images)
    iou, shift = agreement(alone, together)
    exact = alone == together
    check(
        "batched",
        f"{len(images)} same-canvas images: mask IoU {iou:.3f}, box shift {shift:.1f} px"
        + (", identical" if exact else ""),
        iou >= 0.95,
    )


def out_of_memory(net: torch.nn.Module, images: list[np.ndarray]) -> None:
    """On a GPU, cap this process's memory so that 2 images fit and 8 do not; on the CPU, the
    same error raised above 2 images a call."""
    p = predictor(net, batch_images=True)
    alone = [p.predict([im])[0] for im in images]
    undo = _cap_memory(p, images[:2]) if GPU else _simulate_oom(p)
    try:
        results, splits = p.predict_each(images, [im.shape[:2] for im in images])
    finally:
        undo()
    healed = all(not isinstance(r, str) for r in results)
    iou, _ = agreement(alone, [r if not isinstance(r, str) else [] for r in results]) if healed else (0.0, 0)
    how = "under a memory cap" if GPU else "simulated"
    check("out of memory", f"batch of {len(images)} {how}: {splits} splits, mask IoU {iou:.3f}", healed and splits > 0)


def _cap_memory(p: Predictor, fits: list[np.ndarray]) -> Callable[[], None]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    p.predict(fits)
    need = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (base + 1.5 * need) / total))
    return lambda: torch.cuda.set_per_process_memory_fraction(1.0)


def _simulate_oom(p: Predictor) -> Callable[[], None]:
    real = p.predict

    def tight(images: list[np.ndarray], sizes: Any = None) -> list:
        if len(images) > 2:
            raise torch.OutOfMemoryError("out of memory (simulated on the CPU)")
        return real(images, sizes)

    p.predict = tight  # type: ignore[method-assign]
    return lambda: delattr(p, "predict")


# ---------------------------------------------------------------- 5. throughput


def throughput(net: torch.nn.Module, scene: np.ndarray) -> None:
    p = predictor(net, batch_images=True)
    rates = []
    for batch in (1, 4, 8):
        images = [scene] * batch
        p.predict(images)  # warm-up: cuDNN picks its kernels per shape
        start = _now()
        for _ in range(ROUNDS):
            p.predict(images)
        rates.append(batch * ROUNDS / (_now() - start))
    check("images/s", "batch 1/4/8: " + " / ".join(f"{r:.1f}" for r in rates), all(r > 0 for r in rates))
    big = np.asarray(Image.fromarray(scene).resize((int(scene.shape[1] * 3.15), int(scene.shape[0] * 3.15))))
    per_image = {}
    for name, im in (("small", scene), ("big", big)):
        p.predict([im])
        start = _now()
        for _ in range(ROUNDS):
            p.predict([im])
        per_image[name] = (_now() - start) / ROUNDS
    mp = big.shape[0] * big.shape[1] / 1e6
    check("12 MP cost", f"{mp:.1f} MP / {scene.size / 3e6:.1f} MP: {per_image['big'] / per_image['small']:.2f}x", True)


def main() -> int:
    if GPU:
        print(f"[gpu-check] {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print("[gpu-check] no GPU on this machine: checking the same code on the CPU at small sizes")
    print(f"[gpu-check] {ARCH} at {SIZE} px, random weights, synthetic pictures")
    started = time.perf_counter()
    train()
    net = model().eval()
    images = [im for im, _ in pictures(8, PHOTO, seed=1)]
    precision(net, images[:4])
    batched(net, images)
    out_of_memory(net, images)
    throughput(net, images[0])
    check("no Ray", "the checks ran without importing Ray", "ray" not in sys.modules)
    failed = [name for name, _, ok in ROWS if not ok]
    print(
        f"[gpu-check] {len(ROWS) - len(failed)} of {len(ROWS)} checks passed in {time.perf_counter() - started:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
