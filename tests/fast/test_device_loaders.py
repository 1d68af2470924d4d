"""The GPU loaders' tails, built and run without a GPU: on torch's `meta` device every
operation after ToDevice runs as it would on CUDA (shapes, dtypes, allocations), and nothing on
that path may import what the install does not provide (FFCV's GPU NormalizeImage imports cupy)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from pipeline.config import WriterSettings  # noqa: E402
from pipeline.data import loaders  # noqa: E402
from pipeline.data.loaders import (IMAGENET_MEAN, IMAGENET_STD, Reads, TrainLoader,  # noqa: E402
                                   normalize_into, val_loader)
from pipeline.data.shards import write_beton  # noqa: E402

META = torch.device("meta")


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    path = tmp_path_factory.mktemp("beton") / "tiny.beton"
    rng = np.random.default_rng(0)
    write_beton(path, [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(8)],
                list(range(8)), WriterSettings(), seed=0)
    return str(path)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_loader_builds_and_yields_for_a_device_without_cupy(beton, dtype, monkeypatch):
    """dtype: the loader dtypes of every precision (precision.py: fp32 float32; bf16, fp16 half)."""
    monkeypatch.setitem(__import__("sys").modules, "cupy", None)   # as on a fresh install
    reads = Reads.whole_file(beton, batch_size=4)
    train = TrainLoader(reads, 4, 32, 1, 0, META, dtype)
    images, target = next(iter(train.epoch(0, 32, np.arange(8))))
    want = torch.from_numpy(np.zeros(1, dtype)).dtype
    assert images.device == META and images.dtype == want and images.shape == (4, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert target.device == META and target.shape == (4,)
    images, target = next(iter(val_loader(reads, 4, 32, 1, META, dtype)))
    assert images.device == META and images.dtype == want and images.shape == (4, 3, 32, 32)
    assert target.device == META and target.shape == (4,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_device_normalisation_matches_the_recipe_s(dtype):
    images = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    result = torch.empty(4, 5, 6, 3, dtype=dtype)
    scale = torch.from_numpy(1 / IMAGENET_STD).view(1, 3, 1, 1)
    shift = torch.from_numpy(-IMAGENET_MEAN / IMAGENET_STD).view(1, 3, 1, 1)
    out = normalize_into(images, result, scale, shift)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (images.double() - mean) / std
    assert out.dtype == dtype and out.data_ptr() == result.data_ptr()
    assert out.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-6 if dtype == torch.float32 else 2e-3   # fp16 holds 11 significant bits
    assert (out.double() - expected).abs().max().item() < tol


def test_the_loader_thread_takes_its_device_before_any_batch(beton, monkeypatch):
    """FFCV's loader thread must set its current CUDA device before it touches CUDA (else a
    context on GPU 0 per worker): the device is set in that thread, before its first batch."""
    calls = []
    real = loaders.set_thread_device

    def recording(device):
        calls.append((threading.get_ident(), device))
        real(device)
    monkeypatch.setattr(loaders, "set_thread_device", recording)
    reads = Reads.whole_file(beton, batch_size=4)
    train = TrainLoader(reads, 4, 32, 1, 0, META, np.float16)
    batches = train.epoch(0, 32, np.arange(8))
    next(iter(batches))
    assert calls and calls[0] == (batches.ident, META)
