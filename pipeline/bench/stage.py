"""`pipeline bench stage`: images/s staging with 1 and 2 Ray workers vs FFCV's own writer, and the
bytes read from the source when staging ImageNet's original-tars layout from an S3 server (the
same images as tars, on a local SeaweedFS started for the bench), per image and per archive
byte, with the time listing the archives took."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from ..console import say

from . import _table


def ffcv_writer_rate(source_uri: str, max_resolution: int) -> tuple[int, float]:
    """FFCV's own DatasetWriter (num_workers=1) over the same images, decoded with PIL as in
    ffcv-imagenet's write_imagenet.py (ImageFolder-style)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from PIL import Image

    from ..data.source import discover
    from ..storage import Storage, join

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


def tars_on_s3(work: str, classes: int, train_per_class: int):
    """The sample images as ImageNet's original tars (val ~1/25 of train, as in ImageNet) on a
    SeaweedFS started here; its endpoint and keys go to this process's environment, which the
    Ray workers started after it inherit. Returns (server, source URI)."""
    from ..data.sample_data import generate
    from ..ops.local_services import start_seaweedfs
    from ..storage import S3Settings, Storage

    local = os.path.join(work, "tars")
    generate(local, "tars", classes=classes, train_per_class=train_per_class,
             val_per_class=max(1, train_per_class // 25))
    server = start_seaweedfs(os.path.join(work, "s3"), buckets=("bench",))
    os.environ.update(server.env())
    store = Storage(S3Settings.from_env())
    for rel, _ in Storage().list(local):
        store.upload_file(os.path.join(local, rel), f"s3://bench/tars/{rel}")
    return server, "s3://bench/tars"


def source_row(name: str, summary: dict) -> dict:
    images = sum(summary["splits"].values())
    read, size = summary["source_bytes_read"], summary["source_bytes"]
    return {"source": name, "images": images, "archive_MB": round(size / 1e6, 2),
            "read_MB": round(read / 1e6, 2), "read_KB_per_image": round(read / images / 1e3, 1),
            "read_per_archive_byte": round(read / size, 3), "listing_s": summary["listing_seconds"]}


def bench_stage(args) -> int:
    import ray

    from ..config import StageConfig
    from ..data.sample_data import generate
    from ..data.stage import stage

    os.environ.setdefault("TQDM_DISABLE", "1")
    work = tempfile.mkdtemp(prefix="pipeline-bench-")
    server = None
    try:
        source = args.source
        if not source:
            source = os.path.join(work, "src")
            generate(source, "folders", classes=args.classes,
                     train_per_class=args.train_per_class, val_per_class=0)
            server, tars = tars_on_s3(work, args.classes, args.train_per_class)
        ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False,
                 logging_level="WARNING")
        def config(dest, workers=0):
            return StageConfig(source=source, dest=os.path.join(work, dest), splits=["train"],
                               max_resolution=args.max_resolution, shard_size=args.shard_size,
                               workers=workers)

        # Warm-up: start the Ray workers and import ffcv in them before anything is timed.
        stage(config("warmup"), progress=False)
        rows = []
        for n in args.workers:
            best = None
            for r in range(args.repeats):
                res = stage(config(f"w{n}-{r}", n), progress=False)
                rate = res.images / res.seconds
                best = max(best or 0, rate)
            rows.append({"writer": f"pipeline stage, {n} Ray worker(s)", "workers": n,
                         "images": res.images, "images_per_s": round(best, 1)})
        reads = [source_row(f"{source} (train split)", res.summary())]
        if server:
            tars_res = stage(StageConfig(source=tars, dest=os.path.join(work, "tars-staged"),
                                         max_resolution=args.max_resolution,
                                         shard_size=args.shard_size), progress=False)
            reads = [source_row("the same images as ImageNet's tars, on local S3",
                                tars_res.summary())]
        ray.shutdown()
        if not args.source or not args.source.startswith("s3://"):
            n_img, secs = ffcv_writer_rate(source, args.max_resolution)
            rows.append({"writer": "ffcv DatasetWriter (1 process, PIL)", "workers": 1,
                         "images": n_img, "images_per_s": round(n_img / secs, 1)})
        one = next(r["images_per_s"] for r in rows if r["workers"] == 1)
        for r in rows:
            r["x_vs_1_worker"] = round(r["images_per_s"] / one, 2)
        say(_table(rows, ["writer", "workers", "images", "images_per_s", "x_vs_1_worker"]))
        cores = os.cpu_count()
        say(f"cores: {cores}; goal: {cores} workers >= {0.9 * cores:.1f} x one worker")
        say("")
        say(_table(reads, ["source", "images", "archive_MB", "read_MB", "read_KB_per_image",
                           "read_per_archive_byte", "listing_s"]))
        say("bytes read from the source, counted where they are read; goal: <= 1.1 x the archives")
        say(json.dumps({"bench": "stage", "cores": cores, "rows": rows, "source_reads": reads}))
        return 0
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
