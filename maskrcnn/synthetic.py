"""A generated shapes dataset in COCO format, deterministic from a seed.

Non-square images of varied sizes on textured backgrounds, with 1..6 instances of
circles, rectangles and triangles in random colours and sizes. Later shapes occlude
earlier ones, and each annotation is the *visible* part, stored as compressed RLE.
The optional "archive" split is unlabelled images plus a few damaged files, the kind
of input the segmentation job has to survive.

    python -m maskrcnn.synthetic --out data/shapes --train 64 --val 16 --archive 32
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image, ImageDraw

from maskrcnn import masks, storage

CLASSES = ("circle", "rectangle", "triangle")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
    stripes = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None] * rng.uniform(10, 40)
    noise = rng.normal(0, 12, (h, w, 3))
    return np.clip(base + stripes + noise, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, cls: str, h: int, w: int) -> np.ndarray:
    size = np.exp(rng.uniform(np.log(0.15), np.log(0.6))) * min(h, w)  # log-uniform: small and large
    cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if cls == "circle":
        draw.ellipse([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2], fill=1)
    elif cls == "rectangle":
        aspect = rng.uniform(0.5, 2.0)
        hw, hh = size / 2 * np.sqrt(aspect), size / 2 / np.sqrt(aspect)
        draw.rectangle([cx - hw, cy - hh, cx + hw, cy + hh], fill=1)
    else:
        rot = rng.uniform(0, 2 * np.pi)
        pts = [
            (cx + size / 2 * np.cos(rot + k * 2 * np.pi / 3), cy + size / 2 * np.sin(rot + k * 2 * np.pi / 3))
            for k in range(3)
        ]
        draw.polygon(pts, fill=1)
    return np.array(canvas, dtype=bool)


def make_image(
    rng: np.random.Generator, size_range: tuple[int, int], max_instances: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Return an RGB image and its visible instances as ``(class index, mask)``."""
    h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
    image = _background(rng, h, w)
    placed: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_instances + 1))):
        cls = int(rng.integers(len(CLASSES)))
        mask = _shape_mask(rng, CLASSES[cls], h, w)
        colour = rng.integers(0, 256, 3)
        shade = rng.normal(0, 8, (int(mask.sum()), 3))
        image[mask] = np.clip(colour + shade, 0, 255).astype(np.uint8)
        placed = [(c, m & ~mask) for c, m in placed]  # the new shape hides what is under it
        placed.append((cls, mask))
    return image, [(c, m) for c, m in placed if m.sum() >= 16]


def _annotation(ann_id: int, image_id: int, cls: int, mask: np.ndarray) -> dict:
    ys, xs = np.nonzero(mask)
    rle = masks.encode(mask[None])[0]
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cls + 1,
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        "area": masks.area(rle),
        "segmentation": rle,
        "iscrowd": 0,
    }


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def generate_split(
    out: str, count: int, seed: int, size_range: tuple[int, int] = (96, 160), max_instances: int = 6
) -> str:
    """Write ``count`` images under ``out/images`` and ``out/annotations.json``; return the JSON's URI."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    for image_id in range(1, count + 1):
        image, instances = make_image(rng, size_range, max_instances)
        name = f"{image_id:06d}.jpg"
        storage.write_bytes(storage.join(out, "images", name), _jpeg(image))
        gt["images"].append({"id": image_id, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for cls, mask in instances:
            gt["annotations"].append(_annotation(len(gt["annotations"]) + 1, image_id, cls, mask))
    ann_uri = storage.join(out, "annotations.json")
    storage.write_text(ann_uri, json.dumps(gt))
    return ann_uri


def damaged_files(rng: np.random.Generator, size_range: tuple[int, int]) -> dict[str, bytes]:
    """Files an archive really holds: a JPEG cut short, a text file, and an empty file."""
    whole = _jpeg(make_image(rng, size_range, 3)[0])
    return {
        "damaged_truncated.jpg": whole[: len(whole) // 3],
        "damaged_not_an_image.jpg": b"this was meant to be a photo\n",
        "damaged_empty.jpg": b"",
    }


def generate_archive(out: str, count: int, seed: int, size_range: tuple[int, int] = (96, 160)) -> str:
    """Write ``count`` unlabelled images (plus :func:`damaged_files`) under ``out``; return ``out``."""
    rng = np.random.default_rng(seed)
    for index in range(1, count + 1):
        storage.write_bytes(storage.join(out, f"{index:06d}.jpg"), _jpeg(make_image(rng, size_range, 6)[0]))
    for name, blob in damaged_files(rng, size_range).items():
        storage.write_bytes(storage.join(out, name), blob)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m maskrcnn.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--train", type=int, default=64, help="training images")
    p.add_argument("--val", type=int, default=16, help="validation images")
    p.add_argument("--archive", type=int, default=0, help="unlabelled archive images, plus 3 damaged files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=int, default=96)
    p.add_argument("--max-side", type=int, default=160)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    for split, count, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        uri = generate_split(storage.join(args.out, split), count, seed, (args.min_side, args.max_side))
        print(f"{split}: {count} images -> {uri}")
    if args.archive:
        uri = generate_archive(
            storage.join(args.out, "archive"), args.archive, args.seed + 2, (args.min_side, args.max_side)
        )
        print(f"archive: {args.archive} images + 3 damaged files -> {uri}")


if __name__ == "__main__":
    main()
