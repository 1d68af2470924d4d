"""`pipeline bench train`: the same training steps under Ray Train and under bare torchrun DDP.

Both launchers run ImageNetTrainer.train_loop over the same node cache; one warm-up epoch (FFCV
compiles, allocators settle), then one timed epoch of `steps` steps. Runs alternate so that a
drifting machine affects both alike.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from ..config import TrainConfig


def bench_config(args, data: str) -> TrainConfig:
    return TrainConfig(data=data, arch=args.arch, epochs=2, batch_size=args.batch_size,
                       min_res=args.res, max_res=args.res, start_ramp=0, end_ramp=0,
                       val_res=args.res, gpus_per_worker=args.gpus_per_worker,
                       max_steps_per_epoch=args.steps, lr=0.1)


def timed_epoch(cfg: TrainConfig, paths: dict, classes: list, rank: int, world: int,
                device: torch.device, wrap_model=None) -> float:
    """Seconds per step of the second of two short epochs."""
    from ..data.loaders import Reads
    from ..training.trainer import ImageNetTrainer

    batch = cfg.recipe.batch_size
    trainer = ImageNetTrainer(cfg, Reads.whole_file(paths["train"], rank, world, batch),
                              Reads.whole_file(paths["val"], rank, world, batch), classes, rank,
                              world, device, wrap_model=wrap_model)
    trainer.train_loop(0)
    stats = trainer.train_loop(1)
    return stats["epoch_seconds"] / stats["steps"]


def _ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    s = timed_epoch(TrainConfig(**config["cfg"]), config["paths"], config["classes"],
                    ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    if ctx.get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump({"s_per_step": s}, f)


def run_ray(cfg, paths, classes, workers, out) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as storage:
        TorchTrainer(_ray_worker,
                     train_loop_config={"cfg": cfg.model_dump(), "paths": paths,
                                        "classes": classes, "out": out},
                     scaling_config=ScalingConfig(num_workers=workers,
                                                  use_gpu=cfg.resources.gpus_per_worker > 0),
                     run_config=RunConfig(storage_path=storage)).fit()
    with open(out) as f:
        return json.load(f)["s_per_step"]


def run_torchrun(cfg, paths, classes, workers, out) -> float:
    spec = os.path.join(os.path.dirname(out), "torchrun-spec.json")
    with open(spec, "w") as f:
        json.dump({"cfg": cfg.model_dump(), "paths": paths, "classes": classes, "out": out}, f)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={workers}", "-m", "pipeline.bench.train", spec],
                   check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)["s_per_step"]


def torchrun_main(spec_path: str) -> None:
    """One torchrun process: plain torch.distributed + DDP, no Ray."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    spec = json.load(open(spec_path))
    cfg = TrainConfig(**spec["cfg"])
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    use_gpu = cfg.resources.gpus_per_worker > 0 and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_gpu else "gloo")
    device = torch.device("cuda", local) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)

    def wrap(model):
        model = model.to(device)
        return DistributedDataParallel(model, device_ids=[local] if use_gpu else None)

    s = timed_epoch(cfg, spec["paths"], spec["classes"], rank, dist.get_world_size(), device, wrap)
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump({"s_per_step": s}, f)
    dist.destroy_process_group()


def run(args) -> dict:
    import ray

    from . import node_copy, staged_sample

    work = tempfile.mkdtemp(prefix="pipeline-bench-train-")
    per_class = (args.steps + 2) * args.batch_size * args.workers // 4 + 1
    _, staged = staged_sample(work, source=None, classes=4, train_per_class=per_class,
                              val_per_class=2, max_resolution=max(64, args.res * 2))
    from ..data.manifest import read_manifest
    from ..storage import Storage

    classes = [c.model_dump() for c in read_manifest(Storage(), staged).classes]
    cache = os.path.join(work, "cache")
    paths = {s: node_copy(staged, s, cache) for s in ("train", "val")}
    ray.init(address="local", num_cpus=max(2, args.workers), include_dashboard=True,
             dashboard_host="127.0.0.1", logging_level="WARNING")
    try:
        cfg = bench_config(args, staged)
        rows = []
        for r in range(args.repeats):
            out = os.path.join(work, f"out-{r}.json")
            rows.append({"launcher": "ray", "run": r,
                         "s_per_step": run_ray(cfg, paths, classes, args.workers, out)})
            rows.append({"launcher": "torchrun", "run": r,
                         "s_per_step": run_torchrun(cfg, paths, classes, args.workers, out)})
    finally:
        ray.shutdown()
    ray_s = statistics.median(r["s_per_step"] for r in rows if r["launcher"] == "ray")
    torch_s = statistics.median(r["s_per_step"] for r in rows if r["launcher"] == "torchrun")
    for r in rows:
        r["s_per_step"] = round(r["s_per_step"], 4)
    return {"rows": rows, "workers": args.workers, "arch": args.arch, "res": args.res,
            "batch_size": args.batch_size, "ray_s_per_step": ray_s,
            "torchrun_s_per_step": torch_s, "ratio": ray_s / torch_s}


if __name__ == "__main__":
    torchrun_main(sys.argv[1])
