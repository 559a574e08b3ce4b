"""Generated datasets in COCO format, deterministic from a seed.

``shapes``: non-square images of varied sizes on textured backgrounds, with 1..6 instances
of circles, rectangles and triangles in random colours and sizes. Later shapes occlude
earlier ones, and each annotation is the *visible* part, stored as compressed RLE.
``figures``: 1..3 stick figures per image, each a ``figure`` with 11 named keypoints
(:data:`FIGURE_KEYPOINTS`) and a skeleton, for the keypoint models. Every figure faces the
viewer, so its left hand is on the image's right, as a person's is in COCO.
The optional "archive" split is unlabelled images plus a few damaged files, the kind
of input the segmentation job has to survive.

    python -m maskrcnn.synthetic --out data/shapes --train 64 --val 16 --archive 32
    python -m maskrcnn.synthetic --kind figures --out data/figures --train 256 --val 32
"""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from maskrcnn import masks, storage
from maskrcnn.config import floats
from maskrcnn.keypoints import KeypointSpec

CLASSES = ("circle", "rectangle", "triangle")
SHAPE_SIZES = (0.15, 0.6)  # a shape's size, as fractions of the image's shorter side
FIGURE_KEYPOINTS = KeypointSpec(
    (
        "head",
        "neck",
        "left_elbow",
        "right_elbow",
        "left_hand",
        "right_hand",
        "hip",
        "left_knee",
        "right_knee",
        "left_foot",
        "right_foot",
    ),
    ((1, 2), (2, 3), (2, 4), (3, 5), (4, 6), (2, 7), (7, 8), (7, 9), (8, 10), (9, 11)),
)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.3)
    stripes = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None] * rng.uniform(10, 40)
    noise = rng.normal(0, 12, (h, w, 3))
    return np.clip(base + stripes + noise, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, cls: str, h: int, w: int, sizes: tuple[float, float]) -> np.ndarray:
    size = np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1]))) * min(h, w)  # log-uniform: small and large
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
    rng: np.random.Generator,
    size_range: tuple[int, int],
    max_instances: int,
    shape_sizes: tuple[float, float] = SHAPE_SIZES,
    min_visible: float = 0.0,
    landscape: bool = False,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Return an RGB image and its visible instances as ``(class index, mask)``.

    A shape's size is a fraction of the image's shorter side, drawn log-uniformly from
    ``shape_sizes``. With ``min_visible``, a shape that would leave an earlier one with less
    than that fraction of its own area in view is drawn again elsewhere (up to 10 times,
    then left out), so every instance stays recognisable. ``landscape`` makes every image at
    least as wide as it is tall, so that batches pad less."""
    h, w = _size(rng, size_range)
    h, w = (min(h, w), max(h, w)) if landscape else (h, w)
    image = _background(rng, h, w)
    placed: list[tuple[int, np.ndarray, int]] = []  # (class, visible mask, whole area)
    for _ in range(int(rng.integers(1, max_instances + 1))):
        cls = int(rng.integers(len(CLASSES)))
        for _try in range(10 if min_visible else 1):
            mask = _shape_mask(rng, CLASSES[cls], h, w, shape_sizes)
            if all((m & ~mask).sum() >= min_visible * area for _, m, area in placed):
                break
        else:
            continue
        colour = rng.integers(0, 256, 3)
        shade = rng.normal(0, 8, (int(mask.sum()), 3))
        image[mask] = np.clip(colour + shade, 0, 255).astype(np.uint8)
        placed = [(c, m & ~mask, area) for c, m, area in placed]  # the new shape hides what is under it
        placed.append((cls, mask, int(mask.sum())))
    return image, [(c, m) for c, m, _ in placed if m.sum() >= 16]


def _figure_joints(rng: np.random.Generator, height: float, cx: float, top: float) -> np.ndarray:
    """The 11 joints of a stick figure ``height`` tall, in :data:`FIGURE_KEYPOINTS`' order. Angles
    are from the image's +x axis, y down; a left limb (+1) points to the image's right."""
    head, neck, hip = (cx, top + 0.1 * height), (cx, top + 0.22 * height), (cx, top + 0.55 * height)

    def limb(start: tuple, side: int, angles: tuple, length: float) -> tuple:
        a = np.radians(rng.uniform(*angles))
        return start[0] + side * length * np.cos(a), start[1] + length * np.sin(a)

    joints = {"head": head, "neck": neck, "hip": hip}
    for side, name in ((1, "left"), (-1, "right")):
        elbow = limb(neck, side, (-50, 70), 0.18 * height)
        joints[f"{name}_elbow"], joints[f"{name}_hand"] = elbow, limb(elbow, side, (-70, 90), 0.16 * height)
        knee = limb(hip, side, (55, 80), 0.24 * height)
        joints[f"{name}_knee"], joints[f"{name}_foot"] = knee, limb(knee, side, (70, 105), 0.2 * height)
    return np.array([joints[n] for n in FIGURE_KEYPOINTS.names], dtype=np.float64)


def _figure_mask(joints: np.ndarray, height: float, h: int, w: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(0.07 * height))
    for a, b in FIGURE_KEYPOINTS.skeleton[1:]:  # every bone but head-neck: the head is a disc
        draw.line([tuple(joints[a - 1]), tuple(joints[b - 1])], fill=1, width=width)
        draw.ellipse([*(joints[b - 1] - width / 2), *(joints[b - 1] + width / 2)], fill=1)  # round joints
    r = 0.1 * height
    draw.ellipse([joints[0][0] - r, joints[0][1] - r, joints[0][0] + r, joints[0][1] + r], fill=1)
    return np.array(canvas, dtype=bool)


def _size(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
    return h, w


def make_figure_image(
    rng: np.random.Generator, size_range: tuple[int, int], max_instances: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
    """An RGB image and its stick figures as ``(0, visible mask, (11, 3) keypoints)``. A joint
    that a later figure hides keeps its place with visibility 1 (COCO's labelled, not visible)."""
    h, w = _size(rng, size_range)
    image = _background(rng, h, w)
    placed: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(int(rng.integers(1, max_instances + 1))):
        height = rng.uniform(0.45, 0.9) * h
        reach = 0.36 * height  # how far a hand or foot can be from the body's axis
        if 2 * reach + 2 > w:
            continue
        cx, top = rng.uniform(reach + 1, w - reach - 1), rng.uniform(1, h - height - 1)
        joints = _figure_joints(rng, height, cx, top)
        mask = _figure_mask(joints, height, h, w)
        image[mask] = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 8, (int(mask.sum()), 3)), 0, 255)
        placed = [(m & ~mask, j) for m, j in placed]
        placed.append((mask, joints))
    figures = []
    for mask, joints in placed:
        xs, ys = (
            np.clip(joints[:, 0].round().astype(int), 0, w - 1),
            np.clip(joints[:, 1].round().astype(int), 0, h - 1),
        )
        visible = np.where(mask[ys, xs], 2, 1)
        figures.append((0, mask, np.column_stack([joints, visible])))
    return image, [f for f in figures if f[1].sum() >= 16]


