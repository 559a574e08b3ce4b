"""Predictor figures without Ray: model-only against predictor images/s, and mask post-processing.

    python benchmarks/predictor_throughput.py                 # CUDA if present: R50-FPN, fp16
    python benchmarks/predictor_throughput.py --device cpu    # the small model, a few minutes

Needs torch, torchvision, numpy, Pillow, pyarrow and pycocotools; not Ray, so it also runs
on a GPU box that has no Ray. Random weights; speed does not depend on them. The pictures
are one synthetic 1280x960 scene and the same scene upscaled to 4032x3024, so both reach
the model as the same 800 px input and differ only in what grows with photo pixels.

1. Throughput at batch 1/4/8 and both sizes, the score threshold set so that about
   ``--detections`` instances survive: model-only images/s (backbone, RPN and RoI heads on
   prepared inputs), each image alone and same-canvas images batched, against predictor
   images/s (uint8 photo in, RLE instances out), their ratio and the post-processing share.
2. Mask post-processing per image at 10/50/100 instances: the previous full-image canvas
   per instance against box-local RLE (checked byte-identical on every run).
3. The predictor's time per image at 4032x3024 over 1280x960 with 100 instances (goal <= 2).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import resize_boxes

from maskrcnn import devices, masks
from maskrcnn.model import SMALL, build_model
from maskrcnn.predictor import Predictor
from maskrcnn.synthetic import make_image

SIZES = {"1280x960": (960, 1280), "4032x3024": (3024, 4032)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=str(devices.default()))
    p.add_argument("--arch", help=f"default: maskrcnn_resnet50_fpn on CUDA, {SMALL} on CPU")
    p.add_argument("--size", type=int, default=800, help="the model's shortest side")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument(
        "--images", type=int, default=8, help="images per timed round of a throughput figure (default: %(default)s)"
    )
    p.add_argument("--detections", type=int, default=20, help="instances per image to aim for")
    args = p.parse_args()
    device = torch.device(args.device)
    arch = args.arch or ("maskrcnn_resnet50_fpn" if device.type == "cuda" else SMALL)
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"machine: {name}; torch {torch.__version__}; {arch} at {args.size} px, random weights, "
        f"{'fp16 autocast' if device.type == 'cuda' else 'fp32'}"
    )

    torch.manual_seed(0)
    model = (
        build_model(arch, num_classes=91, min_size=args.size, max_size=int(args.size * 1333 / 800)).to(device).eval()
    )
    predictor = Predictor(model, [f"c{i}" for i in range(1, 91)], list(range(1, 91)), score_threshold=0.0)
    photos = _photos()
    threshold = _calibrate(predictor, photos["1280x960"], args.detections)
    throughput(predictor, photos, threshold, [int(b) for b in args.batch_sizes.split(",")], args.images)
    postprocessing(predictor, photos)
    pixel_ratio(predictor, photos)


def _photos() -> dict[str, np.ndarray]:
    scene, _ = make_image(np.random.default_rng(0), (960, 960), 6)
    scene = np.array(Image.fromarray(scene).resize((1280, 960), Image.BILINEAR))
    return {name: np.array(Image.fromarray(scene).resize((w, h), Image.BILINEAR)) for name, (h, w) in SIZES.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate(predictor: Predictor, photo: np.ndarray, wanted: int) -> float:
    """The score threshold at which about ``wanted`` detections survive on this photo."""
    predictor.model.roi_heads.score_thresh, predictor.model.roi_heads.detections_per_img = 0.0, 1000
    scores = sorted((i["score"] for i in predictor.predict([photo])[0]), reverse=True)
    return scores[min(wanted, len(scores)) - 1]


def _best_times(fns: list, device: torch.device, repeat: int = 1, rounds: int = 3) -> list[float]:
    """Seconds per call of each function: the rounds alternate between them, and each keeps
    its best round, since noise on a shared machine only ever adds time."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            _sync(device)
            best[k] = min(best[k], (time.perf_counter() - start) / repeat)
    return best


