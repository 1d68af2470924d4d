"""The per-worker training function: plain PyTorch with the FFCV recipe; Ray only at the edges
(`prepare_model`, `report`, `get_checkpoint`, `get_context`).

Methods are the recipe's nouns, as in ffcv-imagenet's train_imagenet.py.
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import Recipe, TrainConfig
from ..data.loaders import Reads, TrainLoader, val_loader
from . import checkpoint
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


class ImageNetTrainer:
    def __init__(self, cfg: TrainConfig, train: Reads, val: Reads, classes: list[dict],
                 rank: int, world: int, device: torch.device, wrap_model=None):
        self.cfg, self.recipe, self.classes = cfg, cfg.recipe, classes
        self.wrap_model = wrap_model
        self.lineage: dict = {}   # manifest sha256, MLflow run, trial: copied into checkpoints
        # On CPU, DDP warns once per worker that 1x1-conv gradient strides differ from its buckets.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.rank, self.world, self.device = rank, world, device
        self.global_batch = self.recipe.batch_size * world
        # autocast, loader dtype and scaler decided together (a UserError for bf16 without it)
        self.precision = device_precision(self.recipe.precision, device)
        self.train_loader = self.create_train_loader(train)
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
        return TrainLoader(reads, self.recipe.batch_size, self.get_resolution(0),
                           self.cfg.resources.cpus_per_worker, self.recipe.seed, self.device,
                           self.precision.loader_dtype)

    def create_val_loader(self, reads: Reads):
        return val_loader(reads, self.recipe.val_batch_size, self.recipe.val_res,
                          self.cfg.resources.cpus_per_worker, self.device,
                          self.precision.loader_dtype)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _channels_last(self, images):
        if self.device.type == "cuda" and self.recipe.channels_last:
            return images.to(memory_format=torch.channels_last)
        return images

    def train_loop(self, epoch: int, on_first_step=None) -> dict:
        self.model.train()
        res = self.get_resolution(epoch)
        steps = len(self.train_loader)
        lrs = np.interp(np.arange(steps) / steps + epoch, [epoch, epoch + 1],
                        [self.get_lr(epoch), self.get_lr(epoch + 1)])
        loss_sum = torch.zeros((), device=self.device)
        start = time.perf_counter()
        done = 0
        for step, (images, target) in enumerate(self.train_loader.epoch(epoch, res)):
            for group in self.optimizer.param_groups:
                group["lr"] = float(lrs[step])   # a numpy float would not load with weights_only
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss = self.loss(self.model(self._channels_last(images)), target)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach()
            done += 1
            maybe_inject_fault(epoch, step, self.rank)
            if step == 0 and on_first_step:
                on_first_step()
        seconds = time.perf_counter() - start
        stats = torch.tensor([loss_sum.item(), done], dtype=torch.float64)
        self._all_reduce(stats)
        return {"train_loss": stats[0].item() / max(1, stats[1].item()),
                "images_per_s": done * self.global_batch / seconds if seconds else 0.0,
                "lr": float(lrs[-1]) if steps else 0.0, "resolution": res,
                "steps": done, "epoch_seconds": seconds}

    def val_loop(self) -> dict:
        """Top-1/top-5 over the whole validation split, summed across workers."""
        model = self.bare_model   # no DDP collectives in eval: ranks may have unequal batches
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64)   # correct@1, correct@5, loss sum, count
        with torch.no_grad(), self._autocast():
            for images, target in self.val_loader:
                images = self._channels_last(images)
                output = model(images)
                if self.recipe.lr_tta:
                    output = (output + model(torch.flip(images, dims=[3]))) / 2
                top5 = output.topk(min(5, output.shape[1]), dim=1).indices
                hits = top5 == target[:, None]
                sums += torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(),
                                      self.loss(output.float(), target).item() * len(target),
                                      len(target)], dtype=torch.float64)
        self._all_reduce(sums)
        n = max(1.0, sums[3].item())
        return {"val_top1": sums[0].item() / n, "val_top5": sums[1].item() / n,
                "val_loss": sums[2].item() / n, "val_images": int(sums[3].item())}

    def _all_reduce(self, t: torch.Tensor) -> None:
        if self.world > 1 and dist.is_initialized():
            moved = t.to(self.device)
            dist.all_reduce(moved)
            t.copy_(moved.cpu())

    # -- checkpoints -------------------------------------------------------------------------------
    def rng_states(self) -> list[dict]:
        """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
        return gather(checkpoint.rng_state(), self.world)

    def save(self, folder: str, epoch: int, metrics: dict, rng: list[dict]) -> None:
        """Everything needed to resume (weights, optimizer, scaler, epoch, RNG) and to serve."""
        checkpoint.save(folder, model=self.bare_model.state_dict(),
                        optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                        epoch=epoch, rng=rng,
                        meta=checkpoint.meta(self.cfg, self.classes, epoch, metrics, self.lineage))

    def load(self, folder: str) -> int:
        """Resume from a checkpoint folder; each rank gets back its own RNG state (a run resumed
        with another world size re-seeds each rank from the seed, the epoch and its rank)."""
        path = os.path.join(folder, checkpoint.CHECKPOINT_FILE)
        state = checkpoint.load_state(Path(path).read_bytes(), path)
        self.bare_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        epoch = int(state["epoch"])
        rng = state.get("rng") or []
        if len(rng) == self.world:
            checkpoint.set_rng_state(rng[self.rank])
        else:
            seed = self.recipe.seed * 1_000_003 + epoch * 1009 + self.rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
        return epoch

    def init_weights(self, state: dict) -> str:
        return load_weights(self.bare_model, state)


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO from each worker (one of its loggers is
    named by file path, out of reach of LoggingConfig); our one line per epoch says it better."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__, "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


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


