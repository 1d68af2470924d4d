"""The trainer of one worker: plain PyTorch with the FFCV recipe, no Ray (Ray Train's
`prepare_model` only when the caller brings no DDP wrapper of its own).

Methods are the recipe's nouns, as in ffcv-imagenet's train_imagenet.py: the schedules, the
model, the optimizer, the loaders, one step (in micro-batches when a worker takes a larger part
of the global batch), the train and validation loops, the checkpoint.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import Recipe, TrainConfig
from ..data.loaders import Reads, TrainLoader, val_loader
from ..data.placement import EpochReads
from ..holds import hold
from . import checkpoint
from .gpu_env import loader_threads
from .model import build_model, load_weights, param_groups
from .precision import device_precision

# "EPOCH:STEP:MARKER": the worker of rank 0 raises once at that step (the marker file records that
# it did). The tests use it for a failure a real run can't be made to produce on demand.
FAULT_ENV = "PIPELINE_INJECT_FAULT"


def maybe_inject_fault(epoch: int, step: int, rank: int) -> None:
    """"EPOCH:STEP:MARKER" fires once; "EPOCH:STEP:MARKER:N" fires the first N times rank 0
    reaches that step (each restart from an earlier checkpoint reaches it again): the marker
    holds one line per fault."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or rank != 0:
        return
    want_epoch, want_step, marker = spec.split(":", 2)
    times = 1
    if marker.rpartition(":")[2].isdigit():
        marker, _, count = marker.rpartition(":")
        times = int(count)
    if (epoch, step) != (int(want_epoch), int(want_step)):
        return
    fired = len(Path(marker).read_text().splitlines()) if os.path.exists(marker) else 0
    if fired < times:
        with open(marker, "a") as f:
            f.write(f"{time.time()}\n")
        raise RuntimeError(f"injected fault {fired + 1} of {times} at epoch {epoch} step {step}")


HOLD_ENV = "PIPELINE_TEST_HOLD"


def maybe_hold(epoch: int, step: int, rank: int, world: int) -> None:
    """Test hook: "EPOCH:STEP:FILE[:WORLD]" (several, comma-separated) holds every rank after
    that step (of a group of WORLD workers, any if not given) until FILE exists, at most 10 min,
    so a test can change the cluster while the run is at a known step however fast the machine;
    "*" for EPOCH and STEP holds at the first step such a group trains. Rank 0 appends
    "epoch step world" to FILE.held when it starts waiting."""
    for spec in filter(None, os.environ.get(HOLD_ENV, "").split(",")):
        want_epoch, want_step, path, *want_world = spec.split(":")
        if (want_epoch, want_step) != ("*", "*") and (epoch, step) != (int(want_epoch),
                                                                        int(want_step)):
            continue
        if os.path.exists(path) or (want_world and int(want_world[0]) != world):
            continue
        hold(path, f"{epoch} {step} {world}" if rank == 0 else None)


# -- the schedules, as plain functions of the recipe ----------------------------------------------
def lr_at(r: Recipe, epoch: float, global_batch: int) -> float:
    """Learning rate at a (fractional) epoch; r.lr is per 256 images."""
    peak = r.lr * global_batch / 256
    if r.lr_schedule == "triangular":
        return float(np.interp(epoch, [0, r.lr_peak_epoch, r.epochs], [peak * 1e-4, peak, 0]))
    if r.lr_schedule == "step":
        return peak * r.lr_step_ratio ** int(epoch // r.lr_step_length)
    warm = min(1.0, epoch / r.lr_peak_epoch) if r.lr_peak_epoch else 1.0  # cosine
    progress = max(0.0, epoch - r.lr_peak_epoch) / max(1e-9, r.epochs - r.lr_peak_epoch)
    return float(peak * warm * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))


def resolution_at(r: Recipe, epoch: int) -> int:
    """Progressive resizing: min_res until start_ramp, then up to max_res by end_ramp, in steps
    of 32 px."""
    if epoch <= r.start_ramp:
        return r.min_res
    if epoch >= r.end_ramp:
        return r.max_res
    res = np.interp(epoch, [r.start_ramp, r.end_ramp], [r.min_res, r.max_res])
    return int(np.round(res / 32)) * 32


