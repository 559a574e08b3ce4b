"""Pictures of predictions: the one renderer behind ``export.py``, ``predict.py`` and the report.

Like detectron2's ``Visualizer``: every instance has its own colour (by rank of score, from
a palette of well-separated colours), its mask is filled at :data:`ALPHA` and outlined with a
solid contour, its keypoints and skeleton are drawn over it in the same colour
(``torchvision.utils.draw_keypoints``), and its label (``category score``) sits on a filled
background inside the picture. Labels never overlap: one that fits nowhere free is left out, and the strip under
the picture still counts every instance by category.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_keypoints

from maskrcnn import masks
from maskrcnn.config import option
from maskrcnn.output import KEYPOINT_MIN_SCORE

ALPHA = 0.5
# Sasha Trubetskoy's 20 distinct colours, in his order (neighbours differ most), minus
# white, black and grey.
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in picture pixels, exclusive ends
PICTURES = "pictures"


@dataclass(kw_only=True)
class PictureOptions:
    """How every job that draws pictures draws them: the flags of its ``pictures`` group."""

    max_side: int = option("longest side of a picture, pixels", 1024, group=PICTURES)
    boxes: bool = option(
        "draw boxes as well as masks, keypoints and labels (boxes are always drawn where there is no mask)",
        False,
        group=PICTURES,
    )

    def __post_init__(self) -> None:
        if self.max_side < 1:
            raise ValueError(f"--max-side must be at least 1, got {self.max_side}")


def picture(
    rgb: np.ndarray,
    instances: list[dict[str, Any]],
    size: tuple[int, int] | None = None,
    *,
    max_side: int = 1024,
    enlarge_to: int = 512,
    boxes: bool = False,
    skeleton: tuple[tuple[int, int], ...] = (),
) -> Image.Image:
    """Draw ``instances`` (output rows' instances, in the coordinates of ``size`` = the full
    image's ``(height, width)``, by default the array's own) over ``rgb``, with a strip below
    that counts them. The picture is scaled down to fit ``max_side``, and a small image is
    enlarged until its longest side is ``enlarge_to``, so that its labels stay readable.
    ``skeleton`` (1-based keypoint pairs, as COCO writes them) joins the instances' keypoints."""
    height, width = size or rgb.shape[:2]
    longest = max(height, width)
    scale = max_side / longest if longest > max_side else max(1.0, min(enlarge_to, max_side) / longest)
    out = (max(1, round(width * scale)), max(1, round(height * scale)))
    base = Image.fromarray(rgb)
    if base.size != out:
        base = base.resize(out, Image.Resampling.LANCZOS if out[0] < base.width else Image.Resampling.BICUBIC)
    canvas = np.asarray(base, np.float32).copy()
    ranked = sorted(instances, key=lambda i: -i["score"])
    colours = [PALETTE[k % len(PALETTE)] for k in range(len(ranked))]
    thickness = max(1, round(max(out) / 400))
    for inst, colour in zip(ranked, colours):
        if inst.get("mask") is not None:
            _fill(canvas, inst, (height, width), scale, colour, thickness)
    pixels = canvas.round().astype(np.uint8)
    for inst, colour in zip(ranked, colours):
        if inst.get("keypoints") is not None:  # over a mask of its own colour, in the label's ink
            ink = colour if inst.get("mask") is None else _ink(colour)
            _skeleton(pixels, inst["keypoints"], scale, ink, max(2, thickness), skeleton)
    drawn = Image.fromarray(pixels)
    font = _font(max(out))
    pen = ImageDraw.Draw(drawn)
    rects = [_scaled_box(i["bbox"], scale, out) for i in ranked]
    for inst, rect, colour in zip(ranked, rects, colours):
        if boxes or inst.get("mask") is None:  # a keypoint model's instances have no mask to show
            pen.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), outline=colour, width=thickness)
    texts = [f"{i['category']} {i['score']:.2f}" for i in ranked]
    spots = place_labels(rects, [_text_size(font, t) for t in texts], out)
    for spot, text, colour in zip(spots, texts, colours):
        if spot is not None:
            pen.rectangle((spot[0], spot[1], spot[2] - 1, spot[3] - 1), fill=colour)
            pen.text((spot[0] + 2, spot[1] + 1), text, font=font, fill=_ink(colour))
    return _with_strip(drawn, legend(instances), font)


