"""Does the largest training step of a run fit in device memory? Asked before epoch 1.

Progressive resizing reaches max_res only near the end, so a batch too large for the device
would otherwise fail after most of the paid epochs (and then be retried). One synthetic
forward/backward at the run's largest resolution and per-worker batch, holding what the run
also holds then (the loaders' device buffers, SGD's momentum), shows it in the first minute.

Cheap and leaves no trace: the bare model (no DDP collectives, so each rank probes alone), no
optimizer step (the momentum it would create is stood in for by empty tensors of its size),
BatchNorm's buffers copied and put back, gradients put back as they were.
Imports only torch, for `pipeline bench gpu`.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn

from ..errors import UserError

# Set to anything: the probe runs even on CPU and the model's forward raises out-of-memory
# (for the tests: no device here can run out on demand).
OOM_FAULT_ENV = "PIPELINE_INJECT_OOM"
# FFCV keeps batches_ahead + 2 (default 3 + 2) batches of each loader on the device
FFCV_DEVICE_BATCHES = 5


def loader_device_bytes(batch: int, res: int, image_itemsize: int) -> int:
    """Device memory of an FFCV GPU pipeline's buffers: uint8 images after ToDevice plus the
    normalised copy, for every batch FFCV keeps ahead."""
    return FFCV_DEVICE_BATCHES * batch * 3 * res * res * (1 + image_itemsize)


def step_reserve_bytes(batch: int, res: int, image_itemsize: int, *,
                       loader_started_res: int | None = None, ddp_param_bytes: int = 0) -> int:
    """Device bytes a run holds beside its largest training step (`batch` images at `res` in
    the train loader) that are not yet allocated where the probe runs.

    - The train loader's buffers at `res`, less those already allocated: FFCV allocates an
      epoch's buffers when the epoch starts (the trainer starts the first one before the probe,
      at `loader_started_res`) and frees them when it ends, so at `res` only `res`'s exist.
    - Not the validation loader's: its buffers exist only while validating, never beside
      training activations (and the caching allocator reuses them for the next epoch's).
    - DDP's gradient buckets (the parameters' size) only where they are not built yet
      (`ddp_param_bytes`: `bench gpu`, which has no DDP); a run wraps its model before the
      probe, so they are already allocated there.
    """
    need = loader_device_bytes(batch, res, image_itemsize)
    have = loader_device_bytes(batch, loader_started_res, image_itemsize) \
        if loader_started_res else 0
    return max(0, need - have) + ddp_param_bytes


def run_reserve_bytes(trainer, res: int) -> int:
    """step_reserve_bytes for an ImageNetTrainer about to be probed at `res`."""
    itemsize = torch.empty((), dtype=_torch_dtype(trainer.precision.loader_dtype)).element_size()
    started = getattr(trainer, "started", None)
    # the loader's batch is this rank's part of the global batch (more than batch_size with
    # fewer workers than the run may have; trained in micro-batches of batch_size)
    return step_reserve_bytes(trainer.train_reads.count, res, itemsize,
                              loader_started_res=trainer.get_resolution(started[0])
                              if started is not None else None)


def try_step(model: nn.Module, loss_fn, device: torch.device, *, batch: int, res: int,
             num_classes: int, autocast: torch.dtype | None = None,
             image_dtype: torch.dtype = torch.float32, channels_last: bool = False,
             optimizer: torch.optim.Optimizer | None = None, reserve_bytes: int = 0) -> None:
    """One forward/backward of a random batch, as the train loop does it; raises
    torch.OutOfMemoryError when it does not fit. Weights, gradients, BatchNorm statistics and
    optimizer state are as before afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    was_training = model.training
    hook = None
    if os.environ.get(OOM_FAULT_ENV):
        def out_of_memory(module, args):
            raise torch.OutOfMemoryError(f"injected by {OOM_FAULT_ENV}: CUDA out of memory")
        hook = model.register_forward_pre_hook(out_of_memory)
    held = []
    try:
        if reserve_bytes:
            held.append(torch.empty(reserve_bytes, dtype=torch.uint8, device=device))
        if optimizer is not None:   # SGD's momentum buffers, once the first step has made them
            held += [torch.empty_like(p) for group in optimizer.param_groups
                     for p in group["params"] if group.get("momentum")
                     and "momentum_buffer" not in optimizer.state.get(p, {})]
        for p, _ in grads:
            p.grad = None
        images = torch.randn(batch, 3, res, res, device=device).to(image_dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, num_classes, (batch,), device=device)
        model.train()
        cast = nullcontext() if autocast is None else torch.autocast(device.type, dtype=autocast)
        with cast:
            loss = loss_fn(model(images), target)
        loss.backward()
    finally:
        held = images = target = loss = None   # freed before empty_cache
        if hook is not None:
            hook.remove()
        model.train(was_training)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in grads:
            p.grad = g
        if device.type == "cuda":
            torch.cuda.empty_cache()


