"""Validation: the sums stay on the device (one sync per loop, however many batches) and the
flip average is taken in fp32, not in the autocast dtype."""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.training.trainer import ImageNetTrainer


class FirstRow(nn.Module):
    """Logits = the first image row of channel 0, in bf16 (as a bf16 autocast model gives):
    the flipped image gives that row reversed."""

    def forward(self, x):
        return x[:, 0, 0, :].to(torch.bfloat16)


def _trainer(batches, tta=True) -> ImageNetTrainer:
    t = ImageNetTrainer.__new__(ImageNetTrainer)
    t.recipe = TrainConfig(precision="fp32", lr_tta=tta).recipe
    t.device, t.world = torch.device("cpu"), 1
    t.model = FirstRow()
    t.loss = nn.CrossEntropyLoss()
    t.autocast_dtype, t._autocast = None, nullcontext
    t.val_loader = batches
    return t


def _batch(rows):
    rows = torch.tensor(rows, dtype=torch.float32)
    images = torch.zeros(len(rows), 3, 2, rows.shape[1])
    images[:, 0, 0, :] = rows
    return images, torch.zeros(len(rows), dtype=torch.long)


def test_the_flip_average_is_summed_in_fp32():
    # 256 and 1 + 2**-7 are exact in bf16, their sum is not (bf16 spacing at 256 is 2): the
    # outer logits average to 128.5 in fp32, 128 in bf16, beside the middle one's 128
    images, target = _batch([[256.0, 128.0, 1 + 2**-7]])
    got = _trainer([(images, target)]).val_loop()
    logits = torch.tensor([[256.0, 128.0, 1 + 2**-7]])
    average = (logits + logits.flip(1)) / 2
    want = nn.functional.cross_entropy(average, target).item()
    assert got["val_loss"] == pytest.approx(want, rel=1e-6)
    assert got["val_images"] == 1


@pytest.mark.parametrize("n_batches", [1, 5])
def test_validation_syncs_once_however_many_batches(n_batches, monkeypatch):
    """On CPU nothing waits, but the calls that would wait on a GPU can be counted: .item(),
    .tolist() and .cpu() read device memory back to the host."""
    batches = [_batch([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]) for _ in range(n_batches)]
    t = _trainer(batches, tta=False)
    reads = []
    for name in ("item", "tolist", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    got = t.val_loop()
    monkeypatch.undo()
    assert reads == ["cpu", "tolist"]
    assert got["val_images"] == 2 * n_batches and got["val_top1"] == 0.5
    assert got["val_top5"] == 1.0
