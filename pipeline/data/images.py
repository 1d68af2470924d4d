"""Decoding untrusted images into RGB, within a memory bound.

ImageNet has PNGs, CMYK and greyscale files named .JPEG; datasets from elsewhere have worse: a
"decompression bomb" of a few KB whose header claims 65000 x 65000 pixels, 16-bit greyscale PNGs,
truncated files. Every image is sized from its header before any pixel is decoded; one that would
need more than `max_pixels` pixels (after the reduced-scale JPEG decode) is refused as BadImage,
like a truncated one, and never takes a shard task (or `predict`) down.
"""
from __future__ import annotations

import io
import warnings

import numpy as np

DEFAULT_MAX_PIXELS = 40_000_000   # 40 Mpx: ~120 MB as RGB; ImageNet's largest is ~12 Mpx


class BadImage(Exception):
    """A file that cannot be decoded safely; skipped and recorded, never fatal."""


def max_bytes(max_pixels: int) -> int:
    """No compressed image is larger than its raw pixels (plus headers)."""
    return 3 * max_pixels + (1 << 20)


def open_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None):
    """The image in `data` as an RGB PIL image, decoded at a reduced JPEG scale when that still
    leaves max_side pixels on the long side."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage("empty file")
    if len(data) > max_bytes(max_pixels):
        raise BadImage(f"file of {len(data)} bytes is over the bound of {max_bytes(max_pixels)} "
                       f"(max_image_pixels {max_pixels})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:   # its message names a BytesIO's address
        raise BadImage("not an image (no image format recognised)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"not an image ({exc})") from exc
    fmt = im.format or "image"
    w, h = im.size
    if w < 1 or h < 1:
        raise BadImage(f"{fmt} of {w}x{h} pixels")
    if fmt == "JPEG" and max_side:
        scale = max_side / max(w, h)
        if scale <= 0.5:
            im.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))))
    dw, dh = im.size   # after draft: what decoding will really produce
    if dw * dh > max_pixels:
        raise BadImage(f"{fmt} of {w}x{h} pixels is over max_image_pixels ({max_pixels}): "
                       "refused as a possible decompression bomb")
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError, MemoryError) as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise BadImage(f"{reason} {fmt} ({exc})") from exc
    return to_rgb(im)


def to_rgb(im):
    """Any PIL mode as 8-bit RGB. 16- and 32-bit greyscale are scaled (PIL's own convert clips
    them to white)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        grey = np.asarray(im).astype(np.uint32) // 257   # 0..65535 -> 0..255
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        grey = np.asarray(im, dtype=np.float32)
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def decode_rgb(data: bytes, max_resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode any image to an RGB uint8 array no larger than max_resolution on its long side."""
    from ffcv.fields.rgb_image import resizer

    return resizer(np.asarray(open_rgb(data, max_pixels, max_side=max_resolution)), max_resolution)
