"""The memory probe before epoch 1: an out-of-memory step ends the run in words, and a probe
that fits leaves no trace (weights, BatchNorm statistics, optimizer state, gradients)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.training.model import build_model, param_groups
from pipeline.training.probe import (
    OOM_FAULT_ENV,
    loader_device_bytes,
    probe_largest_step,
    try_step,
)

CPU = torch.device("cpu")


def _state(model, optimizer):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def _same(a, b):
    weights_a, opt_a, grads_a = a
    weights_b, opt_b, grads_b = b
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:   # running_mean/var and num_batches_tracked included
        assert torch.equal(weights_a[k], weights_b[k]), k
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        for name in opt_a[k]:
            assert torch.equal(opt_a[k][name], opt_b[k][name])
    assert [g is None for g in grads_a] == [g is None for g in grads_b]
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b) if x is not None)


@pytest.mark.parametrize("after_a_step", [False, True])
def test_a_probe_that_fits_leaves_no_trace(after_a_step):
    torch.manual_seed(0)
    model = build_model("resnet18", 5, blurpool=True)
    opt = torch.optim.SGD(param_groups(model, 5e-5), lr=0.1, momentum=0.9)
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    if after_a_step:   # momentum buffers exist, gradients are held
        model.train()
        loss(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    model.eval()
    before = _state(model, opt)
    line = probe_largest_step(model, loss, CPU, batch=4, res=48, num_classes=5, optimizer=opt,
                              reserve_bytes=1024, on_cpu=True)
    assert line == "batch 4 at 48 px: probed"
    _same(before, _state(model, opt))
    assert not model.training   # its mode as it was


class OutOfMemory(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        self.bn(x)   # BN statistics move before the failure...
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_is_one_line_naming_batch_resolution_memory_and_what_to_lower():
    model = OutOfMemory()
    before = model.bn.running_mean.clone()
    with pytest.raises(UserError) as err:
        probe_largest_step(model, nn.CrossEntropyLoss(), CPU, batch=512, res=192,
                           num_classes=1000, reserve_bytes=0, reached_at="at epoch 13",
                           on_cpu=True)
    line = str(err.value)
    assert "\n" not in line
    for words in ("batch 512", "192 px", "at epoch 13", "cpu", "--batch-size (e.g. 256)",
                  "--max-res", "before epoch 1"):
        assert words in line, words
    assert torch.equal(model.bn.running_mean, before)   # ...and are put back


def test_skipped_on_cpu_unless_asked_and_the_env_injects_an_oom(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    assert probe_largest_step(model, nn.CrossEntropyLoss(), CPU, batch=2, res=8,
                              num_classes=2) is None
    monkeypatch.setenv(OOM_FAULT_ENV, "1")
    with pytest.raises(UserError, match="batch 2 per worker at 8 px does not fit"):
        probe_largest_step(model, nn.CrossEntropyLoss(), CPU, batch=2, res=8, num_classes=2)
    monkeypatch.delenv(OOM_FAULT_ENV)
    model(torch.zeros(1, 3, 8, 8))   # the injecting hook is gone


def test_try_step_raises_the_oom_itself():
    with pytest.raises(torch.OutOfMemoryError):
        try_step(OutOfMemory(), nn.CrossEntropyLoss(), CPU, batch=1, res=4, num_classes=2)


def test_loader_device_buffers():
    # five batches ahead, uint8 after ToDevice + fp16 normalised: 512 x 192 px ~ 0.79 GiB
    assert loader_device_bytes(512, 192, 2) == 5 * 512 * 3 * 192 * 192 * 3
    assert loader_device_bytes(256, 256, 4) == 5 * 256 * 3 * 256 * 256 * 5


def test_a_run_probes_its_largest_resolution_and_its_batch(monkeypatch):
    """check_largest_step reads the trainer's recipe: ResNet-50's 512 at 192 px, first reached
    at epoch 13 of the recipe's 16 (the ramp 160 -> 192 from epoch 11 to 13)."""
    from types import SimpleNamespace

    from pipeline.config import Recipe
    from pipeline.training.precision import choose_precision
    from pipeline.training.probe import check_largest_step
    from pipeline.training.trainer import resolution_at

    recipe = Recipe()
    model = OutOfMemory()
    trainer = SimpleNamespace(
        recipe=recipe, get_resolution=lambda e: resolution_at(recipe, e),
        precision=choose_precision("auto", "cpu"), device=CPU, model=model, bare_model=model,
        loss=nn.CrossEntropyLoss(), optimizer=None, classes=[{}] * 1000,
        train_reads=SimpleNamespace(count=512))
    assert check_largest_step(trainer) is None   # CPU: nothing to probe
    monkeypatch.setenv(OOM_FAULT_ENV, "1")
    with pytest.raises(UserError, match=r"batch 512 per worker at 192 px does not fit in cpu .* "
                                        r"\(the run reaches 192 px at epoch 13\)"):
        check_largest_step(trainer)


def test_the_probe_reserves_only_what_is_not_allocated_yet():
    """ResNet-50's recipe, 512 per worker, fp16 images: the train loader has started its first
    epoch at 160 px (its buffers allocated), the probe asks about 192 px: it reserves only the
    difference; no validation buffers (never alive beside training activations); no DDP buckets
    (already built by the wrapped model). The old accounting held ~1.35 GiB more."""
    from pipeline.training.probe import step_reserve_bytes

    at_160, at_192 = loader_device_bytes(512, 160, 2), loader_device_bytes(512, 192, 2)
    assert step_reserve_bytes(512, 192, 2, loader_started_res=160) == at_192 - at_160
    assert step_reserve_bytes(512, 192, 2, loader_started_res=192) == 0
    assert step_reserve_bytes(512, 192, 2) == at_192   # no epoch started yet
    assert step_reserve_bytes(512, 192, 2, ddp_param_bytes=100) == at_192 + 100
    old = at_192 + loader_device_bytes(256, 256, 2) + 25_557_032 * 4
    assert (old - (at_192 - at_160)) / 2**30 == pytest.approx(1.35, abs=0.02)


def test_a_run_reserves_from_its_started_epoch_and_bench_gpu_holds_the_same_total():
    """What the run has allocated plus what its probe reserves equals what `bench gpu` reserves
    on a bare device: a batch the bench says fits is accepted by the run."""
    from types import SimpleNamespace

    from pipeline.bench.gpu import bench_reserve_bytes
    from pipeline.config import Recipe
    from pipeline.training.precision import Precision
    from pipeline.training.probe import run_reserve_bytes
    from pipeline.training.trainer import resolution_at

    import numpy as np

    recipe = Recipe()
    model = build_model("resnet18", 10)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    bf16 = Precision(torch.bfloat16, np.float16, False, "")
    trainer = SimpleNamespace(recipe=recipe, get_resolution=lambda e: resolution_at(recipe, e),
                              precision=bf16, train_reads=SimpleNamespace(count=512),
                              started=(0, None, None), bare_model=model)
    reserve = run_reserve_bytes(trainer, 192)
    allocated = loader_device_bytes(512, 160, 2) + params   # epoch 0's buffers, DDP's buckets
    assert reserve == loader_device_bytes(512, 192, 2) - loader_device_bytes(512, 160, 2)
    assert allocated + reserve == bench_reserve_bytes(trainer, 512, 192)
    trainer.started = None   # a resumed run whose first epoch has not started: all of it
    assert run_reserve_bytes(trainer, 192) == loader_device_bytes(512, 192, 2)