def device_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device.type} (no device memory figure)"
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} with {props.total_memory / 2**30:.1f} GiB"


def probe_largest_step(model: nn.Module, loss_fn, device: torch.device, *, batch: int, res: int,
                       num_classes: int, autocast: torch.dtype | None = None,
                       image_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                       optimizer: torch.optim.Optimizer | None = None, reserve_bytes: int = 0,
                       reached_at: str = "", on_cpu: bool = False) -> str | None:
    """try_step at the run's largest step: None where there is nothing to probe (CPU, unless
    on_cpu or the fault is injected), a line saying what fits, or a UserError (never retried)
    naming batch, resolution, device memory and what to lower."""
    if device.type != "cuda" and not (on_cpu or os.environ.get(OOM_FAULT_ENV)):
        return None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    oom = None
    try:
        try_step(model, loss_fn, device, batch=batch, res=res, num_classes=num_classes,
                 autocast=autocast, image_dtype=image_dtype, channels_last=channels_last,
                 optimizer=optimizer, reserve_bytes=reserve_bytes)
    except torch.OutOfMemoryError as exc:
        oom = str(exc).splitlines()[0][:120] if str(exc) else "out of memory"
    if oom is not None:
        when = f" (the run reaches {res} px {reached_at})" if reached_at else ""
        raise UserError(f"batch {batch} per worker at {res} px does not fit in {device_memory(device)}"
                        f"{when}: out of memory in a trial step before epoch 1 ({oom}); lower "
                        f"--batch-size (e.g. {max(1, batch // 2)}) or --max-res, or use GPUs with "
                        "more memory")
    if device.type != "cuda":
        return f"batch {batch} at {res} px: probed"
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    return f"batch {batch} at {res} px fits ({peak:.1f} GiB peak of {device_memory(device)})"


def check_largest_step(trainer) -> str | None:
    """probe_largest_step for an ImageNetTrainer: its largest resolution, its per-worker batch,
    and the device memory its loaders and optimizer will hold by then."""
    from .trainer import largest_micro_batch

    r = trainer.recipe
    epoch, res = max(((e, trainer.get_resolution(e)) for e in range(r.epochs)),
                     key=lambda p: (p[1], -p[0]))
    reserve = run_reserve_bytes(trainer, res) if trainer.device.type == "cuda" else 0
    return probe_largest_step(
        trainer.bare_model, trainer.loss, trainer.device, res=res,
        batch=largest_micro_batch(trainer.train_reads.count, r.batch_size),
        num_classes=len(trainer.classes), autocast=trainer.precision.autocast,
        image_dtype=_torch_dtype(trainer.precision.loader_dtype),
        channels_last=trainer.device.type == "cuda" and r.channels_last,
        optimizer=trainer.optimizer, reserve_bytes=reserve, reached_at=f"at epoch {epoch + 1}")


def _torch_dtype(numpy_dtype) -> torch.dtype:
    import numpy as np

    return torch.from_numpy(np.zeros(1, dtype=numpy_dtype)).dtype
