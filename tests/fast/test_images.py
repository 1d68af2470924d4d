"""Untrusted images: oddities become RGB, bombs and broken files are refused in words."""
from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import grey16_png, jpeg_claiming, png_claiming
from PIL import Image

from pipeline.data.images import BadImage, decode_rgb
from pipeline.data.sample_data import class_image, jpeg_bytes


def test_decode_converts_real_imagenet_oddities_to_rgb():
    rng = np.random.default_rng(0)
    img = class_image(rng, 1, 4)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    for data in (buf.getvalue(), jpeg_bytes(img, "CMYK"), jpeg_bytes(img, "L")):
        out = decode_rgb(data, 512)
        assert out.dtype == np.uint8 and out.shape == img.shape
    out = decode_rgb(jpeg_bytes(np.zeros((1200, 900, 3), np.uint8)), 256)   # reduced-scale decode
    assert out.shape == (256, 192, 3)
    data = jpeg_bytes(img)
    with pytest.raises(BadImage, match="truncated"):
        decode_rgb(data[: len(data) // 2], 512)
    with pytest.raises(BadImage, match="empty file"):
        decode_rgb(b"", 512)
    with pytest.raises(BadImage, match="not an image") as refused:
        decode_rgb(b"<html>not found</html>", 512)
    assert " at 0x" not in str(refused.value)   # the reason is stored: the same on every run


@pytest.mark.parametrize("data", [png_claiming(65000, 65000), png_claiming(40000, 40000),
                                  jpeg_claiming(65000, 65000)])
def test_decompression_bombs_are_refused_before_decoding(data):
    assert len(data) < 5000
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_rgb(data, 512)


def test_the_pixel_bound_applies_to_real_pixels():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((3000, 3000), np.uint8)).save(buf, format="PNG")   # ~9 KB
    with pytest.raises(BadImage, match="over max_image_pixels"):
        decode_rgb(buf.getvalue(), 512, max_pixels=4_000_000)
    assert decode_rgb(buf.getvalue(), 512, max_pixels=10_000_000).shape == (512, 512, 3)


def test_sixteen_bit_greyscale_keeps_its_grey():
    data = grey16_png(32896)                               # mid-grey in 16 bits
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_rgb(data, 512)
    assert out.shape == (40, 60, 3) and abs(int(out.mean()) - 128) <= 1