def train_worker(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    import json

    import ray.train
    import ray.train.torch

    _quiet_ray_train_logs()
    from ..data.manifest import ShardManifest
    from ..data.node_cache import NodeSplit, node_reads
    from ..tracking import RunLog
    from .probe import check_largest_step
    from .run_events import RunEvents

    cfg = TrainConfig(**config["train"])
    manifest = ShardManifest.model_validate(config["manifest"])
    storage, events = config["storage"], RunEvents(config["storage"], config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Which node each rank runs on, and what each node's cache already holds: every rank then
    # computes the same assignment, keeping shards where they are.
    node = ray.get_runtime_context().get_node_id()
    held = {split: NodeSplit(storage, cfg.data, manifest, split, cfg.loader.cache_dir).held()
            for split in ("train", "val")}
    everyone = gather((node, held), world)
    rank_nodes = [n for n, _ in everyone]
    # by node id: Ray's local rank goes by IP, which nodes sharing a machine also share
    local_rank = rank_nodes[:rank].count(node)
    data = config["data"]
    reads = {}
    for split in ("train", "val"):
        reads[split], fetched = node_reads(
            storage, cfg.data, manifest, split, data["placement"], rank_nodes, rank,
            cfg.recipe.seed, cfg.loader.cache_dir, cfg.loader.read_mode,
            data["node_memory"].get(node, 0), cfg.loader.memory_fraction,
            cfg.loader.max_steps_per_epoch * cfg.recipe.batch_size if split == "train" else 0,
            holdings={n: h[split] for n, h in everyone})
        if local_rank == 0:   # what this node holds: for the summary and `bench data`
            events.add("node_data", node=node, placement=data["placement"], world_size=world,
                       **fetched)
    classes = [c.model_dump() for c in manifest.classes]
    trainer = ImageNetTrainer(cfg, reads["train"], reads["val"], classes, rank, world, device)
    trainer.lineage = config.get("lineage", {})
    label = config.get("label", "train")
    if rank == 0:
        print(f"[{label}] precision: {trainer.precision.description}", flush=True)
    fits = check_largest_step(trainer)   # an OOM at max_res ends the run now, not at epoch 13
    if rank == 0 and fits:
        print(f"[{label}] memory: {fits}", flush=True)
    mlflow = None
    if rank == 0 and config.get("tracking"):   # only rank 0 talks to MLflow
        t = config["tracking"]
        mlflow = RunLog(t["uri"], t["run_id"], storage, t["outbox"],
                        say=lambda line: print(line, flush=True))

    start_epoch, resumed_from = 0, None
    ckpt = ray.train.get_checkpoint()
    final_metrics = None
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            start_epoch = resumed_from = trainer.load(folder)
            final_metrics = json.loads(Path(folder, checkpoint.META_FILE).read_text()).get("metrics")
    elif config.get("init_state") is not None:
        note = trainer.init_weights(config["init_state"])
        if rank == 0:
            print(f"[{label}] init from {cfg.run.init_from}: {note}", flush=True)
    if rank == 0:
        events.add("start", resumed_from_epoch=resumed_from, world_size=world)

    epochs = cfg.recipe.epochs
    if start_epoch >= epochs and final_metrics:
        # The run had finished its last epoch when it was interrupted (its driver died before
        # wrapping up): say the final result again, so whoever waits for reports (Tune) gets it.
        ray.train.report(final_metrics)
        return

    def first_step():
        if rank == 0:
            events.add("first_step")
        if local_rank == 0:
            events.add("node_first_step", node=node)

    on_first = first_step
    for epoch in range(start_epoch, epochs):
        train_stats = trainer.train_loop(epoch, on_first_step=on_first)
        on_first = None
        metrics = {"epoch": epoch + 1, **train_stats, **trainer.val_loop(),
                   "world_size": world, "resumed_from_epoch": resumed_from}
        # Said and logged before the report: a trial that ASHA stops is ended inside report(),
        # and its last epoch would otherwise reach neither the terminal nor MLflow.
        if mlflow is not None:
            mlflow.log(metrics, epoch + 1)
        if rank == 0:
            print(epoch_line(label, epoch + 1, epochs, metrics), flush=True)
        last = epoch + 1 == epochs
        if (epoch + 1) % cfg.run.checkpoint_every == 0 or last:
            rng = trainer.rng_states()
            with tempfile.TemporaryDirectory() as folder:
                report_ckpt = name = None
                if rank == 0:
                    trainer.save(folder, epoch + 1, metrics, rng)
                    report_ckpt = ray.train.Checkpoint.from_directory(folder)
                    # unique per attempt: a re-done epoch never lands in a half-written folder
                    name = f"epoch-{epoch + 1:04d}-{uuid.uuid4().hex[:6]}"
                ray.train.report(metrics, checkpoint=report_ckpt, checkpoint_dir_name=name)
        else:
            ray.train.report(metrics)
