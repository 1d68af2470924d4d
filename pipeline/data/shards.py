"""Plan shards and write one FFCV .beton shard: the body of each staging Ray task.

A shard's contents depend only on the source listing and the writer settings (the plan is a
seeded, hash-ordered shuffle), and the writer itself is seeded per shard, so the same inputs give
byte-identical shards. That is what makes re-runs verifiable: each finished shard leaves a small
record (samples, bytes, sha256, plan fingerprint) under DEST/.parts/, written only after the shard
itself is in place; a shard without a matching record, or whose bytes no longer hash to it, is
written again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import WriterSettings
from ..errors import UserError
from ..storage import Storage, join, sha256_file
from .images import BadImage, decode_rgb, max_bytes
from .source import Source, SourceImage

PARTS = ".parts"
FETCH_THREADS = 8
# Measured on a staging worker: ~410 MB private after importing Ray, FFCV and torch, and up to
# 11 bytes per pixel while PIL decodes a PNG or a 16-bit image into RGB (a JPEG is decoded at a
# reduced scale and needs far less).
TASK_BASE_BYTES = 512 * 1024 * 1024
DECODE_BYTES_PER_PIXEL = 12


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    images: tuple[SourceImage, ...]
    labels: tuple[int, ...]
    fingerprint: str

    @property
    def path(self) -> str:
        return f"{self.split}/shard-{self.index:05d}.beton"

    @property
    def record_path(self) -> str:
        return f"{PARTS}/{self.split}/shard-{self.index:05d}.json"


def plan_shards(source: Source, writer: WriterSettings, shard_size: int, seed: int = 0) -> list[ShardPlan]:
    """Shuffle each split deterministically (by a hash of seed and path, so the order does not
    depend on listing order or library versions) and cut it into shards of shard_size images."""
    label = {wnid: i for i, wnid in enumerate(source.classes)}
    settings = writer.model_dump()
    plans = []
    for split, images in sorted(source.splits.items()):
        order = sorted(images, key=lambda im: hashlib.sha256(f"{seed}:{im.path}".encode()).digest())
        for index, start in enumerate(range(0, len(order), shard_size)):
            chunk = tuple(order[start:start + shard_size])
            labels = tuple(label[im.wnid] for im in chunk)
            ident = json.dumps([settings, seed, split, index,
                                [(im.path, im.size, lab) for im, lab in zip(chunk, labels)]])
            plans.append(ShardPlan(split, index, chunk, labels,
                                   hashlib.sha256(ident.encode()).hexdigest()))
    return plans


def plan_digest(plans: list[ShardPlan], classes: list[str]) -> str:
    h = hashlib.sha256(json.dumps(classes).encode())
    for p in plans:
        h.update(p.fingerprint.encode())
    return h.hexdigest()


def shard_task_memory(plan: ShardPlan, writer: WriterSettings) -> int:
    """Bytes a shard task holds at its peak, what it asks Ray for: the worker itself, every
    image of the shard decoded (at most max_resolution on the long side, 3 bytes a pixel) until
    the shard is written, every fetched file (fetching may run ahead of decoding), and the one
    image being decoded (bounded by max_image_pixels)."""
    limit = max_bytes(writer.max_image_pixels)
    decoded = len(plan.images) * writer.max_resolution ** 2 * 3
    fetched = sum(im.size for im in plan.images if im.size <= limit)   # larger: never fetched
    return TASK_BASE_BYTES + decoded + fetched + DECODE_BYTES_PER_PIXEL * writer.max_image_pixels


def check_memory_fits(needed: int, node_memory: list[float], shard_size: int) -> None:
    """Refuse, in words, a shard task no node has the memory for (Ray would wait forever)."""
    largest = max(node_memory, default=0)
    if needed > largest:
        raise UserError(f"a shard task needs about {needed / 2**30:.1f} GiB of memory (a shard of "
                        f"{shard_size} images decoded at --max-resolution, plus one image at "
                        f"--max-image-pixels), but the largest node offers Ray "
                        f"{largest / 2**30:.1f} GiB: lower --shard-size or --max-resolution")


def write_beton(path: str | Path, images: list[np.ndarray], labels: list[int],
                writer: WriterSettings, seed: int) -> None:
    """Write images + labels as one FFCV .beton with FFCV's own fields and page allocator.

    FFCV's DatasetWriter forks worker processes and polls them; inside a Ray task a plain
    in-process loop over the same pieces is simpler and lets the JPEG-or-raw choice of
    `proportion` mode be seeded, so the bytes are reproducible.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter, handle_sample

    fields = {
        "image": RGBImageField(write_mode="proportion", max_resolution=writer.max_resolution,
                               jpeg_quality=writer.jpeg_quality,
                               compress_probability=writer.compress_probability),
        "label": IntField(),
    }
    # A page must hold the largest raw image; 2 MiB (FFCV's minimum) fits 512 px.
    page_size = 1 << max(21, int(np.ceil(np.log2(writer.max_resolution ** 2 * 3 + 4096))))
    ds = DatasetWriter(str(path), fields, page_size=page_size, num_workers=1)
    ds.num_samples = len(images)
    ds.prepare()
    metadata = np.frombuffer(ds.metadata_sm.buf, dtype=ds.metadata_type)
    allocator = MemoryAllocator(ds.fname, ds.data_region_start, ds.page_size)
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        with allocator:
            for i, sample in enumerate(zip(images, labels)):
                handle_sample(sample, i, ds.metadata_type.names, metadata, allocator, fields)
    finally:
        np.random.set_state(saved)
    del metadata
    ds.finalize(allocator.allocations)
    ds.metadata_sm.close()
    ds.metadata_sm.unlink()