def legend(instances: list[dict[str, Any]]) -> str:
    """``3 instances: 2 person, 1 dog`` (most frequent first)."""
    if not instances:
        return "no instances"
    counts = Counter(i["category"] for i in instances).most_common()
    noun = "instance" if len(instances) == 1 else "instances"
    return f"{len(instances)} {noun}: " + ", ".join(f"{n} {c}" for c, n in counts)


def _fill(canvas: np.ndarray, inst: dict, size: tuple[int, int], scale: float, colour: tuple, thickness: int) -> None:
    """Blend the instance's mask into ``canvas`` (its box region only) and draw its contour."""
    x, y, w, h = inst["bbox"]
    fx0, fy0 = max(0, math.floor(x)), max(0, math.floor(y))
    fx1, fy1 = min(size[1], math.ceil(x + w) + 1), min(size[0], math.ceil(y + h) + 1)
    ox0, oy0 = math.floor(fx0 * scale), math.floor(fy0 * scale)
    ox1, oy1 = (
        min(canvas.shape[1], max(ox0 + 1, math.ceil(fx1 * scale))),
        min(canvas.shape[0], max(oy0 + 1, math.ceil(fy1 * scale))),
    )
    if fx1 <= fx0 or fy1 <= fy0 or ox1 <= ox0 or oy1 <= oy0:
        return
    crop = masks.decode(inst["mask"], *size)[fy0:fy1, fx0:fx1]
    if crop.shape != (oy1 - oy0, ox1 - ox0):
        resized = Image.fromarray(crop * np.uint8(255)).resize((ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR)
        crop = np.asarray(resized) > 127
    mask = crop.astype(bool)
    region = canvas[oy0:oy1, ox0:ox1]
    region[mask] = region[mask] * (1 - ALPHA) + np.asarray(colour, np.float32) * ALPHA
    region[mask & ~_eroded(mask, thickness)] = colour


def _skeleton(pixels: np.ndarray, points: list, scale: float, colour: tuple, thickness: int, skeleton: tuple) -> None:
    """Draw into ``pixels`` one instance's keypoints above :data:`KEYPOINT_MIN_SCORE`, and the
    bones between them, in ``colour``. ``draw_keypoints`` draws bones in white only, so it draws on a black canvas the
    size of the keypoints' extent, and its strokes are painted in ``colour``."""
    triples = torch.tensor(points, dtype=torch.float32).reshape(1, -1, 3)
    shown = triples[..., 2] > KEYPOINT_MIN_SCORE
    if not shown.any():
        return
    xy, margin = triples[..., :2] * scale, thickness + 2
    x0, y0 = (max(0, int(v) - margin) for v in xy[shown].amin(0).tolist())
    x1, y1 = (int(v) + margin + 1 for v in xy[shown].amax(0).tolist())
    x1, y1 = min(x1, pixels.shape[1]), min(y1, pixels.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    strokes = draw_keypoints(
        torch.zeros((3, y1 - y0, x1 - x0), dtype=torch.uint8),
        xy - torch.tensor([x0, y0]),
        connectivity=[(a - 1, b - 1) for a, b in skeleton],
        colors=(255, 255, 255),
        radius=thickness + 1,
        width=thickness,
        visibility=shown,
    )
    pixels[y0:y1, x0:x1][strokes.amax(0).numpy() > 0] = colour


def _eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` shrunk by ``steps`` pixels (4-neighbour erosion; outside counts as empty)."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        mask = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask


def _scaled_box(bbox: list[float], scale: float, out: tuple[int, int]) -> Box:
    x, y, w, h = bbox
    x0, y0 = min(out[0] - 1, max(0, round(x * scale))), min(out[1] - 1, max(0, round(y * scale)))
    return x0, y0, max(x0 + 1, min(out[0], round((x + w) * scale))), max(y0 + 1, min(out[1], round((y + h) * scale)))


def place_labels(boxes: list[Box], sizes: list[tuple[int, int]], picture_size: tuple[int, int]) -> list[Box | None]:
    """Where each label goes, in order (the first placed first): just above its box, else
    inside its top, else below it, else inside its bottom, each moved inside the picture;
    ``None`` where every spot would overlap a label already placed or not fit at all."""
    width, height = picture_size
    placed: list[Box] = []
    spots: list[Box | None] = []
    for (x0, y0, _, y1), (lw, lh) in zip(boxes, sizes):
        spot = None
        if lw <= width and lh <= height:
            for left, top in ((x0, y0 - lh), (x0, y0), (x0, y1), (x0, y1 - lh)):
                left, top = min(max(0, left), width - lw), min(max(0, top), height - lh)
                rect = (left, top, left + lw, top + lh)
                if not any(_overlap(rect, other) for other in placed):
                    spot = rect
                    break
        spots.append(spot)
        if spot is not None:
            placed.append(spot)
    return spots


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _font(longest_side: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own scalable font, sized to the picture (at least 11 px)."""
    return ImageFont.load_default(size=max(11, round(longest_side / 40)))


def _text_size(font: Any, text: str) -> tuple[int, int]:
    """The label's background size: the text with a small margin."""
    left, top, right, bottom = font.getbbox(text)
    return right - min(0, left) + 4, bottom - min(0, top) + 3


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black text on light colours, white on dark."""
    return (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else (255, 255, 255)


def _with_strip(drawn: Image.Image, text: str, font: Any) -> Image.Image:
    """The picture with a dark strip under it holding ``text`` (cut with … to fit)."""
    text = _fit(text, font, drawn.width - 6)
    line = _text_size(font, "Ag")[1] + 4
    out = Image.new("RGB", (drawn.width, drawn.height + line), (32, 32, 32))
    out.paste(drawn, (0, 0))
    ImageDraw.Draw(out).text((3, drawn.height + 2), text, font=font, fill=(235, 235, 235))
    return out


def _fit(text: str, font: Any, width: int) -> str:
    if _text_size(font, text)[0] <= width:
        return text
    while text and _text_size(font, text + "…")[0] > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(pictures: list[tuple[Image.Image, str]], columns: int = 4, cell: int = 320) -> bytes:
    """Pictures (each with its caption, e.g. the file name) in a grid PNG, ``columns`` wide:
    each scaled to fit a ``cell`` square with its aspect ratio kept, its caption under it."""
    if not pictures:
        raise ValueError("no pictures for the contact sheet")
    font = _font(cell)
    caption = _text_size(font, "Ag")[1] + 6
    pad, rows = 6, math.ceil(len(pictures) / columns)
    cols = min(columns, len(pictures))
    sheet = Image.new("RGB", (pad + cols * (cell + pad), pad + rows * (cell + caption + pad)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for k, (pic, text) in enumerate(pictures):
        left, top = pad + (k % columns) * (cell + pad), pad + (k // columns) * (cell + caption + pad)
        scale = min(1.0, cell / max(pic.size))
        fitted = pic.resize(
            (max(1, round(pic.width * scale)), max(1, round(pic.height * scale))), Image.Resampling.LANCZOS
        )
        sheet.paste(fitted, (left + (cell - fitted.width) // 2, top + cell - fitted.height))
        pen.text((left, top + cell + 2), _fit(text, font, cell), font=font, fill=(0, 0, 0))
    return png(sheet)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
