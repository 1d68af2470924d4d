"""Growing a node file in time linear in what it holds: where a fetch's shards and the allocation
table go, and the commits that make them visible.

FFCV reads a file as header, field descriptors, the metadata of every sample, data pages, and the
allocation table from alloc_table_ptr to the end of the file. The metadata region is reserved for
the whole split when the file is made, so a commit writes only its new samples' rows there. A
fetch places the table once, after room for the data of every shard it will fetch; each commit
writes its shards' data below the table and appends their table rows at the end of the file, so
a commit writes its own shards and nothing else, and a complete fetch leaves no dead byte. Only a
later fetch whose shards do not fit below the table moves the table after the old one: the old
table (and any gap below it) is dead from then on, once per such fetch, and the room check counts
it. The old view stays valid until the header switches: a crash anywhere is cut back to it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

STATE_VERSION = 2   # 1: the structure digest hashed the whole metadata and table (still read)


@dataclass
class Layout:
    """Where things are in one shard file."""

    header: np.ndarray
    descriptors: bytes
    meta_start: int
    num_samples: int
    data_start: int
    data_end: int
    size: int


@dataclass
class Held:
    """A shard held in the node file: its samples and its data pages there."""

    path: str
    sha256: str
    first: int
    samples: int
    data_start: int
    data_end: int


@dataclass
class State:
    version: int
    split: str
    capacity: int
    page_size: int
    num_samples: int
    logical_end: int
    structure_sha256: str
    shards: list[Held] = field(default_factory=list)
    table_ptr: int = 0   # where the allocation table starts (version 1: read from the header)
    dead_bytes: int = 0  # bytes of the file that hold nothing (old tables, unused gaps)

    @classmethod
    def load(cls, text: str) -> "State | None":
        try:
            raw = json.loads(text)
            raw["shards"] = [Held(**s) for s in raw["shards"]]
            state = cls(**raw)
        except (ValueError, TypeError, KeyError):
            return None
        return state if state.version in (1, STATE_VERSION) else None

    def to_json(self) -> str:
        # vars(), not asdict(): asdict deep-copies every Held, at every commit
        return json.dumps({**vars(self), "shards": [vars(h) for h in self.shards]})


class Digest:
    """The structure digest of a file, kept current as rows are appended: sha256 over the header,
    the descriptors and the sha256 of the metadata rows and of the table rows (so a commit hashes
    its own rows only)."""

    def __init__(self, descriptors: bytes, meta: bytes = b"", table: bytes = b""):
        self.descriptors = descriptors
        self.meta, self.table = hashlib.sha256(meta), hashlib.sha256(table)

    def add(self, meta: bytes, table: bytes) -> None:
        self.meta.update(meta)
        self.table.update(table)

    def hexdigest(self, header: np.ndarray) -> str:
        h = hashlib.sha256(header.tobytes())
        h.update(self.descriptors)
        h.update(self.meta.digest())
        h.update(self.table.digest())
        return h.hexdigest()


def digest_v1(header: np.ndarray, descriptors: bytes, meta: np.ndarray, table: np.ndarray) -> str:
    h = hashlib.sha256(header.tobytes())
    for part in (descriptors, meta.tobytes(), table.tobytes()):
        h.update(part)
    return h.hexdigest()


class FileIO:
    """The node file's descriptor, as the commits use it."""

    def __init__(self, fd: int):
        self.fd = fd

    def pwrite(self, data: bytes, offset: int) -> None:
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def pread(self, size: int, offset: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            chunk = os.pread(self.fd, size - len(out), offset + len(out))
            if not chunk:
                raise OSError(f"the node file ends before byte {offset + size}")
            out += chunk
        return bytes(out)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def sync(self) -> None:
        os.fsync(self.fd)


def align(n: int, page: int) -> int:
    return n if n % page == 0 else n + page - n % page


def ffcv_types():
    from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType, get_handlers, get_metadata_type

    return ALLOC_TABLE_TYPE, FieldDescType, HeaderType, get_handlers, get_metadata_type


def data_end(state: State, meta_end: int, page: int) -> int:
    """The first free page after the data the file holds."""
    return align(max([h.data_end for h in state.shards], default=meta_end), page)


class Filler:
    """One fetch into the node file: the data's places (planned once) and the commits."""

    def __init__(self, io: FileIO, state: State | None, layouts: list[Layout], capacity: int,
                 split: str, digest: Digest | None):
        ALLOC, FieldDesc, Header, get_handlers, get_metadata_type = ffcv_types()
        first = layouts[0]
        self.io, self.state, self.split, self.capacity = io, state, split, capacity
        self.page = int(first.header["page_size"])
        self.descriptors = first.descriptors
        self.meta_type = get_metadata_type(list(get_handlers(np.frombuffer(self.descriptors, FieldDesc))))
        self.meta_offset = Header.itemsize + len(self.descriptors)
        meta_end = align(self.meta_offset + capacity * self.meta_type.itemsize, self.page)
        spans = [align(lay.data_end - lay.data_start, self.page) for lay in layouts]
        self.digest = digest or Digest(self.descriptors)
        self.old_table = 0         # bytes of table rows to carry to a moved table
        if state is None:
            start = meta_end
            self.table_ptr = self.table_end = start + sum(spans)
            self.dead = 0
        else:
            start = data_end(state, meta_end, self.page)
            self.dead = state.dead_bytes
            if start + sum(spans) <= state.table_ptr:   # fits below the table: it stays
                self.table_ptr, self.table_end = state.table_ptr, state.logical_end
            else:   # after the old table, which stays valid until the header switches
                self.dead += state.logical_end - start
                start = align(state.logical_end, self.page)
                self.old_table = state.logical_end - state.table_ptr
                self.table_ptr = start + sum(spans)
                self.table_end = self.table_ptr
        self.targets = list(np.cumsum([start] + spans[:-1])) if spans else []

    def room(self) -> int:
        """Bytes this fetch adds to the disk at most beyond its shards' own: a moved table."""
        return self.old_table

    def commit(self, layouts: list[Layout], targets: list[int], parts: list[tuple[bytes, bytes]],
               shards: list, stats) -> State:
        """Make the shards whose data is in place (their metadata and table in `parts`) part of
        the file: new rows, then the header, fsynced in that order."""
        ALLOC, FieldDesc, Header, _, _ = ffcv_types()
        state, mt = self.state, self.meta_type
        count = state.num_samples if state else 0
        held = list(state.shards) if state else []
        metas, tables = [], []
        if self.old_table:   # the first commit after a move: the old rows go first
            tables.append(np.frombuffer(self.io.pread(self.old_table, state.table_ptr), ALLOC))
            self.old_table = 0
        new_rows = []
        for shard, lay, target, (head, tail) in zip(shards, layouts, targets, parts):
            shift = int(target) - lay.data_start
            meta = np.frombuffer(head[lay.meta_start:lay.meta_start + lay.num_samples * mt.itemsize],
                                 mt).copy()
            for name in mt.names:
                if mt[name].names and "data_ptr" in mt[name].names:
                    meta[name]["data_ptr"] = (meta[name]["data_ptr"].astype(np.int64)
                                              + shift).astype(np.uint64)
            table = np.frombuffer(tail, ALLOC).copy()
            table["sample_id"] += np.uint64(count)
            table["ptr"] = (table["ptr"].astype(np.int64) + shift).astype(np.uint64)
            metas.append(meta)
            new_rows.append(table)
            held.append(Held(shard.path, shard.sha256, count, lay.num_samples, int(target),
                             int(target) + lay.data_end - lay.data_start))
            count += lay.num_samples
            stats.shards_fetched += 1
            stats.bytes_downloaded += shard.bytes
        meta_bytes = np.concatenate(metas).astype(mt).tobytes()
        new_table = np.concatenate(new_rows).astype(ALLOC).tobytes()
        rows = b"".join(t.tobytes() for t in tables) + new_table
        self.digest.add(meta_bytes, new_table)
        header = layouts[0].header.copy()
        header["num_samples"] = count
        header["alloc_table_ptr"] = self.table_ptr
        first = state.num_samples if state else 0
        self.io.pwrite(meta_bytes, self.meta_offset + first * mt.itemsize)
        if state is None:
            self.io.pwrite(self.descriptors, Header.itemsize)
        self.io.pwrite(rows, self.table_end)
        self.table_end += len(rows)
        self.io.truncate(self.table_end)
        self.io.sync()
        self.io.pwrite(header.tobytes(), 0)   # the switch to the new view
        self.io.sync()
        self.state = State(STATE_VERSION, self.split, self.capacity, self.page, count,
                           self.table_end, self.digest.hexdigest(header), held, self.table_ptr,
                           self.dead)
        return self.state


def commit_batches(shards: list, limit: int) -> list[list]:
    """Consecutive groups of shards of about `limit` bytes (at least one shard each)."""
    out: list[list] = []
    size = limit
    for shard in shards:
        if size >= limit:
            out.append([])
            size = 0
        out[-1].append(shard)
        size += shard.bytes
    return out


def fill(filler: Filler, shards: list, layouts: list[Layout], batches: list[list],
         stream: Callable[[list, list[Layout], list[int]], list[tuple[bytes, bytes]]],
         save: Callable[[State], None], stats) -> State:
    """Fetch `shards` batch by batch: stream each batch into its places, commit, save the state
    (last: only then does the file hold the batch)."""
    where = {s.path: (lay, t) for s, lay, t in zip(shards, layouts, filler.targets)}
    state = filler.state
    for batch in batches:
        lays = [where[s.path][0] for s in batch]
        targets = [where[s.path][1] for s in batch]
        parts = stream(batch, lays, targets)
        state = filler.commit(lays, targets, parts, batch, stats)
        save(state)
    return state


class CountingIO:
    """A node file that writes nothing: it counts the bytes each commit would write and read, and
    keeps where they went (what is allocated at the end, hence what is dead)."""

    def __init__(self):
        self.written = self.read = self.size = 0
        self.extents: list[tuple[int, int]] = []

    def pwrite(self, data: bytes, offset: int) -> None:
        self.place(len(data), offset)

    def place(self, n: int, offset: int) -> None:
        self.written += n
        self.extents.append((offset, offset + n))
        self.size = max(self.size, offset + n)

    def pread(self, size: int, offset: int) -> bytes:
        self.read += size
        return bytes(size)

    def truncate(self, size: int) -> None:
        self.size = size

    def sync(self) -> None:
        pass

    def allocated(self) -> int:
        total, lo, hi = 0, 0, 0
        for a, b in sorted(self.extents):
            a, b = min(a, self.size), min(b, self.size)
            if a > hi:
                total, lo = total + hi - lo, a
            hi = max(hi, b)
        return total + hi - lo


def fill_overhead(split_bytes: int, samples: int, commit_bytes: int, shard_samples: int = 1024,
                  page_size: int = 1 << 21, disk_bytes_per_s: float = 1e9,
                  download_bytes_per_s: float = 1e9) -> dict:
    """What filling a cold node with a whole split costs beyond its shards' data, through the real
    planning and commit code (Filler, fill) on a CountingIO and synthetic FFCV shard layouts
    (RGB image + int label, as data/shards.py writes them): commits, bytes written again, dead
    bytes, and that overhead in seconds at `disk_bytes_per_s` against the download at
    `download_bytes_per_s`."""
    from types import SimpleNamespace

    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import TYPE_ID_HANDLER

    ALLOC, FieldDesc, Header, get_handlers, get_metadata_type = ffcv_types()
    fields = [("image", RGBImageField()), ("label", IntField())]
    desc = np.zeros(len(fields), FieldDesc)
    type_ids = {v: k for k, v in TYPE_ID_HANDLER.items()}
    for i, (name, f) in enumerate(fields):
        desc[i]["type_id"] = type_ids[type(f)]
        desc[i]["name"][:len(name)] = np.frombuffer(name.encode(), "u1")
    descriptors = desc.tobytes()
    mt = get_metadata_type(list(get_handlers(desc)))
    count = -(-samples // shard_samples)
    shards, layouts = [], []
    for i in range(count):
        n = min(shard_samples, samples - i * shard_samples)
        size = split_bytes // count
        header = np.zeros(1, Header)[0]
        header["num_samples"], header["page_size"], header["num_fields"] = n, page_size, len(fields)
        meta_start = Header.itemsize + len(descriptors)
        header["alloc_table_ptr"] = size - n * ALLOC.itemsize
        layouts.append(Layout(header, descriptors, meta_start, n,
                              align(meta_start + n * mt.itemsize, page_size),
                              int(header["alloc_table_ptr"]), size))
        shards.append(SimpleNamespace(path=f"train/shard-{i:05d}.beton", samples=n, bytes=size,
                                      sha256="0" * 64))
    io = CountingIO()

    def stream(batch, lays, targets):
        parts = []
        for lay, target in zip(lays, targets):
            io.place(lay.data_end - lay.data_start, int(target))
            table = np.zeros(lay.num_samples, ALLOC)
            table["sample_id"] = np.arange(lay.num_samples)
            table["ptr"], table["size"] = lay.data_start, 1
            parts.append((bytes(lay.meta_start + lay.num_samples * mt.itemsize), table.tobytes()))
        return parts

    saved = SimpleNamespace(bytes=0, commits=0)

    def save(state: State) -> None:
        saved.bytes += len(state.to_json())
        saved.commits += 1

    batches = commit_batches(shards, commit_bytes)
    stats = SimpleNamespace(shards_fetched=0, bytes_downloaded=0)
    filler = Filler(io, None, layouts, samples, "train", None)
    state = fill(filler, shards, layouts, batches, stream, save, stats)
    data = sum(h.data_end - h.data_start for h in state.shards)
    live = (Header.itemsize + len(descriptors) + samples * mt.itemsize + data
            + samples * ALLOC.itemsize)
    overhead = io.written - data + io.read + saved.bytes
    overhead_s = overhead / disk_bytes_per_s
    download_s = split_bytes / download_bytes_per_s
    return {"split_bytes": split_bytes, "samples": samples, "shards": count,
            "commits": saved.commits, "data_bytes": data,
            "bytes_rewritten": io.written - live, "bytes_read_back": io.read,
            "state_file_bytes": saved.bytes, "dead_bytes": io.allocated() - live,
            "counted_dead_bytes": state.dead_bytes, "file_bytes": io.size,
            "overhead_bytes": overhead, "overhead_s": round(overhead_s, 2),
            "download_s": round(download_s, 1),
            "overhead_pct": round(100 * overhead_s / download_s, 3),
            "disk_bytes_per_s": disk_bytes_per_s, "download_bytes_per_s": download_bytes_per_s}
