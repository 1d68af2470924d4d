"""The CUDA path (bf16 autocast, channels-last, cudnn.benchmark, FFCV ToDevice): runs only where
CUDA exists, skipped elsewhere, never faked."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_resnet50_bf16_channels_last_steps_on_gpu(tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.config import WriterSettings
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
