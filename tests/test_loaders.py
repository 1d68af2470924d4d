"""The partial, reduced-scale JPEG decoder gives what FFCV's full-scale decoder gives."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import WriterSettings
from pipeline.data.shards import write_beton

pytestmark = pytest.mark.slow   # numba compiles FFCV pipelines


def _decode_all(path, decoder):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(path), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [decoder, ToTensor()],
                                                "label": [IntDecoder(), ToTensor()]})
    return np.concatenate([x.numpy().copy() for x, _ in loader]).astype(np.float32)


def test_scaled_decode_matches_full_decode(tmp_path):
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder

    from pipeline.data.loaders import scaled_crop_decoder
    from pipeline.data.views import view

    yy, xx = np.mgrid[0:600, 0:800].astype(np.float32)
    images = [np.stack([xx / 800 * 255, yy / 600 * 255, np.full_like(xx, 40.0 * k)], -1)
              .astype(np.uint8) for k in range(6)]
    path = tmp_path / "big.beton"
    # every image stored as JPEG, 800x600: a 64 px output lets libjpeg-turbo decode at 1/8
    write_beton(path, images, list(range(6)),
                WriterSettings(max_resolution=800, compress_probability=1.0), seed=0)
    whole = dict(scale=(1.0, 1.0), ratio=(800 / 600, 800 / 600))   # the crop is the image
    ours = scaled_crop_decoder((64, 64))
    ours.scale, ours.ratio = whole["scale"], whole["ratio"]
    reference = RandomResizedCropRGBImageDecoder((64, 64), **whole)
    a, b = _decode_all(path, ours), _decode_all(path, reference)
    assert a.shape == b.shape == (6, 64, 64, 3)
    # ours also flips, each sample as its view says (seed 0, epoch 0, ids = file positions)
    flips = [view(0, 0, k, 600, 800, 1.0, 1.0, 800 / 600, 800 / 600)[4] for k in range(6)]
    assert 0 < sum(flips) < 6, flips   # both kinds of sample are compared
    b = np.stack([img[:, ::-1] if f else img for img, f in zip(b, flips)])
    assert np.abs(a - b).mean() < 2.0 and np.abs(a - b).max() < 24


def test_partial_decode_gives_the_crop_of_a_full_decode():
    import cv2
    from ffcv.libffcv import imdecode

    from pipeline.data.jpeg_crop import AVAILABLE, crop_decode

    assert AVAILABLE, "pipeline/_jpeg_crop was not built: reinstall with `make install`"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:333, 0:479].astype(np.float32)
    image = np.stack([xx / 479 * 255, yy / 333 * 255, rng.uniform(0, 255, xx.shape)], -1)
    blob = cv2.imencode(".jpg", image.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].ravel()
    full = np.empty(333 * 479 * 3, np.uint8)
    assert imdecode(blob, full, 333, 479, 333, 479, 0, 0, 1, 1, False, False) == 0
    full = full.reshape(333, 479, 3).astype(np.float32)
    out, dims = np.empty(333 * 479 * 3, np.uint8), np.zeros(4, np.int64)
    for y, x, h, w in [(0, 0, 333, 479), (37, 53, 100, 61), (200, 400, 133, 79), (5, 17, 24, 24)]:
        assert crop_decode(blob, out, y, x, h, w, 1, dims) == 0
        rows, row_w, left, cols = dims
        part = out[:rows * row_w * 3].reshape(rows, row_w, 3)[:, left:left + cols]
        assert part.shape == (h, w, 3)
        diff = np.abs(part - full[y:y + h, x:x + w])
        assert diff.mean() < 2.0 and diff.max() < 24, (y, x, h, w, diff.mean(), diff.max())
    # at 1/2 scale: the crop of the whole image decoded at 1/2 scale (240 x 167)
    half = np.empty(167 * 240 * 3, np.uint8)
    assert imdecode(blob, half, 333, 479, 333, 479, 0, 0, 1, 2, False, False) == 0
    half = half.reshape(167, 240, 3).astype(np.float32)[50:150, 100:220]
    assert crop_decode(blob, out, 100, 200, 200, 240, 2, dims) == 0
    rows, row_w, left, cols = dims
    assert (rows, cols) == (100, 120)
    part = out[:rows * row_w * 3].reshape(rows, row_w, 3)[:, left:left + cols]
    diff = np.abs(part - half)
    assert diff.mean() < 2.0 and diff.max() < 24
    # A damaged JPEG is never an exit of the process. One cut short after its header decodes
    # what it holds and the rest grey (libjpeg ends it there with a warning, not an error); one
    # whose header is cut, or no JPEG at all, is an error for the caller (which then decodes the
    # whole image its own way).
    cut = blob[:len(blob) // 3].copy()
    assert crop_decode(cut, out, 0, 0, 333, 479, 1, dims) == 0
    rows, row_w, left, cols = dims
    part = out[:rows * row_w * 3].reshape(rows, row_w, 3)[:, left:left + cols].astype(np.float32)
    assert (rows, cols) == (333, 479)
    assert np.abs(part[:40] - full[:40]).mean() < 2.0   # the rows it holds
    assert (part[-40:] == 128).all()                    # the rows it lost
    assert crop_decode(blob[:300].copy(), out, 0, 0, 333, 479, 1, dims) == -1
    assert crop_decode(np.zeros(100, np.uint8), out, 0, 0, 10, 10, 1, dims) == -1


def test_stream_mode_reads_every_sample_once_through_the_process_cache(tmp_path):
    """read_mode stream: FFCV's process cache (no page cache) and a page-ordered shuffle."""
    import torch

    from pipeline.data.loaders import Reads, TrainLoader

    rng = np.random.default_rng(1)
    n = 96
    images = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(n)]
    path = tmp_path / "ids.beton"
    write_beton(path, images, list(range(n)), WriterSettings(max_resolution=64), seed=0)
    seen = []
    for part in (0, 1):
        reads = Reads.whole_file(str(path), part, 2, batch_size=8, stream=True)
        loader = TrainLoader(reads, batch_size=8, res=32, threads=1, seed=3,
                             device=torch.device("cpu"))
        order = reads.local[reads.epoch(0, seed=3).gids]
        epoch = [int(y) for _, labels in loader.epoch(0, 32, order) for y in labels.tolist()]
        assert len(epoch) == n // 2
        seen += epoch
    assert sorted(seen) == list(range(n))   # both parts together: each sample once


