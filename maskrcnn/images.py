"""Image decoding: bytes -> an RGB uint8 array, or an :class:`ImageError` that names the kind."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 100_000_000


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


def decode(data: bytes, *, exif: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to ``(H, W, 3)`` uint8 RGB.

    With ``exif`` the EXIF orientation is applied, so the array is the displayed picture.
    Grayscale, palette, CMYK, alpha and 16-bit images all come out as RGB.
    """
    if not data:
        raise ImageError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check decides; PIL still refuses > 2x its limit outright.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels or im.width == 0 or im.height == 0:
                raise ImageError("too_large", f"{im.width}x{im.height} pixels exceeds --max-pixels {max_pixels}")
            im.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError("too_large", str(err)) from err
    except Image.UnidentifiedImageError as err:
        raise ImageError("not_an_image", "not a recognised image format") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError("corrupt", f"undecodable image: {err}") from err
    if exif:
        im = _oriented(im)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return np.array(_to_rgb(im))  # a writable copy
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError("corrupt", f"undecodable image: {err}") from err


def _oriented(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an unreadable EXIF block leaves the pixels as stored
    rather than losing an otherwise good image."""
    try:
        return ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        return im
