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


def main(args) -> int:
    return {"stage": bench_stage}[args.bench](args)


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
