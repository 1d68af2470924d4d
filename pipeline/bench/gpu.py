"""`pipeline bench gpu`: what one GPU does with the recipe, on synthetic batches on the device.

Needs torch and torchvision only (and this package's light dependencies: numpy, pydantic,
pyyaml): no ffcv, no Ray, no services, so it runs on a machine that has just been handed a GPU.
The model, the precision choice, the optimizer, the lr schedule and the training step are the
training run's own (ImageNetTrainer without its loaders); the memory search is the run's own
probe (training/probe.py), holding the train loader's device buffers and DDP's buckets as a run
does.

Prints: img/s per GPU for the arch at each resolution (the precision `auto` picks,
channels-last); one step in every precision (fp32, bf16, fp16); the largest per-worker batch
that fits at the largest resolution. Without CUDA it says so in one line and exits 0.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from types import SimpleNamespace

from ..console import say

PRECISIONS = ("fp32", "bf16", "fp16")


def add_arguments(p) -> None:
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--res", type=int, nargs="+", default=[160, 192],
                   help="training resolutions to time (the recipe's min_res and max_res)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="per-GPU batch to time (default: the recipe's, or the largest that fits)")
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS])
    p.add_argument("--steps", type=int, default=30, help="timed steps per resolution")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (cudnn autotune)")
    p.add_argument("--max-batch", type=int, default=2048, help="upper bound of the batch search")
    p.add_argument("--classes", type=int, default=1000)


def synthetic_trainer(device, *, num_classes: int = 1000, **settings):
    """An ImageNetTrainer whose loaders are left out: the model (BlurPool, channels-last), the
    precision, SGD with the recipe's parameter groups and the schedule as a run builds them."""
    from ..config import TrainConfig
    from ..training.trainer import ImageNetTrainer

    class Synthetic(ImageNetTrainer):
        def create_train_loader(self, reads):
            return None

        def create_val_loader(self, reads):
            return None

    cfg = TrainConfig(**settings)
    one_rank = SimpleNamespace(layout=SimpleNamespace(global_batch=cfg.recipe.batch_size),
                               count=cfg.recipe.batch_size)
    return Synthetic(cfg, one_rank, None, [{"index": i} for i in range(num_classes)], rank=0,
                     world=1, device=device, wrap_model=lambda m: m.to(device))


def synthetic_batch(trainer, batch: int, res: int):
    import torch

    from ..training.probe import _torch_dtype

    images = torch.randn(batch, 3, res, res, device=trainer.device)
    target = torch.randint(0, len(trainer.classes), (batch,), device=trainer.device)
    return images.to(_torch_dtype(trainer.precision.loader_dtype)), target


def images_per_second(trainer, res: int, steps: int, warmup: int) -> float:
    """Training steps of the recipe's batch at `res` (the lr of the epoch that reaches it)."""
    import torch

    images, target = synthetic_batch(trainer, trainer.recipe.batch_size, res)
    epoch = next((e for e in range(trainer.recipe.epochs) if trainer.get_resolution(e) == res), 0)
    lr = trainer.get_lr(epoch)
    trainer.model.train()
    for _ in range(warmup):
        trainer.train_step(images, target, lr)
    _sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step(images, target, lr)
    _sync(trainer.device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss).item():
        raise RuntimeError(f"loss is {loss.item()} at {res} px")
    return steps * len(target) / seconds


def one_step(device, setting: str, arch: str, res: int, batch: int) -> str:
    """One training step in precision `setting`: 'ok ...', or the line that refuses it."""
    from ..errors import UserError

    try:
        trainer = synthetic_trainer(device, arch=arch, batch_size=batch, precision=setting)
    except UserError as exc:
        return f"refused: {exc}"
    images, target = synthetic_batch(trainer, batch, res)
    start = time.perf_counter()
    loss = trainer.train_step(images, target, trainer.get_lr(1)) / batch
    _sync(device)
    return (f"ok: {trainer.precision.description}; loss {loss.item():.3f}, "
            f"{time.perf_counter() - start:.2f} s (first step)")


