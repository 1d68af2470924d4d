"""Each training sample's view (its crop rectangle and flip) as a pure function of (seed, epoch,
global sample id) and the stored image's size: the same whatever the thread, rank, node or world
size, so a resumed epoch is the same epoch down to its pixels.

FFCV 1.0.2's RandomResizedCrop and RandomHorizontalFlip draw from numba's per-thread np.random,
seeded from OS entropy: two processes give the same samples different crops. Here every random
number is a counter-based hash (splitmix64) of (seed, epoch, id, draw), computed in numba code
without fastmath (FFCV compiles its own operations with fastmath), so the loader's decoder and
the `views` figure of `epoch_samples` call one compiled function. RandomResizedCrop's semantics
are torchvision's and FFCV's: area scale in (0.08, 1), log-uniform aspect ratio in (3/4, 4/3),
10 tries, then the centre crop clamped to the ratio range.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=False)
def _mix(z):
    """splitmix64's finaliser: a bijection of uint64 whose outputs pass as independent."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=False)
def _uniform(key, draw):
    """The draw-th uniform number in [0, 1) of a sample's key (53 bits)."""
    bits = _mix(key + np.uint64(draw + 1) * _GOLDEN)
    return np.float64(bits >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=False)
def sample_key(seed, epoch, gid):
    return _mix(_mix(_mix(np.uint64(seed)) ^ np.uint64(epoch)) ^ np.uint64(gid))


@njit(cache=False)
def view(seed, epoch, gid, height, width, scale0, scale1, ratio0, ratio1):
    """(y, x, h, w, flip) of sample `gid` in `epoch`: the crop rectangle in the stored image's
    pixels (height x width) and 1 to flip it left-right."""
    key = sample_key(seed, epoch, gid)
    height, width = np.int64(height), np.int64(width)
    area = np.float64(height * width)
    log0, log1 = math.log(ratio0), math.log(ratio1)
    for t in range(10):
        target = area * (scale0 + (scale1 - scale0) * _uniform(key, 4 * t))
        aspect = math.exp(log0 + (log1 - log0) * _uniform(key, 4 * t + 1))
        w = np.int64(round(math.sqrt(target * aspect)))
        h = np.int64(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = np.int64(_uniform(key, 4 * t + 2) * (height - h + 1))
            x = np.int64(_uniform(key, 4 * t + 3) * (width - w + 1))
            return y, x, h, w, np.int64(_uniform(key, 40) < 0.5)
    in_ratio = np.float64(width) / np.float64(height)
    if in_ratio < min(ratio0, ratio1):
        w = width
        h = np.int64(round(w / min(ratio0, ratio1)))
    elif in_ratio > max(ratio0, ratio1):
        h = height
        w = np.int64(round(h * max(ratio0, ratio1)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, np.int64(_uniform(key, 40) < 0.5)


@njit(cache=False)
def _views(seed, epoch, gids, heights, widths, scale0, scale1, ratio0, ratio1):
    out = np.empty((len(gids), 5), np.int64)
    for k in range(len(gids)):
        out[k, 0], out[k, 1], out[k, 2], out[k, 3], out[k, 4] = view(
            seed, epoch, gids[k], heights[k], widths[k], scale0, scale1, ratio0, ratio1)
    return out


def views(seed: int, epoch: int, gids, heights, widths, scale=SCALE, ratio=RATIO) -> np.ndarray:
    """Rows (y, x, h, w, flip) of these samples, one per id: what the train decoder uses."""
    gids = np.asarray(gids, np.int64)
    if not len(gids):
        return np.zeros((0, 5), np.int64)
    return _views(np.int64(seed), np.int64(epoch), gids, np.asarray(heights, np.int64),
                  np.asarray(widths, np.int64), float(scale[0]), float(scale[1]),
                  float(ratio[0]), float(ratio[1]))


def view_terms(names: list[str], rows: np.ndarray) -> np.ndarray:
    """Per sample: the first 8 bytes (little-endian) of sha256 of
    `<shard path>#<index>#<x>,<y>,<w>,<h>,<flip>`, as uint64 (`names[k]` is `<shard path>#<index>`)."""
    return np.frombuffer(b"".join(
        hashlib.sha256(f"{n}#{x},{y},{w},{h},{f}".encode()).digest()[:8]
        for n, (y, x, h, w, f) in zip(names, rows.tolist())), "<u8")


def views_digest(ids, gids, rows: np.ndarray) -> int:
    """Sum mod 2^64 of the view terms of samples `gids` (placement.SampleIds) seen as `rows`."""
    if not len(gids):
        return 0
    return int(view_terms(sample_names(ids, gids), rows).sum(dtype=np.uint64))


# -- the decoder's view of mutable arrays ----------------------------------------------------------
@intrinsic
def _pointer(typingctx, address):
    """An int64 address as a void pointer: numba freezes arrays a compiled function captures, so
    the decoder reads the epoch and the id map through their (fixed) addresses instead."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen


@njit(cache=False)
def int64_array(address, length):
    return carray(_pointer(address), (length,), np.int64)


class ViewState:
    """What the train decoder needs to know at run time: the seed and the epoch in progress, and
    the global id of each sample of the node file. Arrays allocated once, updated in place (the
    compiled decoder holds their addresses; this object keeps them alive)."""

    def __init__(self, seed: int, gid_of_local: np.ndarray):
        self.state = np.array([seed, 0], np.int64)
        self.gid_of_local = np.ascontiguousarray(gid_of_local, np.int64)
        if not len(self.gid_of_local):
            self.gid_of_local = np.zeros(1, np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.state[1] = epoch

    @property
    def addresses(self) -> tuple[int, int, int]:
        """(state address, id map address, id map length) for compiled code (int64_array)."""
        return (self.state.ctypes.data, self.gid_of_local.ctypes.data, len(self.gid_of_local))


@njit(cache=False)
def flip_left_right(image):
    """Mirror an (H, W, C) image in place."""
    w = image.shape[1]
    for r in range(image.shape[0]):
        for c in range(w // 2):
            for k in range(image.shape[2]):
                a = image[r, c, k]
                image[r, c, k] = image[r, w - 1 - c, k]
                image[r, w - 1 - c, k] = a


def sample_names(ids, gids) -> list[str]:
    """`<shard path>#<index in shard>` of each id (placement.SampleIds.name, for many)."""
    gids = np.asarray(gids, np.int64)
    shard = np.searchsorted(ids.offsets, gids, side="right") - 1
    index = gids - ids.offsets[shard]
    return [f"{ids.paths[s]}#{i}" for s, i in zip(shard.tolist(), index.tolist())]
