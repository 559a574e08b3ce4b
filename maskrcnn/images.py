"""Image decoding: bytes -> an RGB uint8 array, or an :class:`ImageError` that names the kind;
and :func:`read`, which fetches and decodes one image for every job that predicts."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from typing import Iterator, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

from maskrcnn import storage

DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # what a listing keeps
# Why an image could not be used: the first word of an output row's ``error`` and of a
# training run's ``skipped_*`` counts alike.
ERROR_KINDS = ("missing", "read_failed", "empty", "not_an_image", "corrupt", "too_large")


class ImageError(ValueError):
    """An image that cannot be used. ``kind`` is a short stable name for counting."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float images: scale to 8 bits rather than clip at 255.
        arr = np.asarray(im, dtype=np.float32)
        hi = float(arr.max()) if arr.size else 0.0
        arr = arr * (255.0 / hi) if hi > 255.0 else arr
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


class Decoded(NamedTuple):
    pixels: np.ndarray  # (h, w, 3) uint8 RGB as displayed; smaller than height x width when reduced
    height: int  # the full displayed image's size: the coordinates predictions are given in
    width: int


NOTHING = Decoded(np.zeros((0, 0, 3), np.uint8), 0, 0)


def read(
    uri: str, fit: tuple[int, int] | None, max_pixels: int = DEFAULT_MAX_PIXELS, *, exif: bool = True
) -> tuple[Decoded, str | None]:
    """Fetch and decode an image as the model will see it (see :func:`decode_to_fit`). A
    failure is returned, not raised: ``"kind: message"``, the kind one of :data:`ERROR_KINDS`."""
    try:
        return decode_to_fit(storage.read_bytes(uri), fit, exif=exif, max_pixels=max_pixels), None
    except storage.StorageError as err:
        return NOTHING, _read_error(uri, err)
    except ImageError as err:
        return NOTHING, f"{err.kind}: {err}"


def _read_error(uri: str, err: Exception) -> str:
    try:
        missing = not storage.exists(uri)
    except storage.StorageError:
        missing = False
    return f"missing: {uri} no longer exists" if missing else f"read_failed: {err}"


def decode(data: bytes, *, exif: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to ``(H, W, 3)`` uint8 RGB.

    With ``exif`` the EXIF orientation is applied, so the array is the displayed picture.
    Grayscale, palette, CMYK, alpha and 16-bit images all come out as RGB.
    """
    return decode_to_fit(data, None, exif=exif, max_pixels=max_pixels).pixels


def decode_to_fit(
    data: bytes, fit: tuple[int, int] | None, *, exif: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Decoded:
    """Like :func:`decode`, but a JPEG at least twice the size a model resizes it to
    (``fit`` = the model's shortest side and longest-side cap) decodes at 1/2, 1/4 or 1/8
    scale, no smaller than that size: libjpeg scales in the DCT (PIL's ``draft()``),
    several times faster than a full decode. ``height`` and ``width`` stay the full
    displayed size. ``max_pixels`` applies to the full size."""
    if not data:
        raise ImageError("empty", "zero-byte file")
    with _pil():
        im = Image.open(io.BytesIO(data))
    if im.width == 0 or im.height == 0:
        raise ImageError("empty", f"{im.width}x{im.height} pixels")
    if im.width * im.height > max_pixels:
        raise ImageError("too_large", f"{im.width}x{im.height} pixels exceeds --max-pixels {max_pixels}")
    full_w, full_h = im.size
    if im.format == "JPEG":
        _check_jpeg_length(data)
    if fit is not None:
        _draft(im, *fit)
    with _pil():
        im.load()
    swapped = False
    if exif:
        im, swapped = _oriented(im)
    with _pil():
        pixels = np.array(_to_rgb(im))  # a writable copy
    return Decoded(pixels, full_w if swapped else full_h, full_h if swapped else full_w)


@contextlib.contextmanager
def _pil() -> Iterator[None]:
    """PIL's warnings silenced (our own max_pixels check decides; PIL still refuses > 2x its
    limit outright) and its errors turned into an :class:`ImageError` of the right kind."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    except Image.DecompressionBombError as err:
        raise ImageError("too_large", str(err)) from err
    except Image.UnidentifiedImageError as err:
        raise ImageError("not_an_image", "not a recognised image format") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError("corrupt", f"undecodable image: {err}") from err


# Huffman-coded JPEG frames (baseline, extended, progressive, lossless). Their entropy-coded
# data spends at least one bit on every 8x8 block of every component (its DC term; the EOB
# run of a progressive AC scan can cover many blocks, the DC scan cannot). Arithmetic-coded
# frames (SOF9 and up) have no such floor and are not checked.
_HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2, 0xC3)


def _check_jpeg_length(data: bytes) -> None:
    """Refuse a JPEG whose data ends long before its declared size. libjpeg pads the missing
    blocks without an error (a "premature end of data segment" warning that PIL discards), so
    such a file would decode to a flat, made-up picture: a fraction of a bit per block is
    impossible for a Huffman-coded JPEG."""
    frame = _jpeg_frame(data)
    if frame is None or frame[0] not in _HUFFMAN_FRAMES:
        return
    _, width, height, components, end = frame
    h_max, v_max = max(h for h, _ in components), max(v for _, v in components)
    blocks = sum(
        math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)
        for h, v in components
    )
    if (len(data) - end) * 8 < blocks:
        raise ImageError(
            "corrupt", f"JPEG data ends early: {len(data)} bytes cannot hold {width}x{height} pixels ({blocks} blocks)"
        )


def _jpeg_frame(data: bytes) -> tuple[int, int, int, list[tuple[int, int]], int] | None:
    """The first frame header of a JPEG: (SOF marker, width, height, each component's
    sampling factors, where the header ends); None if the markers before it do not parse."""
    at = 2  # after SOI
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            header = data[at + 4 : at + 2 + length]
            if len(header) < 6 or len(header) < 6 + 3 * header[5]:
                return None
            height, width = int.from_bytes(header[1:3], "big"), int.from_bytes(header[3:5], "big")
            sampling = [(max(1, b >> 4), max(1, b & 15)) for b in header[7 : 6 + 3 * header[5] : 3]]
            return (marker, width, height, sampling, at + 2 + length) if sampling else None
        at += 2 + length
    return None


def _draft(im: Image.Image, min_size: int, max_size: int) -> None:
    """Let a JPEG decode reduced, as long as it stays at least the model's input size
    (the scale torchvision's transform resizes by, which is the same for either orientation)."""
    if im.format != "JPEG":
        return
    scale = min(min_size / min(im.size), max_size / max(im.size))
    if scale <= 0.5:
        im.draft(None, (math.ceil(im.width * scale), math.ceil(im.height * scale)))


def _oriented(im: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation; return the image and whether its axes swapped. An
    unreadable EXIF block leaves the pixels as stored rather than losing a good image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": handled below
            oriented = ImageOps.exif_transpose(im)
            swapped = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        return im, False
    return oriented, swapped