def largest_batch(fits: Callable[[int], bool], limit: int, step: int = 8) -> int:
    """The largest multiple of `step` up to `limit` for which fits() holds (0 if none): doubling,
    then bisection; fits() must be monotone."""
    limit = limit // step * step
    lo, hi = 0, step
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + step)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def bench_reserve_bytes(trainer, batch: int, res: int) -> int:
    """What a run holds beside its step of `batch` at `res` that this bench has not allocated:
    the train loader's device buffers and DDP's gradient buckets (a run of several workers has
    them; the bench's bare model has none), counted by the run's own probe.step_reserve_bytes,
    so a batch this bench says fits is one the run's probe accepts."""
    import torch

    from ..training.probe import _torch_dtype, step_reserve_bytes

    itemsize = torch.empty((), dtype=_torch_dtype(trainer.precision.loader_dtype)).element_size()
    params = sum(p.numel() * p.element_size() for p in trainer.bare_model.parameters())
    return step_reserve_bytes(batch, res, itemsize, ddp_param_bytes=params)


def batch_fits(trainer, res: int) -> Callable[[int], bool]:
    """Whether a run's step of `batch` at `res` fits, with what the run holds beside it."""
    import torch

    from ..training.probe import _torch_dtype, try_step

    r = trainer.recipe
    dtype = _torch_dtype(trainer.precision.loader_dtype)

    def fits(batch: int) -> bool:
        reserve = bench_reserve_bytes(trainer, batch, res)
        try:
            try_step(trainer.bare_model, trainer.loss, trainer.device, batch=batch, res=res,
                     num_classes=len(trainer.classes), autocast=trainer.precision.autocast,
                     image_dtype=dtype, channels_last=trainer.device.type == "cuda"
                     and r.channels_last, optimizer=trainer.optimizer, reserve_bytes=reserve)
            return True
        except torch.OutOfMemoryError:
            return False
    return fits


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device, args) -> dict:
    """Every figure of the bench on `device` (also runs on CPU, slowly, for the tests)."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # as the training worker does
    probe = synthetic_trainer(device, arch=args.arch, precision=args.precision,
                              num_classes=args.classes)
    top = max(args.res)
    fits = batch_fits(probe, top)
    largest = largest_batch(fits, args.max_batch)
    batch = args.batch_size or min(probe.recipe.batch_size, largest) or 8
    rows = []
    trainer = synthetic_trainer(device, arch=args.arch, precision=args.precision,
                                batch_size=batch, num_classes=args.classes)
    for res in args.res:
        rate = images_per_second(trainer, res, args.steps, args.warmup)
        rows.append({"what": f"{args.arch} train step", "res": res, "batch": batch,
                     "precision": trainer.precision.name, "images_per_s": round(rate, 1)})
    steps = {p: one_step(device, p, args.arch, min(args.res), min(batch, 32)) for p in PRECISIONS}
    return {"device": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
            "precision": trainer.precision.description, "rows": rows, "one_step": steps,
            "largest_batch": {"res": top, "batch": largest,
                              "recipe_batch": probe.recipe.batch_size,
                              "recipe_batch_fits": largest >= probe.recipe.batch_size}}


def no_cuda(torch_version: str, torch_cuda: str | None, driver: str | None = None) -> int:
    """Without a usable CUDA device: exit 2 with the driver's line when there is a GPU whose
    driver is too old for torch's CUDA (torch then says only that CUDA is unavailable), else say
    it is skipped and exit 0."""
    from ..training.gpu_env import driver_supports, driver_version

    too_old = driver_supports(torch_cuda, driver or driver_version())
    if too_old:
        say(f"bench gpu: {too_old}")
        return 2
    say(f"bench gpu: skipped: no CUDA device here (torch {torch_version}, "
        f"CUDA build {torch_cuda or 'none'})")
    return 0


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        return no_cuda(torch.__version__, torch.version.cuda)
    from ..ops.preflight_probes import gpu_lines
    from . import _table

    for line in gpu_lines():   # what `pipeline preflight` checks on each GPU node
        say(f"preflight: {line}")
    out = measure(torch.device("cuda", 0), args)
    say(f"{out['device']}: {out['precision']}")
    say(_table(out["rows"], ["what", "res", "batch", "precision", "images_per_s"]))
    for p, line in out["one_step"].items():
        say(f"one step {p}: {line}")
    big = out["largest_batch"]
    say(f"largest batch per GPU at {big['res']} px (with the train loader's buffers and DDP's buckets): "
        f"{big['batch']}; the recipe's {big['recipe_batch']} "
        f"{'fits' if big['recipe_batch_fits'] else 'does NOT fit: lower --batch-size'}")
    say(json.dumps({"bench": "gpu", **out}))
    return 0
