"""`pipeline bench ...`: benchmarks that print a table and one JSON line (never timed tests).

stage (staging throughput), loader (our loader vs bare FFCV vs ImageFolder), train (Ray Train vs
torchrun), data (what each node downloads and holds), gpu (one GPU with the recipe: img/s, every
precision, the largest batch; needs neither ffcv nor Ray), recovery (what a preemption costs, with
and without a notice), scale (the planning code at ImageNet scale on 8 to 1,024 nodes, in one
process).
"""
from __future__ import annotations

import json
import os

from ..console import say


def add_parsers(sub, s3_flags) -> None:
    p = sub.add_parser("stage", help="images/s staging with 1 and 2 Ray workers vs FFCV's writer",
                       description="Stage the same source with 1 and with 2 Ray workers, and with "
                                   "FFCV's own single-process DatasetWriter; print images/s.")
    p.add_argument("--source", help="ImageNet root to stage (default: generated sample data)")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=64)
    p.add_argument("--max-resolution", type=int, default=512)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (best kept)")
    s3_flags(p)


    p = sub.add_parser("loader", help="images/s: our train loader vs bare FFCV vs ImageFolder",
                       description="Images/s of the project's train pipeline (the node cache as a "
                                   "worker reads it) vs a bare FFCV Loader over the same .beton, "
                                   "torchvision ImageFolder + DataLoader (PIL) over the same JPEGs, "
                                   "and a bare full decode of those JPEGs (the decode limit).")
    p.add_argument("--source", help="ImageNet folders layout (default: generated sample data)")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--max-resolution", type=int, default=512)
    p.add_argument("--res", type=int, default=160, help="RandomResizedCrop output size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, help="loader threads/processes (default: all cores)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per loader (best kept)")
    p.add_argument("--repeats", type=int, default=1)

    p = sub.add_parser("train", help="s/step under Ray Train vs bare torchrun DDP",
                       description="Seconds per step for the same model, batch and data under Ray "
                                   "Train with N workers and under `torchrun --nproc_per_node N`, "
                                   "interleaved; prints the ratio.")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (after warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs of each")
    p.add_argument("--gpus-per-worker", type=float, default=0)

    from . import gpu

    gpu.add_arguments(sub.add_parser(
        "gpu", help="img/s per GPU at 160/192 px, one step in every precision, the largest batch",
        description=gpu.__doc__))

    from . import data

    data.add_arguments(sub.add_parser(
        "data", help="per node: bytes fetched, disk, time to first step, img/s; both placements",
        description=data.__doc__))

    from . import recovery

    recovery.add_arguments(sub.add_parser(
        "recovery", help="steps and seconds a preemption costs, with and without a notice",
        description=recovery.__doc__))

    from . import scale

    scale.add_arguments(sub.add_parser(
        "scale", help="placement, planning and checkpoint costs at ImageNet scale, 8-1,024 nodes",
        description=scale.__doc__))


def main(args) -> int:
    if args.bench == "gpu":   # before the others' imports: it runs where only torch is
        from .gpu import run as bench_gpu

        return bench_gpu(args)
    if args.bench == "scale":   # plain functions: no Ray (ffcv only for its file types)
        from .scale import run as bench_scale

        return bench_scale(args)
    from .data import run as bench_data
    from .recovery import run as bench_recovery
    from .stage import bench_stage

    return {"stage": bench_stage, "loader": bench_loader, "train": bench_train,
            "data": bench_data, "recovery": bench_recovery}[args.bench](args)


def staged_sample(work: str, *, source: str | None, classes: int, train_per_class: int,
                  val_per_class: int, max_resolution: int, shard_size: int = 1024) -> tuple[str, str]:
    """(source, staged dataset) in `work`: sample data made when no source is given, staged
    on a local Ray that is shut down again."""
    import ray

    from ..config import StageConfig
    from ..data.sample_data import generate
    from ..data.stage import stage

    if not source:
        source = os.path.join(work, "src")
        generate(source, "folders", classes=classes, train_per_class=train_per_class,
                 val_per_class=val_per_class)
    staged = os.path.join(work, "staged")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             logging_level="WARNING")
    try:
        stage(StageConfig(source=source, dest=staged, max_resolution=max_resolution,
                          shard_size=shard_size,
                          splits=["train", "val"] if val_per_class else ["train"]), progress=False)
    finally:
        ray.shutdown()
    return source, staged


def node_copy(staged: str, split: str, cache: str) -> str:
    """The local .beton a worker reads for `split` (the node cache holding every shard)."""
    from ..data.manifest import read_manifest
    from ..data.node_cache import NodeSplit
    from ..storage import Storage

    storage = Storage()
    manifest = read_manifest(storage, staged)
    node = NodeSplit(storage, staged, manifest, split, cache)
    node.ensure([s.path for s in manifest.splits[split].shards])
    return str(node.path)


def bench_loader(args) -> int:
    from .loader import run

    rows, threads = run(args)
    rate = {r["loader"]: r["images_per_s"] for r in rows}
    ours, ffcv = rate["pipeline TrainLoader (node cache file)"], rate["bare FFCV Loader (same .beton)"]
    folder, decode = rate["torchvision ImageFolder + DataLoader"], rate["full JPEG decode, no augmentation"]
    for r in rows:
        r["x_imagefolder"] = round(r["images_per_s"] / folder, 2)
    say(_table(rows, ["loader", "images_per_s", "x_imagefolder"]))
    ratios = {"ours_vs_ffcv": round(ours / ffcv, 3), "ours_vs_imagefolder": round(ours / folder, 2),
              "ffcv_vs_imagefolder": round(ffcv / folder, 2),
              "ours_vs_decode_limit": round(ours / decode, 2)}
    say(f"threads: {threads}, res {args.res}, batch {args.batch_size}; " +
          ", ".join(f"{k} {v}" for k, v in ratios.items()))
    say("goals: ours >= 0.95 x bare FFCV and >= 2.5 x ImageFolder")
    say(json.dumps({"bench": "loader", "threads": threads, "rows": rows, **ratios}))
    return 0


def bench_train(args) -> int:
    from .train import run

    result = run(args)
    say(_table(result["rows"], ["launcher", "run", "s_per_step"]))
    say(f"median s/step: ray {result['ray_s_per_step']:.4f}, torchrun "
          f"{result['torchrun_s_per_step']:.4f}; ray/torchrun = {result['ratio']:.3f} "
          "(goal <= 1.03)")
    say(json.dumps({"bench": "train", **result}))
    return 0


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] +
                     [line([r.get(c, "") for c in columns]) for r in rows])