def throughput(predictor: Predictor, photos: dict, threshold: float, batch_sizes: list[int], count: int) -> None:
    heads = predictor.model.roi_heads
    heads.score_thresh, heads.detections_per_img, predictor.max_detections = threshold, 100, 100
    default = predictor.batch_images
    print(
        "\n1. throughput (images/s); the predictor "
        f"{'batches same-canvas images' if default else 'runs each image alone'}, as it does by default on this device"
    )
    print(
        "| input | batch | instances/image | model, each image alone | model, same-canvas batch | predictor "
        "| predictor / model | post-processing share |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, photo in photos.items():
        for batch in batch_sizes:
            imgs = [photo] * batch
            canvases = [predictor._canvas(im) for im in imgs]
            n = len(predictor.predict(imgs[:1])[0])

            def model_only(batched: bool, canvases=canvases):
                predictor.batch_images = batched
                for group in predictor._groups(canvases):
                    predictor._forward([canvases[i] for i in group])

            def full(imgs=imgs):
                predictor.batch_images = default
                predictor.predict(imgs)

            alone, batched, full_s = (
                t / batch
                for t in _best_times(
                    [lambda: model_only(False), lambda: model_only(True), full],
                    predictor.device,
                    max(count // batch, 1),
                )
            )
            model_s = batched if default else alone
            print(
                f"| {name} | {batch} | {n} | {1 / alone:.2f} | {1 / batched:.2f} | {1 / full_s:.2f} | "
                f"{model_s / full_s:.2f} | {1 - model_s / full_s:.0%} |"
            )
    predictor.batch_images = default


def _canvas_encode(mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> list[dict]:
    """The previous post-processing, for comparison: each mask resized into its box, then
    copied onto a zeroed full-image canvas and RLE-encoded whole."""
    padded, scale = expand_masks(mask_probs, padding=1)
    canvas, rles = np.zeros((height, width), dtype=np.uint8), []
    for prob, (x0, y0, x1, y1) in zip(padded, expand_boxes(boxes, scale).to(torch.int64).tolist()):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        crop = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0.5
        cx0, cx1, cy0, cy1 = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        canvas[:] = 0
        if cx1 > cx0 and cy1 > cy0:
            canvas[cy0:cy1, cx0:cx1] = crop[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0].cpu().numpy()
        rles.append(masks.encode(canvas[None])[0])
    return rles


def _detections(predictor: Predictor, photo: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own ``n`` best masks and boxes on ``photo``, in its full-size coordinates."""
    predictor.model.roi_heads.score_thresh, predictor.model.roi_heads.detections_per_img = 0.0, n
    canvas, resized = predictor._canvas(photo)
    det = predictor._forward([(canvas, resized)])[0]
    return det["masks"].float(), resize_boxes(det["boxes"].float(), resized, photo.shape[:2])


def postprocessing(predictor: Predictor, photos: dict) -> None:
    print("\n2. mask post-processing per image (ms): full-image canvas per instance against box-local RLE")
    print("| input | instances | canvas | box-local | speed-up |")
    print("|---|---|---|---|---|")
    for name, photo in photos.items():
        h, w = photo.shape[:2]
        for n in (10, 50, 100):
            probs, boxes = _detections(predictor, photo, n)
            assert masks.paste_and_encode(probs, boxes, h, w) == _canvas_encode(probs, boxes, h, w)  # byte-identical
            before, after = _best_times(
                [
                    functools.partial(_canvas_encode, probs, boxes, h, w),
                    functools.partial(masks.paste_and_encode, probs, boxes, h, w),
                ],
                predictor.device,
            )
            print(f"| {name} | {len(probs)} | {before * 1000:.1f} | {after * 1000:.1f} | {before / after:.1f}x |")


def pixel_ratio(predictor: Predictor, photos: dict) -> None:
    heads = predictor.model.roi_heads
    heads.score_thresh, heads.detections_per_img, predictor.max_detections = 0.0, 100, 100
    (small, large), pictures = zip(*photos.items())
    t_small, t_large = _best_times(
        [functools.partial(predictor.predict, [pictures[0]]), functools.partial(predictor.predict, [pictures[1]])],
        predictor.device,
    )
    print(
        f"\n3. predictor per image with 100 instances: {small} {t_small * 1000:.0f} ms, "
        f"{large} {t_large * 1000:.0f} ms; ratio {t_large / t_small:.2f} (goal <= 2)"
    )


if __name__ == "__main__":
    main()