def read_record(storage: Storage, uri: str) -> dict | None:
    if storage.size(uri) is None:
        return None
    try:
        return json.loads(storage.read_bytes(uri))
    except ValueError:
        return None  # a damaged record is as good as none: the shard is redone


def verified_record(storage: Storage, dest: str, plan: ShardPlan) -> dict | None:
    """The shard's record if the shard at dest is exactly the one this plan produces."""
    record = read_record(storage, join(dest, plan.record_path))
    if not record or record.get("fingerprint") != plan.fingerprint:
        return None
    if record["samples"] == 0:
        return record
    shard_uri = join(dest, plan.path)
    if storage.size(shard_uri) != record["bytes"] or storage.sha256(shard_uri) != record["sha256"]:
        return None
    return record


def stage_shard(plan: ShardPlan, source_uri: str, dest: str, writer: WriterSettings,
                storage: Storage) -> dict:
    """Make sure dest holds this plan's shard; returns its record plus whether it was written."""
    record = verified_record(storage, dest, plan)
    if record is not None:
        return {"record": record, "written": False}

    limit = max_bytes(writer.max_image_pixels)
    source = storage.tally()   # counts what this shard reads from the source

    def fetch(im: SourceImage) -> bytes | None:
        if im.size > limit:   # never hold a file that could not be decoded within the bound
            return None
        return source.read_bytes(join(source_uri, im.blob), im.offset, im.size)

    images, labels, skipped = [], [], []
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        for im, label, data in zip(plan.images, plan.labels, pool.map(fetch, plan.images)):
            try:
                if data is None:
                    raise BadImage(f"file of {im.size} bytes is over the bound of {limit} "
                                   f"(max_image_pixels {writer.max_image_pixels})")
                images.append(decode_rgb(data, writer.max_resolution, writer.max_image_pixels))
                labels.append(label)
            except BadImage as exc:
                skipped.append({"path": im.path, "reason": str(exc)})
    record = {"path": plan.path, "samples": len(images), "bytes": 0, "sha256": "",
              "fingerprint": plan.fingerprint, "skipped": skipped,
              "source_bytes": source.bytes_read}
    if images:
        with tempfile.TemporaryDirectory(prefix="pipeline-shard-") as tmp:
            local = os.path.join(tmp, "shard.beton")
            seed = int(plan.fingerprint[:8], 16)
            write_beton(local, images, labels, writer, seed)
            record["bytes"] = os.path.getsize(local)
            record["sha256"] = sha256_file(local)
            storage.upload_file(local, join(dest, plan.path))
    storage.write_bytes(join(dest, plan.record_path), json.dumps(record).encode())
    return {"record": record, "written": True, "source_gets": source.requests["get"]}
