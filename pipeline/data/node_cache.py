"""The node-local copy of a staged dataset that training reads.

Each node downloads every shard of a split once (the first worker to arrive does it under a file
lock; the others wait and reuse it), checks each against the manifest's sha256, and merges the
shards of the split into one local .beton. One file per split lets a single FFCV Loader do what the
FFCV recipe does: a fresh distributed permutation of the whole split every epoch, equal step counts
on every rank, no per-shard loader start-up.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from filelock import FileLock

from ..errors import UserError
from ..storage import Storage, join, sha256_file
from .manifest import ShardManifest


def cache_root(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("PIPELINE_CACHE_DIR") or "/tmp/pipeline-cache")


def dataset_key(data_uri: str, manifest: ShardManifest) -> str:
    return hashlib.sha256(f"{data_uri.rstrip('/')}\n{manifest.plan}".encode()).hexdigest()[:16]


def local_split(storage: Storage, data_uri: str, manifest: ShardManifest, split: str,
                cache_dir: str = "") -> Path:
    """Path of one local .beton holding the whole split; downloads and merges at most once per node."""
    if split not in manifest.splits or not manifest.splits[split].shards:
        raise UserError(f"{data_uri}: the staged dataset has no '{split}' split; stage it with "
                        f"--splits {split}")
    folder = cache_root(cache_dir) / dataset_key(data_uri, manifest)
    merged, done = folder / f"{split}.beton", folder / f"{split}.done"
    expected = [s.sha256 for s in manifest.splits[split].shards]

    def ready() -> bool:
        try:
            return json.loads(done.read_text()) == expected and merged.exists()
        except (OSError, ValueError):
            return False

    if ready():
        return merged
    with FileLock(folder / f"{split}.lock"):
        if ready():
            return merged
        local = []
        for shard in manifest.splits[split].shards:
            path = folder / "shards" / shard.path
            if not path.exists() or path.stat().st_size != shard.bytes:
                storage.download_file(join(data_uri, shard.path), path)
            actual = sha256_file(path)
            if actual != shard.sha256:
                path.unlink()
                raise UserError(f"{join(data_uri, shard.path)}: sha256 {actual[:12]}... does not "
                                f"match the manifest ({shard.sha256[:12]}...): the shard is "
                                "corrupt; re-run `pipeline stage` with the same settings to repair it")
            local.append(path)
        tmp = folder / f".{split}.beton.part"
        merge_betons(local, tmp)
        os.replace(tmp, merged)
        done.write_text(json.dumps(expected))
        shutil.rmtree(folder / "shards" / split, ignore_errors=True)  # the merged file replaces them
    return merged


def merge_betons(paths: list[Path], out: Path) -> None:
    """Concatenate FFCV .beton files that share fields and page size into one.

    A .beton is: header | field descriptors | per-sample metadata | page-aligned data pages |
    allocation table. The data pages are copied whole; every pointer into them (the metadata's
    data_ptr of image/bytes fields, the allocation table) is shifted by where that file's pages
    now start, and sample ids by how many samples came before.
    """
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType
    from ffcv.utils import align_to_page

    readers = [Reader(str(p)) for p in paths]
    first = readers[0]
    for r in readers[1:]:
        if r.page_size != first.page_size or r.field_descriptors.tobytes() != first.field_descriptors.tobytes():
            raise UserError(f"{r.file_name}: shard has other fields or page size than "
                            f"{first.file_name}; the dataset was staged inconsistently")
    page = int(first.page_size)
    total = int(sum(int(r.num_samples) for r in readers))
    meta_start = HeaderType.itemsize + first.field_descriptors.nbytes
    data_start = align_to_page(meta_start + total * first.metadata_type.itemsize, page)
    pointer_fields = [name for name in first.metadata_type.names
                      if first.metadata_type[name].names and "data_ptr" in first.metadata_type[name].names]

    metadata, tables = [], []
    position, sample_offset = data_start, 0
    spans = []
    for r in readers:
        src_start = align_to_page(HeaderType.itemsize + r.field_descriptors.nbytes
                                  + int(r.num_samples) * r.metadata_type.itemsize, page)
        src_end = int(r.header["alloc_table_ptr"])
        shift = position - src_start
        meta = r.metadata.copy()
        for name in pointer_fields:
            meta[name]["data_ptr"] = (meta[name]["data_ptr"].astype(np.int64) + shift).astype(np.uint64)
        table = r.alloc_table.copy()
        table["sample_id"] += np.uint64(sample_offset)
        table["ptr"] = (table["ptr"].astype(np.int64) + shift).astype(np.uint64)
        metadata.append(meta)
        tables.append(table)
        spans.append((r.file_name, src_start, src_end))
        position += src_end - src_start
        sample_offset += int(r.num_samples)

    header = first.header.copy()
    header["num_samples"] = total
    header["alloc_table_ptr"] = position
    with open(out, "wb") as f:
        f.write(np.zeros(1, dtype=HeaderType).tobytes())
        f.write(first.field_descriptors.tobytes())
        f.write(np.concatenate(metadata).tobytes())
        f.write(b"\0" * (data_start - f.tell()))
        for name, start, end in spans:
            with Storage().open_range(name, start, end - start) as src:
                shutil.copyfileobj(src, f, 8 * 1024 * 1024)
        f.write(np.concatenate(tables).astype(ALLOC_TABLE_TYPE).tobytes())
        f.seek(0)
        f.write(np.array([header], dtype=HeaderType).tobytes())
