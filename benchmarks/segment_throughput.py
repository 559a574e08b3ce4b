"""Segmentation job figures: throughput ratio, post-processing cost, and memory.

    python benchmarks/segment_throughput.py [--images-dir DIR] [--arch ...] [--gpu]

1. Throughput ratio: the whole job's images/s (listing, decode tasks, actor pool, Parquet)
   over model-only images/s (the Predictor's forward on pre-decoded images, same batch
   size, in a loop). The job's rate is measured after its first part file, so Ray's
   start-up is left out; the wall-clock rate with start-up is printed too.
2. Post-processing cost: paste + RLE time as a fraction of the forward time, on ~800 px
   images with many instances, for this project's box-local paste and for torchvision's
   full-size paste followed by threshold and encode.
3. Memory: peak driver RSS and peak RSS of all Ray processes at 1k and 10k small images.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from torchvision.models.detection.roi_heads import paste_masks_in_image  # noqa: E402

from maskrcnn import checkpoint, images, masks, storage  # noqa: E402
from maskrcnn.model import SMALL, build_model  # noqa: E402
from maskrcnn.predictor import Predictor  # noqa: E402
from maskrcnn.segment import SegmentConfig, run  # noqa: E402
from maskrcnn.synthetic import make_image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def make_checkpoint(path: str, arch: str, size: int) -> str:
    torch.manual_seed(0)
    kwargs = {"num_classes": 4, "min_size": size, "max_size": int(size * 1.667)}
    ckpt = checkpoint.make(build_model(arch, **kwargs), arch=arch, arch_kwargs=kwargs, classes=["a", "b", "c"],
                           category_ids=[1, 2, 3], step=0, epoch=0)  # fmt: skip
    checkpoint.save(path, ckpt)
    return path


def throughput(model: str, uris: list[str], batch: int, tmp: str, device: str | None) -> None:
    manifest = f"{tmp}/manifest.txt"
    storage.write_text(manifest, "\n".join(uris) + "\n")
    decoded = [images.decode(storage.read_bytes(u)) for u in sorted(set(uris))]  # the job's images
    predictor = Predictor.load(model, score_threshold=0.5, device=device)
    predictor.predict(decoded[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(decoded), batch):
        predictor.predict(decoded[i : i + batch])
    model_rate = len(decoded) / (time.perf_counter() - start)

    out = f"{tmp}/out"
    first_part: list[float] = []

    def watch() -> None:
        while not first_part:
            if any(Path(out).glob("part-*.parquet")):
                first_part.append(time.perf_counter())
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()
    # On CPU the actor gets every core (Ray sets its torch threads from num_cpus), like the loop above.
    summary = run(SegmentConfig(input=manifest, output=out, model=model, batch_size=batch, rows_per_file=batch * 4,
                                log_every=1e9, num_gpus_per_actor=1.0 if device == "cuda" else 0.0,
                                cpus_per_actor=1.0 if device == "cuda" else float(os.cpu_count() or 1)))  # fmt: skip
    t1 = time.perf_counter()
    steady = (summary["rows_out"] - batch * 4) / (t1 - first_part[0])
    print(f"model-only (Predictor on decoded images, batch {batch}): {model_rate:.2f} img/s")
    print(f"whole job, after its first part file: {steady:.2f} img/s; ratio {steady / model_rate:.2f}")
    print(f"whole job, wall clock with Ray start-up: {summary['rows_out'] / (t1 - t0):.2f} img/s ({summary['rows_out']} images)")


def postprocess_cost(model: str, device: str | None) -> None:
    predictor = Predictor.load(model, score_threshold=0.0, max_detections=100, device=device)
    m, rng = predictor.model, np.random.default_rng(0)
    img, _ = make_image(rng, (800, 1000), 6)
    tensor = torch.from_numpy(img).to(predictor.device).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        t = time.perf_counter()
        batch, _ = m.transform([tensor])
        feats = m.backbone(batch.tensors)
        props, _ = m.rpn(batch, feats)
        det = m.roi_heads(feats, props, batch.image_sizes)[0][0]
        forward = time.perf_counter() - t
    from torchvision.models.detection.transform import resize_boxes

    h, w = img.shape[:2]
    boxes = resize_boxes(det["boxes"], batch.image_sizes[0], (h, w))
    t = time.perf_counter()
    ours = masks.paste_and_encode(det["masks"], boxes, h, w)
    box_local = time.perf_counter() - t
    t = time.perf_counter()
    full = paste_masks_in_image(det["masks"], boxes, (h, w), padding=1)[:, 0] > 0.5
    masks.encode(full.cpu().numpy())
    full_size = time.perf_counter() - t
    print(f"post-processing on a {w}x{h} image with {len(ours)} instances: forward {forward * 1000:.0f} ms; "
          f"box-local paste+RLE {box_local * 1000:.0f} ms ({box_local / forward:.2f} of forward); "
          f"torchvision full-size paste+threshold+RLE {full_size * 1000:.0f} ms ({full_size / forward:.2f})")  # fmt: skip


def memory(model: str, count: int, tmp: str) -> None:
    tiny = f"{tmp}/tiny.png"
    from PIL import Image

    Image.fromarray(np.full((32, 48, 3), 128, np.uint8)).save(tiny)
    manifest = f"{tmp}/m{count}.txt"
    storage.write_text(manifest, "\n".join([tiny] * count) + "\n")  # one small image, listed count times
    peak, driver_peak = [0], [0]
    done = threading.Event()
    me = psutil.Process()

    def sample() -> None:
        while not done.is_set():
            total = 0
            for p in psutil.process_iter(["name", "cmdline"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "ray" in cmd or "raylet" in (p.info["name"] or ""):
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            peak[0] = max(peak[0], total)
            driver_peak[0] = max(driver_peak[0], me.memory_info().rss)
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    summary = run(SegmentConfig(input=manifest, output=f"{tmp}/mem{count}", model=model, batch_size=32,
                                rows_per_file=500, score_threshold=1.0, log_every=1e9, concurrency=(2, 2)))  # fmt: skip
    done.set()
    print(f"{count} images ({summary['images_per_s']:.1f} img/s): driver peak RSS {driver_peak[0] / 2**20:.0f} MiB, "
          f"peak RSS of all Ray processes {peak[0] / 2**20:.0f} MiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images-dir", default=str(REPO.parent / "shared" / "data" / "coco_small" / "images"))
    p.add_argument("--arch", default=SMALL)
    p.add_argument("--size", type=int, default=320, help="model's shortest side for the throughput part")
    p.add_argument("--repeat", type=int, default=3, help="times the image list is repeated for the job")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: throughput,postprocess,memory")
    args = p.parse_args()
    device = "cuda" if args.gpu else "cpu"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores" + (f", {torch.cuda.get_device_name()}" if args.gpu else ""))
    with tempfile.TemporaryDirectory() as tmp:
        if "throughput" not in args.skip:
            model = make_checkpoint(f"{tmp}/model.pt", args.arch, args.size)
            uris = sorted(storage.iter_files(args.images_dir, (".jpg", ".png"))) * args.repeat
            throughput(model, uris, args.batch_size, tmp, device)
        if "postprocess" not in args.skip:
            postprocess_cost(make_checkpoint(f"{tmp}/model800.pt", args.arch, 800), device)
        if "memory" not in args.skip:
            model = make_checkpoint(f"{tmp}/model64.pt", SMALL, 64)
            for count in (1000, 10000):
                memory(model, count, tmp)


if __name__ == "__main__":
    main()