def _annotation(ann_id: int, image_id: int, cls: int, mask: np.ndarray, points: np.ndarray | None = None) -> dict:
    ys, xs = np.nonzero(mask)
    rle = masks.encode(mask[None])[0]
    x0, y0 = int(xs.min()), int(ys.min())
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cls + 1,
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        "area": masks.area(rle),
        "segmentation": rle,
        "iscrowd": 0,
    }
    if points is not None:
        ann["keypoints"] = [round(float(v), 2) for v in points.reshape(-1)]
        ann["num_keypoints"] = int((points[:, 2] > 0).sum())
    return ann


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def generate_split(
    out: str,
    count: int,
    seed: int,
    size_range: tuple[int, int] = (96, 160),
    max_instances: int = 6,
    kind: str = "shapes",
    **scene: Any,
) -> str:
    """Write ``count`` images of ``kind`` (``shapes`` or ``figures``) under ``out/images`` and
    ``out/annotations.json``; return the JSON's URI. ``scene`` takes :func:`make_image`'s
    keywords (``shape_sizes``, ``min_visible``, ``landscape``)."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": _categories(kind)}
    for image_id in range(1, count + 1):
        if kind == "figures":
            image, instances = make_figure_image(rng, size_range, min(max_instances, 3))
        else:
            image, instances = make_image(rng, size_range, max_instances, **scene)
        name = f"{image_id:06d}.jpg"
        storage.write_bytes(storage.join(out, "images", name), _jpeg(image))
        gt["images"].append({"id": image_id, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for cls, mask, *points in instances:
            gt["annotations"].append(_annotation(len(gt["annotations"]) + 1, image_id, cls, mask, *points))
    ann_uri = storage.join(out, "annotations.json")
    storage.write_text(ann_uri, json.dumps(gt))
    return ann_uri


def _categories(kind: str) -> list[dict]:
    if kind == "figures":
        return [{"id": 1, "name": "figure", "supercategory": "figure", **FIGURE_KEYPOINTS.as_dict()}]
    return [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]


def damaged_files(rng: np.random.Generator, size_range: tuple[int, int]) -> dict[str, bytes]:
    """Files an archive really holds: a JPEG cut short, a text file, and an empty file."""
    whole = _jpeg(make_image(rng, size_range, 3)[0])
    return {
        "damaged_truncated.jpg": whole[: len(whole) // 3],
        "damaged_not_an_image.jpg": b"this was meant to be a photo\n",
        "damaged_empty.jpg": b"",
    }


def generate_archive(
    out: str, count: int, seed: int, size_range: tuple[int, int] = (96, 160), max_instances: int = 6, **scene: Any
) -> str:
    """Write ``count`` unlabelled images (plus :func:`damaged_files`) under ``out``; return ``out``.
    ``scene`` takes :func:`make_image`'s keywords, as :func:`generate_split` does."""
    rng = np.random.default_rng(seed)
    for index in range(1, count + 1):
        image = make_image(rng, size_range, max_instances, **scene)[0]
        storage.write_bytes(storage.join(out, f"{index:06d}.jpg"), _jpeg(image))
    for name, blob in damaged_files(rng, size_range).items():
        storage.write_bytes(storage.join(out, name), blob)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m maskrcnn.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--kind", choices=("shapes", "figures"), default="shapes", help="what the images show")
    p.add_argument("--train", type=int, default=64, help="training images")
    p.add_argument("--val", type=int, default=16, help="validation images")
    p.add_argument("--archive", type=int, default=0, help="unlabelled archive images, plus 3 damaged files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=int, default=96)
    p.add_argument("--max-side", type=int, default=160)
    p.add_argument("--max-instances", type=int, default=6, help="shapes or figures per image, at most")
    p.add_argument(
        "--shape-sizes",
        type=floats,
        default=SHAPE_SIZES,
        metavar="MIN,MAX",
        help="a shape's size as fractions of the image's shorter side (default: %(default)s)",
    )
    p.add_argument(
        "--min-visible",
        type=float,
        default=0.0,
        help="place shapes so that each keeps at least this fraction of its area in view",
    )
    p.add_argument("--landscape", action="store_true", help="every image at least as wide as tall (batches pad less)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sizes = (args.min_side, args.max_side)
    scene = {"shape_sizes": args.shape_sizes, "min_visible": args.min_visible, "landscape": args.landscape}
    for split, count, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        uri = generate_split(storage.join(args.out, split), count, seed, sizes, args.max_instances, args.kind, **scene)
        print(f"{split}: {count} images -> {uri}")
    if args.archive:
        uri = generate_archive(
            storage.join(args.out, "archive"), args.archive, args.seed + 2, sizes, args.max_instances, **scene
        )
        print(f"archive: {args.archive} images + 3 damaged files -> {uri}")


if __name__ == "__main__":
    main()