def test_crops_and_flips_are_the_same_whatever_the_process_threads_rank_or_world(tmp_path):
    """Each sample's pixels are a pure function of (seed, epoch, sample id): two processes with
    other thread counts and world sizes decode the same images, and they are the crop and flip
    its views row says (raw samples: exactly cv2's INTER_AREA resize of that rectangle)."""
    import subprocess
    import sys
    from pathlib import Path

    import cv2

    rng = np.random.default_rng(4)
    n = 48
    images = [rng.integers(0, 255, (int(rng.integers(20, 64)), int(rng.integers(20, 64)), 3),
                           dtype=np.uint8) for _ in range(n)]
    kinds = (("raw", 0.0), ("jpg", 1.0))
    for kind, jpeg in kinds:
        write_beton(tmp_path / f"{kind}.beton", images, list(range(n)),
                    WriterSettings(max_resolution=64, compress_probability=jpeg), seed=0)
    configs = [(1, 0, 1, 2), (2, 0, 2, 2), (2, 1, 2, 2), (1, 0, 1, 3)]
    for config in configs:   # a process per config, reading both files
        subprocess.run([sys.executable, str(Path(__file__).parent / "loader_pixels.py"),
                        ",".join(str(tmp_path / f"{kind}.beton") for kind, _ in kinds),
                        *map(str, config),
                        ",".join(str(tmp_path / f"{kind}-{'-'.join(map(str, config))}.npz")
                                 for kind, _ in kinds)], check=True, timeout=600)
    for kind, _ in kinds:
        runs = {}
        for config in configs:
            got = np.load(tmp_path / f"{kind}-{'-'.join(map(str, config))}.npz")
            runs[config] = {
                int(g): (im, v) for g, im, v in zip(got["gids"], got["images"], got["views"])}
        alone = runs[1, 0, 1, 2]
        shared = {**runs[2, 0, 2, 2], **runs[2, 1, 2, 2]}
        common = set(alone) & set(shared)
        assert len(common) >= n - 8
        for g in common:
            assert np.array_equal(alone[g][1], shared[g][1]), g
            assert np.array_equal(alone[g][0], shared[g][0]), (kind, g)
        later = runs[1, 0, 1, 3]
        assert sum(not np.array_equal(alone[g][1], later[g][1])
                   for g in set(alone) & set(later)) > len(common) // 2   # a new view each epoch
        flips = [int(v[4]) for _, v in alone.values()]
        assert 0 < sum(flips) < len(flips)
        if kind == "raw":
            for g, (pixels, (y, x, h, w, flip)) in alone.items():
                want = cv2.resize(images[g][y:y + h, x:x + w], (24, 24),
                                  interpolation=cv2.INTER_AREA)
                want = want[:, ::-1] if flip else want
                assert np.abs(pixels.astype(int) - want).max() <= 1, g
