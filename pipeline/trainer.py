"""The per-worker training function: plain PyTorch with the FFCV recipe; Ray only at the edges
(`prepare_model`, `report`, `get_checkpoint`, `get_context`).

Methods are the recipe's nouns, as in ffcv-imagenet's train_imagenet.py.
"""
from __future__ import annotations

import json
import os
import random
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

from .config import TrainConfig
from .loaders import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, TrainLoader, val_loader
from .model import build_model, load_weights, param_groups

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"
# "EPOCH:STEP:MARKER": the worker of rank 0 raises once at that step (the marker file records that
# it did). The tests use it for a failure a real run can't be made to produce on demand.
FAULT_ENV = "PIPELINE_INJECT_FAULT"


def maybe_inject_fault(epoch: int, step: int, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or rank != 0:
        return
    want_epoch, want_step, marker = spec.split(":", 2)
    if (epoch, step) == (int(want_epoch), int(want_step)) and not os.path.exists(marker):
        Path(marker).write_text(f"{time.time()}\n")
        raise RuntimeError(f"injected fault at epoch {epoch} step {step}")


class ImageNetTrainer:
    def __init__(self, cfg: TrainConfig, train_path: str, val_path: str, classes: list[dict],
                 rank: int, world: int, device: torch.device, wrap_model=None):
        self.cfg, self.classes = cfg, classes
        self.wrap_model = wrap_model
        self.lineage: dict = {}   # manifest sha256, MLflow run, trial: copied into checkpoints
        # On CPU, DDP warns once per worker that 1x1-conv gradient strides differ from its buckets.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.rank, self.world, self.device = rank, world, device
        self.global_batch = cfg.batch_size * world
        self.train_loader = self.create_train_loader(train_path)
        self.val_loader = self.create_val_loader(val_path)
        # FFCV sets torch's thread count when it builds a Loader; set ours afterwards.
        torch.set_num_threads(cfg.cpus_per_worker)
        self.model = self.create_model()
        self.optimizer = self.create_optimizer()
        self.loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.autocast_dtype = self.get_autocast_dtype()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)

    # -- the recipe -----------------------------------------------------------------------------
    def get_lr(self, epoch: float) -> float:
        """Learning rate at a (fractional) epoch, for the global batch."""
        c = self.cfg
        peak = c.lr * self.global_batch / 256
        if c.lr_schedule == "triangular":
            return float(np.interp(epoch, [0, c.lr_peak_epoch, c.epochs], [peak * 1e-4, peak, 0]))
        if c.lr_schedule == "step":
            return peak * c.lr_step_ratio ** int(epoch // c.lr_step_length)
        warm = min(1.0, epoch / c.lr_peak_epoch) if c.lr_peak_epoch else 1.0  # cosine
        progress = max(0.0, epoch - c.lr_peak_epoch) / max(1e-9, c.epochs - c.lr_peak_epoch)
        return peak * warm * 0.5 * (1 + np.cos(np.pi * min(1.0, progress)))

    def get_resolution(self, epoch: int) -> int:
        """Progressive resizing: min_res until start_ramp, then up to max_res by end_ramp, in
        steps of 32 px."""
        c = self.cfg
        if epoch <= c.start_ramp:
            return c.min_res
        if epoch >= c.end_ramp:
            return c.max_res
        res = np.interp(epoch, [c.start_ramp, c.end_ramp], [c.min_res, c.max_res])
        return int(np.round(res / 32)) * 32

    def get_autocast_dtype(self):
        p = self.cfg.precision
        if self.device.type != "cuda" or p == "fp32":
            return None
        if p == "fp16" or (p == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16

    def create_model(self) -> nn.Module:
        """The model on this worker's device, wrapped for DDP (by Ray's prepare_model unless the
        caller brings its own wrapper, as the torchrun benchmark does)."""
        torch.manual_seed(self.cfg.seed)
        model = build_model(self.cfg.arch, len(self.classes), self.cfg.blurpool)
        if self.device.type == "cuda" and self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.wrap_model is None:
            import ray.train.torch

            return ray.train.torch.prepare_model(model)
        return self.wrap_model(model)

    @property
    def bare_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def create_optimizer(self):
        return torch.optim.SGD(param_groups(self.bare_model, self.cfg.weight_decay), lr=0.0,
                               momentum=self.cfg.momentum)

    def create_train_loader(self, path: str) -> TrainLoader:
        return TrainLoader(path, self.cfg.batch_size, self.get_resolution(0),
                           self.cfg.cpus_per_worker, self.world, self.cfg.seed, self.device,
                           max_steps=self.cfg.max_steps_per_epoch)

    def create_val_loader(self, path: str):
        return val_loader(path, self.cfg.val_batch_size, self.cfg.val_res, self.cfg.cpus_per_worker,
                          self.world, self.rank, self.device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _channels_last(self, images):
        if self.device.type == "cuda" and self.cfg.channels_last:
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
                group["lr"] = lrs[step]
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
                if self.cfg.lr_tta:
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
    def save(self, folder: str, epoch: int, metrics: dict) -> None:
        """Everything needed to resume (weights, optimizer, scaler, epoch, RNG) and to serve."""
        torch.save({
            "model": self.bare_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }, os.path.join(folder, CHECKPOINT_FILE))
        meta = {**checkpoint_meta(self.cfg, self.classes, epoch, metrics), **self.lineage}
        Path(folder, META_FILE).write_text(json.dumps(meta, indent=1))

    def load(self, folder: str) -> int:
        state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu",
                           weights_only=False)
        self.bare_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state.get("rng") or {}
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        return int(state["epoch"])

    def init_weights(self, state: dict) -> str:
        return load_weights(self.bare_model, state)


def checkpoint_meta(cfg: TrainConfig, classes: list[dict], epoch: int, metrics: dict) -> dict:
    return {"arch": cfg.arch, "blurpool": cfg.blurpool, "num_classes": len(classes),
            "classes": classes, "epoch": epoch, "metrics": metrics,
            "preprocessing": {"resolution": cfg.val_res, "crop_ratio": CROP_RATIO,
                              "mean": (IMAGENET_MEAN / 255).tolist(),
                              "std": (IMAGENET_STD / 255).tolist()},
            "data": cfg.data, "config": cfg.model_dump()}


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO from each worker (one of its loggers is
    named by file path, out of reach of LoggingConfig); our one line per epoch says it better."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__, "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_worker(config: dict) -> None:
    """Entry point of each Ray Train worker."""
    import ray.train
    import ray.train.torch

    _quiet_ray_train_logs()
    from .manifest import ShardManifest
    from .run_events import RunEvents
    from .shard_cache import local_split

    cfg = TrainConfig(**config["train"])
    manifest = ShardManifest.model_validate(config["manifest"])
    storage, events = config["storage"], RunEvents(config["storage"], config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    train_path = local_split(storage, cfg.data, manifest, "train", cfg.cache_dir)
    val_path = local_split(storage, cfg.data, manifest, "val", cfg.cache_dir)
    classes = [c.model_dump() for c in manifest.classes]
    trainer = ImageNetTrainer(cfg, str(train_path), str(val_path), classes, rank, world, device)
    trainer.lineage = config.get("lineage", {})
    mlflow = None
    if rank == 0 and config.get("tracking"):   # only rank 0 talks to MLflow
        from .tracking import client, log_epoch

        mlflow = client(config["tracking"]["uri"])

    start_epoch, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    final_metrics = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start_epoch = resumed_from = trainer.load(folder)
            final_metrics = json.loads(Path(folder, META_FILE).read_text()).get("metrics")
    elif config.get("init_state") is not None:
        note = trainer.init_weights(config["init_state"])
        if rank == 0:
            print(f"[train] init from {cfg.init_from}: {note}", flush=True)
    if rank == 0:
        events.add("start", resumed_from_epoch=resumed_from, world_size=world)

    if start_epoch >= cfg.epochs and final_metrics:
        # The run had finished its last epoch when it was interrupted (its driver died before
        # wrapping up): say the final result again, so whoever waits for reports (Tune) gets it.
        ray.train.report(final_metrics)
        return
    first_step = (lambda: events.add("first_step")) if rank == 0 else None
    for epoch in range(start_epoch, cfg.epochs):
        train_stats = trainer.train_loop(epoch, on_first_step=first_step)
        first_step = None
        metrics = {"epoch": epoch + 1, **train_stats, **trainer.val_loop(),
                   "world_size": world, "resumed_from_epoch": resumed_from}
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as folder:
                ckpt = name = None
                if rank == 0:
                    trainer.save(folder, epoch + 1, metrics)
                    ckpt = ray.train.Checkpoint.from_directory(folder)
                    # unique per attempt: a re-done epoch never lands in a half-written folder
                    name = f"epoch-{epoch + 1:04d}-{uuid.uuid4().hex[:6]}"
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
        else:
            ray.train.report(metrics)
        if mlflow is not None:
            log_epoch(mlflow, config["tracking"]["run_id"], metrics, epoch + 1)
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{cfg.epochs} loss {metrics['train_loss']:.3f} "
                  f"top1 {metrics['val_top1']:.3f} top5 {metrics['val_top5']:.3f} "
                  f"{metrics['images_per_s']:.0f} img/s res {metrics['resolution']} "
                  f"lr {metrics['lr']:.4f}", flush=True)