def micro_batches(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of the micro-batches a rank's part of n images is trained in: as many as
    n / size rounds to (at least one), of equal sizes (within one image). None is smaller than
    half of `size` (BatchNorm normalises over each one: 256 + 4 would give it 4 images), none
    larger than 1.5 x `size` (probe.check_largest_step tries the largest)."""
    k = max(1, (2 * n + size) // (2 * size))   # n / size rounded half up
    bounds = [n * i // k for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def largest_micro_batch(n: int, size: int) -> int:
    return max(stop - start for start, stop in micro_batches(n, size))


class ImageNetTrainer:
    def __init__(self, cfg: TrainConfig, train: Reads, val: Reads, classes: list[dict],
                 rank: int, world: int, device: torch.device, wrap_model=None,
                 first: tuple[int, EpochReads] | None = None):
        """`first` (epoch, reads): the loader starts reading them at once, so FFCV compiles its
        pipeline (seconds, in every new worker) while the model is built and the checkpoint
        loaded, not after."""
        self.cfg, self.recipe, self.classes = cfg, cfg.recipe, classes
        self.wrap_model = wrap_model
        self.lineage: dict = {}   # manifest sha256, MLflow run, trial: copied into checkpoints
        # On CPU, DDP warns once per worker that 1x1-conv gradient strides differ from its buckets.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.rank, self.world, self.device = rank, world, device
        self.train_reads = train
        # a constant of the run, whatever the world size of the moment (config.global_batch)
        self.global_batch = train.layout.global_batch
        # autocast, loader dtype and scaler decided together (a UserError for bf16 without it)
        self.precision = device_precision(self.recipe.precision, device)
        on_gpu = device.type == "cuda"
        self.loader_threads = loader_threads(
            cfg.resources.loader_threads, cfg.resources.cpus_per_worker,
            len(os.sched_getaffinity(0)), torch.cuda.device_count() if on_gpu else 0, on_gpu)
        self.train_loader = self.create_train_loader(train)
        self.started = None
        if first is not None:
            epoch, reads = first
            self.started = (epoch, reads, iter(self.train_loader.epoch(
                epoch, self.get_resolution(epoch), train.local[reads.gids])))
        self.val_loader = self.create_val_loader(val)
        # FFCV sets torch's thread count when it builds a Loader; set ours afterwards.
        torch.set_num_threads(cfg.resources.cpus_per_worker)
        self.model = self.create_model()
        self.optimizer = self.create_optimizer()
        self.loss = nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing)
        self.autocast_dtype = self.get_autocast_dtype()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.scaler)

    # -- the recipe -----------------------------------------------------------------------------
    def get_lr(self, epoch: float) -> float:
        return lr_at(self.recipe, epoch, self.global_batch)

    def get_resolution(self, epoch: int) -> int:
        return resolution_at(self.recipe, epoch)

    def get_autocast_dtype(self):
        return self.precision.autocast

    def create_model(self) -> nn.Module:
        """The model on this worker's device, wrapped for DDP (by Ray's prepare_model unless the
        caller brings its own wrapper, as the torchrun benchmark does)."""
        torch.manual_seed(self.recipe.seed)
        model = build_model(self.recipe.arch, len(self.classes), self.recipe.blurpool)
        if self.device.type == "cuda" and self.recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.wrap_model is None:
            import ray.train.torch

            return ray.train.torch.prepare_model(model)
        return self.wrap_model(model)

    @property
    def bare_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def create_optimizer(self):
        return torch.optim.SGD(param_groups(self.bare_model, self.recipe.weight_decay), lr=0.0,
                               momentum=self.recipe.momentum)

    def create_train_loader(self, reads: Reads) -> TrainLoader:
        """This rank's part of each global batch per step (reads.count): batch_size with the
        run's full world, more with fewer workers (trained in micro-batches, train_step)."""
        return TrainLoader(reads, reads.count, self.get_resolution(0),
                           self.loader_threads, self.recipe.seed, self.device,
                           self.precision.loader_dtype)

    def create_val_loader(self, reads: Reads):
        return val_loader(reads, self.recipe.val_batch_size, self.recipe.val_res,
                          self.loader_threads, self.device,
                          self.precision.loader_dtype)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _channels_last(self, images):
        if self.device.type == "cuda" and self.recipe.channels_last:
            return images.to(memory_format=torch.channels_last)
        return images

    def train_step(self, images, target, lr: float) -> torch.Tensor:
        """One optimizer step on this rank's part of a global batch, in micro-batches
        (micro_batches: none under half of batch_size; gradients accumulated; DDP syncs on the
        last). Each micro-batch's loss is
        weighted so that the step's gradient is the mean over the global batch whatever the
        world size and however it is split. Returns the sum of the per-image losses."""
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)   # a numpy float would not load with weights_only
        self.optimizer.zero_grad(set_to_none=True)
        n = len(target)
        weight = self.world / self.global_batch   # DDP averages the ranks' gradients
        total = torch.zeros((), device=self.device)
        for start, stop in micro_batches(n, self.recipe.batch_size):
            last = stop >= n
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            x, y = images[start:stop], target[start:stop]
            with sync:
                with self._autocast():
                    loss = self.loss(self.model(self._channels_last(x)), y)
                self.scaler.scale(loss * (len(y) * weight)).backward()
            total += loss.detach() * len(y)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def train_loop(self, epoch: int, reads: EpochReads | None = None, steps_before: int = 0,
                   after_step=None, trained=None) -> dict:
        """The steps of `reads` (default: the whole epoch; or the rest of it after `steps_before`
        steps done before an interruption). after_step(step, step_s, wait_s, loss) runs after
        each one, with the epoch's step number; it may checkpoint (a collective: it runs at the
        same step on every rank). trained(steps) runs as soon as a step's optimizer step is
        done, with the epoch's steps done (run_events.Reached: how far the group got)."""
        if reads is None:
            reads = self.train_reads.epoch(epoch, self.recipe.seed,
                                           max_steps=self.cfg.loader.max_steps_per_epoch)
        self.model.train()
        res = self.get_resolution(epoch)
        total = steps_before + reads.steps
        fraction = np.arange(steps_before, total) / max(1, total)
        lrs = np.interp(fraction + epoch, [epoch, epoch + 1],
                        [self.get_lr(epoch), self.get_lr(epoch + 1)])
        loss_sum = torch.zeros((), device=self.device)
        if self.started is not None and self.started[0] == epoch and self.started[1] is reads:
            batches = self.started[2]   # started in __init__
        else:
            batches = iter(self.train_loader.epoch(epoch, res, self.train_reads.local[reads.gids]))
        self.started = None
        start = tick = time.perf_counter()
        waiting = 0.0
        self.steps_done = 0
        for i in range(reads.steps):
            images, target = next(batches)
            got = time.perf_counter()
            loss = self.train_step(images, target, lrs[i])
            loss_sum += loss
            self.steps_done = i + 1
            if trained is not None:
                trained(steps_before + i + 1)
            maybe_inject_fault(epoch, steps_before + i, self.rank)
            maybe_hold(epoch, steps_before + i, self.rank, self.world)
            now = time.perf_counter()
            waiting += got - tick
            if after_step is not None:
                after_step(steps_before + i, now - tick, got - tick, loss / max(1, len(target)))
            tick = time.perf_counter()
        seconds = time.perf_counter() - start
        stats = torch.tensor([loss_sum.item(), reads.steps * reads.count], dtype=torch.float64)
        self._all_reduce(stats)
        return {"train_loss": stats[0].item() / max(1, stats[1].item()),
                "images_per_s": reads.steps * self.global_batch / seconds if seconds else 0.0,
                "lr": float(lrs[-1]) if reads.steps else 0.0, "resolution": res,
                "steps": total, "epoch_seconds": seconds,
                "data_wait": waiting / seconds if seconds else 0.0}

    def val_loop(self) -> dict:
        """Top-1/top-5 over the whole validation split, summed across workers. The sums stay on
        the device (one sync per loop, not three per batch); the flip average is taken in fp32
        (two bf16 logits summed lose the low bits)."""
        model = self.bare_model   # no DDP collectives in eval: ranks may have unequal batches
        model.eval()
        # correct@1, correct@5, loss sum, count
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        with torch.no_grad(), self._autocast():
            for images, target in self.val_loader:
                images = self._channels_last(images)
                output = model(images).float()
                if self.recipe.lr_tta:
                    output = (output + model(torch.flip(images, dims=[3])).float()) / 2
                top5 = output.topk(min(5, output.shape[1]), dim=1).indices
                hits = top5 == target[:, None]
                sums[0] += hits[:, 0].sum()
                sums[1] += hits.any(1).sum()
                sums[2] += self.loss(output, target) * len(target)
                sums[3] += len(target)
        sums = sums.cpu()
        self._all_reduce(sums)
        top1, top5, loss, count = sums.tolist()
        n = max(1.0, count)
        return {"val_top1": top1 / n, "val_top5": top5 / n, "val_loss": loss / n,
                "val_images": int(count)}

    def _all_reduce(self, t: torch.Tensor) -> None:
        if self.world > 1 and dist.is_initialized():
            moved = t.to(self.device)
            dist.all_reduce(moved)
            t.copy_(moved.cpu())

    def read_digest(self, reads: EpochReads, steps: int, epoch: int) -> tuple[int, int, int]:
        """(samples, digest, views) of what every rank read in the first `steps` steps of `reads`
        in `epoch` (a collective; views: views.py). Sums go as two 32-bit halves, so none
        overflows."""
        gids = reads.gids[:steps * reads.count]
        terms = self.train_reads.ids.terms[gids]
        seen = self._views_sum(reads, epoch, len(gids))
        t = torch.tensor([len(terms), int((terms >> np.uint64(32)).sum(dtype=np.uint64)),
                          int((terms & np.uint64(0xFFFFFFFF)).sum(dtype=np.uint64)),
                          seen >> 32, seen & 0xFFFFFFFF], dtype=torch.int64)
        self._all_reduce(t)
        count, high, low, views_high, views_low = (int(v) for v in t.tolist())
        return count, ((high << 32) + low) % 2**64, ((views_high << 32) + views_low) % 2**64

    def _views_sum(self, reads: EpochReads, epoch: int, n: int) -> int:
        """This rank's views sum over the first n samples of `reads`: hashed once each (a
        checkpoint every few steps extends the last sum)."""
        from ..data.views import views_digest

        (was, was_epoch), done, total = getattr(self, "_views_at", ((None, -1), 0, 0))
        if was is not reads or was_epoch != epoch or done > n:
            done, total = 0, 0
        gids = reads.gids[done:n]
        rows = self.train_loader.sample_views(epoch, gids)
        total = (total + views_digest(self.train_reads.ids, gids, rows)) % 2**64
        self._views_at = ((reads, epoch), n, total)
        return total

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, folder: str, epoch: int, metrics: dict, cursor: dict | None = None,
             epoch_samples: list[dict] | None = None) -> None:
        """Everything needed to resume (weights, optimizer, scaler, epoch, data position) and to
        serve; each rank writes its own RNG state beside it (checkpoint.save_rng)."""
        meta = checkpoint.meta(self.cfg, self.classes, epoch, metrics, self.lineage)
        meta["epoch_samples"] = epoch_samples or []
        if cursor:
            meta["cursor"] = {"epoch": cursor["epoch"], "steps": sum(
                s["steps"] for s in cursor["segments"])}
        checkpoint.save(folder, model=self.bare_model.state_dict(),
                        optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                        epoch=epoch, meta=meta, cursor=cursor, epoch_samples=epoch_samples,
                        world_size=self.world)

    def load(self, state: dict, rng: dict | None = None) -> dict:
        """Resume from a checkpoint's state (checkpoint.load) and this rank's RNG state
        (checkpoint.load_rng; None: a run resumed with another world size re-seeds each rank
        from the seed, the epoch and its rank). Returns {epoch, cursor (or None), epoch_samples}."""
        self.bare_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        epoch = int(state["epoch"])
        if rng is not None:
            checkpoint.set_rng_state(rng)
        else:
            seed = self.recipe.seed * 1_000_003 + epoch * 1009 + self.rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)

        return {"epoch": epoch, "cursor": json.loads(state["cursor"]) if state.get("cursor") else None,
                "epoch_samples": json.loads(state.get("epoch_samples") or "[]")}

    def init_weights(self, state: dict) -> str:
        return load_weights(self.bare_model, state)


def gather(value, world: int) -> list:
    """Every rank's value, in rank order (a collective)."""
    if world > 1 and dist.is_initialized():
        out: list = [None] * world
        dist.all_gather_object(out, value)
        return out
    return [value]


def epoch_line(label: str, epoch: int, epochs: int, m: dict) -> str:
    return (f"[{label}] epoch {epoch}/{epochs} loss {m['train_loss']:.3f} "
            f"top1 {m['val_top1']:.3f} top5 {m['val_top5']:.3f} {m['images_per_s']:.0f} img/s "
            f"res {m['resolution']} lr {m['lr']:.3g}")
