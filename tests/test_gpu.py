"""The CUDA path (bf16 autocast, channels-last, cudnn.benchmark, FFCV ToDevice): runs only where
CUDA exists, skipped elsewhere, never faked. A GPU machine may have torch only: the memory probe
test needs nothing else; the others skip, saying which package they need (FFCV for the loader
tests; torchvision, pydantic and yaml for `pipeline bench gpu`). The GPU-only branches that run
without CUDA are also run on the meta device in tests/fast/test_device_loaders.py."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _needs(*modules: str) -> None:
    for name in modules:
        pytest.importorskip(name, reason=f"needs {name} (not installed on this GPU machine)")


def _ffcv_beton(tmp_path, n: int) -> None:
    _needs("ffcv", "torchvision", "pydantic", "yaml")
    from pipeline.config import WriterSettings
    from pipeline.data.shards import write_beton

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (300, 400, 3), dtype=np.uint8) for _ in range(n)]
    labels = [i % 10 for i in range(n)]
    for split in ("train", "val"):
        write_beton(tmp_path / f"{split}.beton", images, labels, WriterSettings(), seed=0)


def _has_bf16() -> bool:
    return torch.cuda.get_device_capability(0)[0] >= 8


def test_resnet50_bf16_channels_last_steps_on_gpu(tmp_path):
    _needs("ffcv", "torchvision", "pydantic", "yaml")
    if not _has_bf16():
        pytest.skip("bf16 needs compute capability 8.0+")
    from pipeline.config import TrainConfig, WriterSettings
    from pipeline.data.shards import write_beton
    from pipeline.training.trainer import ImageNetTrainer

    rng = np.random.default_rng(0)
    n = 512
    images = [rng.integers(0, 255, (300, 400, 3), dtype=np.uint8) for _ in range(n)]
    labels = [i % 10 for i in range(n)]
    for split in ("train", "val"):
        write_beton(tmp_path / f"{split}.beton", images, labels, WriterSettings(), seed=0)
    classes = [{"index": i, "wnid": f"n{i:08d}", "name": str(i)} for i in range(10)]
    cfg = TrainConfig(arch="resnet50", batch_size=64, epochs=2, min_res=160, max_res=160,
                      start_ramp=0, end_ramp=0, val_res=160, precision="bf16", cpus_per_worker=4)
    device = torch.device("cuda", 0)
    torch.backends.cudnn.benchmark = True
    from pipeline.data.loaders import Reads

    batch = cfg.recipe.batch_size
    trainer = ImageNetTrainer(cfg, Reads.whole_file(tmp_path / "train.beton", batch_size=batch),
                              Reads.whole_file(tmp_path / "val.beton", batch_size=batch), classes,
                              rank=0, world=1,
                              device=device,
                              wrap_model=lambda m: m.to(device))
    assert trainer.autocast_dtype == torch.bfloat16
    assert trainer.bare_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.train_loop(0)                      # warm-up: FFCV compile, cudnn autotune
    torch.cuda.synchronize()
    start = time.perf_counter()
    stats = trainer.train_loop(1)
    torch.cuda.synchronize()
    rate = stats["steps"] * cfg.recipe.batch_size / (time.perf_counter() - start)
    print(f"ResNet-50 bf16 channels-last 160 px: {rate:.0f} images/s on {torch.cuda.get_device_name(0)}")
    assert np.isfinite(stats["train_loss"]) and stats["steps"] == n // cfg.recipe.batch_size
    val = trainer.val_loop()
    assert val["val_images"] == n


@pytest.mark.parametrize("precision", ["fp32", "fp16", "auto"])
def test_every_precision_trains_and_validates_through_the_gpu_loader(tmp_path, precision):
    """--precision fp32 fed the GPU loader's fp16 images to float weights at step 0 ("Input
    type (c10::Half) and bias type (float) should be the same"); validation too."""
    _ffcv_beton(tmp_path, 64)
    from pipeline.config import TrainConfig
    from pipeline.data.loaders import Reads
    from pipeline.training.trainer import ImageNetTrainer

    cfg = TrainConfig(arch="resnet18", batch_size=16, epochs=1, min_res=64, max_res=64,
                      start_ramp=0, end_ramp=0, val_res=64, precision=precision)
    device = torch.device("cuda", 0)
    classes = [{"index": i, "wnid": f"n{i:08d}", "name": str(i)} for i in range(10)]
    trainer = ImageNetTrainer(cfg, Reads.whole_file(tmp_path / "train.beton", batch_size=16),
                              Reads.whole_file(tmp_path / "val.beton", batch_size=16), classes,
                              rank=0, world=1, device=device, wrap_model=lambda m: m.to(device))
    from pipeline.training.probe import check_largest_step

    assert check_largest_step(trainer).startswith("batch 16 at 64 px fits")
    stats = trainer.train_loop(0)
    assert np.isfinite(stats["train_loss"])
    assert trainer.val_loop()["val_images"] == 64


def test_the_probe_meets_a_real_out_of_memory_under_a_memory_cap():
    """A memory cap makes the device run out for real: the probe says so in words, and a batch
    that fits is probed without a trace. Torch only: a small full-resolution conv net (its
    activations at 512 x 192 px take several GiB), in the precision a run picks on this GPU
    (bf16 autocast with half images, or fp32 with float32 images before compute capability 8.0:
    never half images into float weights)."""
    from torch import nn

    from pipeline.errors import UserError
    from pipeline.training.precision import device_precision
    from pipeline.training.probe import _torch_dtype, probe_largest_step

    device = torch.device("cuda", 0)
    precision = device_precision("auto", device)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1000))
    model = model.to(device, memory_format=torch.channels_last)
    loss = torch.nn.CrossEntropyLoss()
    step = {"num_classes": 1000, "autocast": precision.autocast, "channels_last": True,
            "image_dtype": _torch_dtype(precision.loader_dtype)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(3 * 2**30 / total, device)   # 3 GiB
    try:
        with pytest.raises(UserError, match=r"batch 512 per worker at 192 px does not fit"):
            probe_largest_step(model, loss, device, batch=512, res=192, **step)
        line = probe_largest_step(model, loss, device, batch=8, res=192, **step)
        assert line.startswith("batch 8 at 192 px fits")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bench_gpu_measures_the_recipe():
    _needs("torchvision", "pydantic", "yaml")
    import argparse

    from pipeline.bench.gpu import add_arguments, measure

    p = argparse.ArgumentParser()
    add_arguments(p)
    out = measure(torch.device("cuda", 0),
                  p.parse_args(["--steps", "3", "--warmup", "2", "--max-batch", "1024"]))
    print(json.dumps(out))
    assert [r["res"] for r in out["rows"]] == [160, 192]
    assert all(r["images_per_s"] > 0 for r in out["rows"])
    assert out["one_step"]["fp32"].startswith("ok") and out["one_step"]["fp16"].startswith("ok")
    assert out["one_step"]["bf16"].startswith("ok" if _has_bf16() else "refused")
    assert out["largest_batch"]["batch"] >= 64
