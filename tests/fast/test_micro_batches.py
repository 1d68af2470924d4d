"""A worker that takes a larger part of the global batch (fewer workers than the run's most)
trains it in micro-batches of at most batch_size; the step must be the one the whole batch
would give, or the lr schedule, kept for the global batch, means something else after a
preemption."""
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.training.trainer import ImageNetTrainer


def _trainer(batch_size: int, global_batch: int, world: int = 1) -> ImageNetTrainer:
    """train_step's own state, without loaders: a model with no BatchNorm (whose statistics
    differ per micro-batch by design), so only the gradient's weighting decides the step."""
    t = ImageNetTrainer.__new__(ImageNetTrainer)
    t.recipe = TrainConfig(batch_size=batch_size, precision="fp32").recipe
    t.device, t.world, t.global_batch = torch.device("cpu"), world, global_batch
    torch.manual_seed(0)
    t.model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    t.optimizer = torch.optim.SGD(t.model.parameters(), lr=0.0, momentum=0.9)
    t.loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    t.autocast_dtype, t.scaler = None, torch.amp.GradScaler("cpu", enabled=False)
    t._autocast = nullcontext
    return t


def _step(t: ImageNetTrainer, x, y):
    total = t.train_step(x, y, lr=0.5)
    return [p.detach().clone() for p in t.model.parameters()], float(total)


@pytest.mark.parametrize("n,size", [(8, 2), (8, 3), (7, 2), (8, 1)])
def test_micro_batches_give_the_step_of_the_whole_batch(n, size):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    whole, whole_loss = _step(_trainer(batch_size=n, global_batch=n), x, y)
    parts, parts_loss = _step(_trainer(batch_size=size, global_batch=n), x, y)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert parts_loss == pytest.approx(whole_loss, rel=1e-5)   # the sum over the images


def test_a_rank_s_part_is_weighted_for_the_mean_over_the_global_batch():
    """With two ranks DDP averages their gradients: each rank's must be its part's sum over the
    global batch times the world, so that the mean is the global batch's mean."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    t = _trainer(batch_size=2, global_batch=8, world=2)
    t.optimizer.zero_grad()
    t.train_step(x[:4], y[:4], lr=0.0)   # lr 0: the gradient stays to be read
    first = [p.grad.clone() for p in t.model.parameters()]
    t.train_step(x[4:], y[4:], lr=0.0)
    second = [p.grad.clone() for p in t.model.parameters()]
    ref = _trainer(batch_size=8, global_batch=8)
    ref.train_step(x, y, lr=0.0)
    for a, b, r in zip(first, second, ref.model.parameters()):
        torch.testing.assert_close((a + b) / 2, r.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,size,sizes", [
    (260, 256, [260]),                # 64 -> 63 workers at 256: one batch, not 256 + 4
    (384, 256, [192, 192]),           # half a batch over: two of 192
    (383, 256, [383]),
    (512, 256, [256, 256]), (256, 256, [256]), (3, 256, [3]),   # a whole part smaller than size
    (1032, 256, [258, 258, 258, 258]),
])
def test_no_micro_batch_is_smaller_than_half_the_batch(n, size, sizes):
    from pipeline.training.trainer import micro_batches

    parts = micro_batches(n, size)
    assert [b - a for a, b in parts] == sizes
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a == prev for (a, _), (_, prev) in zip(parts[1:], parts))


def test_at_every_scale_micro_batches_stay_between_half_and_one_and_a_half_batches():
    """1,024 nodes of 8 ranks down to 1: each rank's part of 256 x 8,192."""
    from pipeline.training.trainer import micro_batches

    size, global_batch = 256, 256 * 8192
    for world in range(1, 8193, 7):
        n = global_batch // world + 1
        sizes = [b - a for a, b in micro_batches(n, size)]
        assert sum(sizes) == n and min(sizes) >= size // 2 and max(sizes) <= size * 3 // 2 + 1
