"""`pipeline bench ...`: benchmarks that print a table and one JSON line (never timed tests)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time


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


def main(args) -> int:
    return {"stage": bench_stage, "loader": bench_loader, "train": bench_train}[args.bench](args)


def bench_loader(args) -> int:
    from .bench_loader import run

    rows, threads = run(args)
    rate = {r["loader"]: r["images_per_s"] for r in rows}
    ours, ffcv = rate["pipeline TrainLoader (merged cache)"], rate["bare FFCV Loader (same .beton)"]
    folder, decode = rate["torchvision ImageFolder + DataLoader"], rate["full JPEG decode, no augmentation"]
    for r in rows:
        r["x_imagefolder"] = round(r["images_per_s"] / folder, 2)
    print(_table(rows, ["loader", "images_per_s", "x_imagefolder"]))
    ratios = {"ours_vs_ffcv": round(ours / ffcv, 3), "ours_vs_imagefolder": round(ours / folder, 2),
              "ffcv_vs_imagefolder": round(ffcv / folder, 2),
              "ours_vs_decode_limit": round(ours / decode, 2)}
    print(f"threads: {threads}, res {args.res}, batch {args.batch_size}; " +
          ", ".join(f"{k} {v}" for k, v in ratios.items()))
    print("goals: ours >= 0.95 x bare FFCV and >= 2.5 x ImageFolder")
    print(json.dumps({"bench": "loader", "threads": threads, "rows": rows, **ratios}))
    return 0


def bench_train(args) -> int:
    from .bench_train import run

    result = run(args)
    print(_table(result["rows"], ["launcher", "run", "s_per_step"]))
    print(f"median s/step: ray {result['ray_s_per_step']:.4f}, torchrun "
          f"{result['torchrun_s_per_step']:.4f}; ray/torchrun = {result['ratio']:.3f} "
          "(goal <= 1.03)")
    print(json.dumps({"bench": "train", **result}))
    return 0


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] +
                     [line([r.get(c, "") for c in columns]) for r in rows])


def ffcv_writer_rate(source_uri: str, max_resolution: int) -> tuple[int, float]:
    """FFCV's own DatasetWriter (num_workers=1) over the same images, decoded with PIL as in
    ffcv-imagenet's write_imagenet.py (ImageFolder-style)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from PIL import Image

    from .imagenet_source import discover
    from .storage import Storage, join

    src = discover(Storage(), source_uri, splits=["train"])
    labels = {w: i for i, w in enumerate(src.classes)}
    items = [(join(source_uri, im.blob), labels[im.wnid]) for im in src.splits["train"]]

    class Folder:
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            path, label = items[i]
            with Image.open(path) as im:
                return im.convert("RGB"), label

    with tempfile.TemporaryDirectory() as tmp:
        writer = DatasetWriter(os.path.join(tmp, "all.beton"), {
            "image": RGBImageField(write_mode="proportion", max_resolution=max_resolution,
                                   jpeg_quality=90, compress_probability=0.5),
            "label": IntField()}, num_workers=1)
        t = time.perf_counter()
        writer.from_indexed_dataset(Folder(), chunksize=100)
        return len(items), time.perf_counter() - t


def bench_stage(args) -> int:
    import ray

    from .manifest import WriterSettings
    from .sample_data import generate
    from .stage import stage

    os.environ.setdefault("TQDM_DISABLE", "1")
    work = tempfile.mkdtemp(prefix="pipeline-bench-")
    try:
        source = args.source
        if not source:
            source = os.path.join(work, "src")
            generate(source, "folders", classes=args.classes,
                     train_per_class=args.train_per_class, val_per_class=0)
        ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False,
                 logging_level="WARNING")
        writer = WriterSettings(max_resolution=args.max_resolution)
        # Warm-up: start the Ray workers and import ffcv in them before anything is timed.
        stage(source, os.path.join(work, "warmup"), splits=["train"], writer=writer,
              shard_size=args.shard_size, progress=False)
        rows = []
        for n in args.workers:
            best = None
            for r in range(args.repeats):
                res = stage(source, os.path.join(work, f"w{n}-{r}"), splits=["train"],
                            writer=writer, shard_size=args.shard_size, workers=n, progress=False)
                rate = res.images / res.seconds
                best = max(best or 0, rate)
            rows.append({"writer": f"pipeline stage, {n} Ray worker(s)", "workers": n,
                         "images": res.images, "images_per_s": round(best, 1)})
        ray.shutdown()
        if not args.source or not args.source.startswith("s3://"):
            n_img, secs = ffcv_writer_rate(source, args.max_resolution)
            rows.append({"writer": "ffcv DatasetWriter (1 process, PIL)", "workers": 1,
                         "images": n_img, "images_per_s": round(n_img / secs, 1)})
        one = next(r["images_per_s"] for r in rows if r["workers"] == 1)
        for r in rows:
            r["x_vs_1_worker"] = round(r["images_per_s"] / one, 2)
        print(_table(rows, ["writer", "workers", "images", "images_per_s", "x_vs_1_worker"]))
        cores = os.cpu_count()
        print(f"cores: {cores}; goal: {cores} workers >= {0.9 * cores:.1f} x one worker")
        print(json.dumps({"bench": "stage", "cores": cores, "rows": rows}))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
