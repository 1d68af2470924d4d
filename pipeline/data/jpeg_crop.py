"""Partial JPEG decoding (pipeline/data/jpeg_crop.c) as a function FFCV's numba pipeline can call.

crop_decode(source, out, y, x, h, w, denom, dims) decodes the crop (y, x, h, w) of a JPEG at
1/denom scale into `out`. On 0 (success) `out` holds dims[0] rows of dims[1] RGB pixels, and the
crop is the dims[3] columns from column dims[2]; on -1 the caller decodes the whole image.
"""
from __future__ import annotations

import ctypes

import numpy as np

try:
    from . import _jpeg_crop

    _fn = ctypes.CDLL(_jpeg_crop.__file__).crop_decode
    _fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,
                    *[ctypes.c_int64] * 5, ctypes.c_void_p]
    _fn.restype = ctypes.c_int
    AVAILABLE = True
except (ImportError, OSError, AttributeError):   # a checkout whose extension was not built
    AVAILABLE = False

if AVAILABLE:
    def crop_decode(source: np.ndarray, out: np.ndarray, y: int, x: int, h: int, w: int,
                    denom: int, dims: np.ndarray) -> int:
        return _fn(source.ctypes.data, source.size, out.ctypes.data, out.size,
                   y, x, h, w, denom, dims.ctypes.data)
else:
    def crop_decode(source: np.ndarray, out: np.ndarray, y: int, x: int, h: int, w: int,
                    denom: int, dims: np.ndarray) -> int:
        return -1
