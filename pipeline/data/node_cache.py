"""A node's local copy of the shards its workers read, as one FFCV file per split.

Each node holds the shards assigned to it (all of them in the global placement, about 1/N of
each split in the per-node one, data/placement.py) in one .beton per split that FFCV reads
directly. The file grows in place: a shard's data pages are streamed from storage straight to
their place at the end of the file (one sequential GET per shard, several shards at once, each
checked against the manifest's sha256 as it streams), then the metadata, the allocation table and
the header are written. There is never a second copy: the disk holds the shards plus a few MB.

When the assignment changes (a node lost and replaced, an elastic run grows) the node keeps what
it has and fetches only what it lacks. A state file beside the data records what the file holds
and a digest of its structure; it is written last, so a file whose state does not match (a
crash mid-append) is cut back to its last complete state, or rebuilt, never trusted as is.
A long fetch commits that state every COMMIT_BYTES of shards: a fetch killed halfway (a node
restarted, a worker group torn down) resumes with the shards it completed, not from zero.

The cache lives in a folder of this user only (0700): the default is not a shared /tmp path that
another user could prepare.
"""
from __future__ import annotations

import errno
import getpass
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock

from ..errors import UserError
from ..storage import Storage, join
from .manifest import ShardInfo, ShardManifest

FETCH_THREADS = 4
HEAD_BYTES = 64 * 1024
STATE_VERSION = 1
# shards fetched between two commits of the node file's state (env: for tests of a killed fetch)
COMMIT_BYTES = int(os.environ.get("PIPELINE_CACHE_COMMIT_BYTES", 1 << 30))


def cache_root(cache_dir: str = "") -> Path:
    """The node cache folder: the setting, else $PIPELINE_CACHE_DIR, else a folder of this user
    under the temp dir. It must be this user's and writable by no one else: a shared folder
    given there (/tmp, a pod's emptyDir) gets a private pipeline-<user> folder inside it."""
    root = Path(cache_dir or os.environ.get("PIPELINE_CACHE_DIR") or
                Path(tempfile.gettempdir()) / f"pipeline-cache-{getpass.getuser()}")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _private(root):
        root = root / f"pipeline-{getpass.getuser()}"
        root.mkdir(exist_ok=True, mode=0o700)
        if not _private(root):
            raise UserError(f"node cache {root} belongs to another user or can be written by "
                            "others; set --cache-dir or PIPELINE_CACHE_DIR to a folder of your own")
    return root


def _private(folder: Path) -> bool:
    st = folder.lstat()
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def dataset_key(data_uri: str, manifest: ShardManifest) -> str:
    return hashlib.sha256(f"{data_uri.rstrip('/')}\n{manifest.plan}".encode()).hexdigest()[:16]


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

    @classmethod
    def load(cls, path: Path) -> "State | None":
        try:
            raw = json.loads(path.read_text())
            raw["shards"] = [Held(**s) for s in raw["shards"]]
            state = cls(**raw)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return state if state.version == STATE_VERSION else None


@dataclass
class FetchStats:
    split: str
    shards_fetched: int = 0
    shards_kept: int = 0
    bytes_downloaded: int = 0
    file_bytes: int = 0
    seconds: float = 0.0


def _ffcv_types():
    from ffcv.types import ALLOC_TABLE_TYPE, FieldDescType, HeaderType, get_handlers, get_metadata_type

    return ALLOC_TABLE_TYPE, FieldDescType, HeaderType, get_handlers, get_metadata_type


def _align(n: int, page: int) -> int:
    return n if n % page == 0 else n + page - n % page


class NodeSplit:
    """The node file of one split of one dataset."""

    def __init__(self, storage: Storage, data_uri: str, manifest: ShardManifest, split: str,
                 cache_dir: str = ""):
        if split not in manifest.splits or not manifest.splits[split].shards:
            raise UserError(f"{data_uri}: the staged dataset has no '{split}' split; stage it "
                            f"with --splits {split}")
        self.storage, self.data_uri, self.manifest, self.split = storage, data_uri, manifest, split
        self.folder = cache_root(cache_dir) / dataset_key(data_uri, manifest)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.folder / f"{split}.beton"
        self.state_path = self.folder / f"{split}.state.json"
        self.shards = {s.path: s for s in manifest.splits[split].shards}

    # -- reading what is there ----------------------------------------------------------------
    @staticmethod
    def _structure(header: np.ndarray, descriptors: bytes, meta: np.ndarray, table: np.ndarray) -> str:
        h = hashlib.sha256(header.tobytes())
        h.update(descriptors)
        h.update(meta.tobytes())
        h.update(table.tobytes())
        return h.hexdigest()

    def _read_structure(self, state: State):
        """(header, descriptors, metadata, alloc table) as the file holds them now."""
        ALLOC, FieldDesc, Header, get_handlers, get_metadata_type = _ffcv_types()
        with open(self.path, "rb") as f:
            header = np.frombuffer(f.read(Header.itemsize), Header)[0].copy()
            descriptors = f.read(int(header["num_fields"]) * FieldDesc.itemsize)
            meta_type = get_metadata_type(list(get_handlers(np.frombuffer(descriptors, FieldDesc))))
            meta = np.frombuffer(f.read(int(header["num_samples"]) * meta_type.itemsize), meta_type)
            f.seek(int(header["alloc_table_ptr"]))
            table = np.frombuffer(f.read(state.logical_end - int(header["alloc_table_ptr"])), ALLOC)
        return header, descriptors, meta, table

    def current(self) -> State | None:
        """What the file holds, if its state and its structure agree; a file grown past its last
        complete state (a crash mid-append) is cut back to it."""
        state = State.load(self.state_path)
        if state is None or not self.path.exists():
            return None
        if self.path.stat().st_size < state.logical_end:
            return None
        if self.path.stat().st_size > state.logical_end:
            os.truncate(self.path, state.logical_end)
        try:
            header, descriptors, meta, table = self._read_structure(state)
        except (OSError, ValueError, KeyError):
            return None
        if int(header["num_samples"]) != state.num_samples or \
                self._structure(header, descriptors, meta, table) != state.structure_sha256:
            return None
        return state

    # -- fetching -----------------------------------------------------------------------------
    def ensure(self, wanted: list[str]) -> tuple[State, FetchStats]:
        """Make the node file hold every shard in `wanted` (paths from the manifest); fetch only
        what it lacks, committing every COMMIT_BYTES. Safe to call from every worker of the
        node at once."""
        _ffcv_types()   # its first import takes seconds: not part of the fetch
        with FileLock(str(self.folder / f"{self.split}.lock")):
            started = time.monotonic()
            stats = FetchStats(self.split)
            state = self.current()
            if state is None:
                self.path.unlink(missing_ok=True)
                self.state_path.unlink(missing_ok=True)
            held = {s.path for s in state.shards} if state else set()
            missing = [self.shards[p] for p in wanted if p not in held]
            stats.shards_kept = len(set(wanted) & held)
            self._check_room(state, missing)
            for batch in _batches(missing, COMMIT_BYTES):
                state = self._append(state, batch, stats)
            stats.file_bytes = self.path.stat().st_size if self.path.exists() else 0
            stats.seconds = round(time.monotonic() - started, 2)
            return state, stats

    def _check_room(self, state: State | None, missing: list[ShardInfo]) -> None:
        """Refuse before fetching anything when the shards cannot fit (the metadata region is
        reserved for the whole split, and each commit writes a new allocation table)."""
        if not missing:
            return
        needed = sum(s.bytes for s in missing)   # each shard's data, metadata and table
        if state is None:   # a new file reserves the metadata of the whole split up front
            needed += HEAD_BYTES + 64 * self.manifest.splits[self.split].samples
        free = shutil.disk_usage(self.folder).free
        if needed > free:
            raise UserError(f"node cache {self.folder}: needs {needed} bytes for the "
                            f"{self.split} shards of this node, {free} are free; free space or "
                            "set --cache-dir to a larger disk")

    def _head(self, shard: ShardInfo) -> Layout:
        ALLOC, FieldDesc, Header, get_handlers, get_metadata_type = _ffcv_types()
        uri = join(self.data_uri, shard.path)
        head = self.storage.read_bytes(uri, 0, min(HEAD_BYTES, shard.bytes))
        header = np.frombuffer(head[:Header.itemsize], Header)[0].copy()
        end = Header.itemsize + int(header["num_fields"]) * FieldDesc.itemsize
        if len(head) < end:
            raise self._corrupt(shard, "its header is cut short")
        descriptors = head[Header.itemsize:end]
        meta_type = get_metadata_type(list(get_handlers(np.frombuffer(descriptors, FieldDesc))))
        n = int(header["num_samples"])
        data_start = _align(end + n * meta_type.itemsize, int(header["page_size"]))
        data_end = int(header["alloc_table_ptr"])
        if n != shard.samples or not data_start <= data_end <= shard.bytes:
            raise self._corrupt(shard, "its header does not match the manifest")
        return Layout(header, descriptors, end, n, data_start, data_end, shard.bytes)

    def _corrupt(self, shard: ShardInfo, why: str) -> UserError:
        return UserError(f"{join(self.data_uri, shard.path)}: {why}: the shard is corrupt; re-run "
                         "`pipeline stage` with the same settings to repair it")

    def _stream_into(self, fd: int, shard: ShardInfo, layout: Layout, target: int) -> tuple[bytes, bytes]:
        """One sequential read of the shard: its data pages go to `target` in the node file,
        its metadata and allocation table come back; every byte is hashed on the way."""
        h = hashlib.sha256()
        head, tail = bytearray(), bytearray()
        pos = 0
        for chunk in self.storage.stream(join(self.data_uri, shard.path)):
            h.update(chunk)
            end = pos + len(chunk)
            if pos < layout.data_start:
                head += chunk[:layout.data_start - pos]
            lo, hi = max(pos, layout.data_start), min(end, layout.data_end)
            if lo < hi:
                view = memoryview(chunk)[lo - pos:hi - pos]
                written = 0
                while written < len(view):
                    written += os.pwrite(fd, view[written:], target + lo - layout.data_start + written)
            if end > layout.data_end:
                tail += chunk[max(0, layout.data_end - pos):]
            pos = end
        if pos != shard.bytes or h.hexdigest() != shard.sha256:
            actual = h.hexdigest()
            raise self._corrupt(shard, f"sha256 {actual[:12]}... does not match the manifest "
                                       f"({shard.sha256[:12]}...)")
        return bytes(head), bytes(tail)

    def _append(self, state: State | None, missing: list[ShardInfo], stats: FetchStats) -> State:
        ALLOC, FieldDesc, Header, get_handlers, get_metadata_type = _ffcv_types()
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            layouts = list(pool.map(self._head, missing))
        first = layouts[0]
        page = int(first.header["page_size"])
        for shard, lay in zip(missing, layouts):
            if int(lay.header["page_size"]) != page or lay.descriptors != first.descriptors:
                raise UserError(f"{join(self.data_uri, shard.path)}: other fields or page size "
                                "than the other shards; the dataset was staged inconsistently")
        descriptors = first.descriptors
        meta_type = get_metadata_type(list(get_handlers(np.frombuffer(descriptors, FieldDesc))))
        capacity = self.manifest.splits[self.split].samples
        meta_offset = Header.itemsize + len(descriptors)

        if state is None:
            old_meta, old_table = np.zeros(0, meta_type), np.zeros(0, ALLOC)
            end = _align(meta_offset + capacity * meta_type.itemsize, page)
            held: list[Held] = []
            logical_end = 0
        else:
            if state.page_size != page:
                raise UserError(f"{self.path}: the cached copy has another page size than the "
                                "dataset; delete the node cache folder and try again")
            _, _, old_meta, old_table = self._read_structure(state)
            end = _align(state.logical_end, page)   # after the old table: the old view stays valid
            held, logical_end = list(state.shards), state.logical_end

        targets, pos = [], end
        for lay in layouts:
            targets.append(pos)
            pos = _align(pos + lay.data_end - lay.data_start, page)
        table_bytes_new = sum(lay.size - lay.data_end for lay in layouts)
        needed = pos - max(logical_end, 0) + old_table.nbytes + table_bytes_new

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                def fetch(i):
                    return self._stream_into(fd, missing[i], layouts[i], targets[i])

                # every fetch has stopped writing to fd before it is closed or truncated
                with ThreadPoolExecutor(FETCH_THREADS) as pool:
                    futures = [pool.submit(fetch, i) for i in range(len(missing))]
                    try:
                        parts = [f.result() for f in futures]
                    except BaseException:
                        for f in futures:
                            f.cancel()
                        raise
                metas, tables = [old_meta], [old_table]
                count = len(old_meta)
                for shard, lay, target, (head, tail) in zip(missing, layouts, targets, parts):
                    shift = target - lay.data_start
                    meta = np.frombuffer(head[lay.meta_start:lay.meta_start + lay.num_samples *
                                              meta_type.itemsize], meta_type).copy()
                    for name in meta_type.names:
                        if meta_type[name].names and "data_ptr" in meta_type[name].names:
                            meta[name]["data_ptr"] = (meta[name]["data_ptr"].astype(np.int64)
                                                      + shift).astype(np.uint64)
                    table = np.frombuffer(tail, ALLOC).copy()
                    table["sample_id"] += np.uint64(count)
                    table["ptr"] = (table["ptr"].astype(np.int64) + shift).astype(np.uint64)
                    metas.append(meta)
                    tables.append(table)
                    held.append(Held(shard.path, shard.sha256, count, lay.num_samples, target,
                                     target + lay.data_end - lay.data_start))
                    count += lay.num_samples
                    stats.shards_fetched += 1
                    stats.bytes_downloaded += shard.bytes
                meta_all = np.concatenate(metas).astype(meta_type)
                table_all = np.concatenate(tables).astype(ALLOC)
                header = first.header.copy()
                header["num_samples"] = count
                header["alloc_table_ptr"] = pos
                self._pwrite(fd, meta_all.tobytes(), meta_offset)
                self._pwrite(fd, descriptors, Header.itemsize)
                self._pwrite(fd, table_all.tobytes(), pos)
                logical_end = pos + table_all.nbytes
                os.ftruncate(fd, logical_end)
                os.fsync(fd)
                self._pwrite(fd, header.tobytes(), 0)   # the switch to the new view
                os.fsync(fd)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise UserError(f"node cache {self.folder}: the disk filled up while "
                                    f"fetching the {self.split} shards (needed about {needed} "
                                    "bytes); free space or set --cache-dir to a larger disk") from exc
                raise
        except BaseException:
            os.close(fd)
            self._undo(state)
            raise
        os.close(fd)
        new = State(STATE_VERSION, self.split, capacity, page, count, logical_end,
                    self._structure(header, descriptors, meta_all, table_all), held)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(new)))
        os.replace(tmp, self.state_path)   # last: only now does the file hold these shards
        return new

    @staticmethod
    def _pwrite(fd: int, data: bytes, offset: int) -> None:
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def _undo(self, state: State | None) -> None:
        """After a failed append: back to the last complete state (nothing half-written stays)."""
        if state is None:
            self.path.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)
        elif self.path.exists():
            os.truncate(self.path, state.logical_end)

    def held(self) -> set[str]:
        """The shards the state file says this node holds (a hint for placement; ensure() checks
        the file itself)."""
        state = State.load(self.state_path)
        return {s.path for s in state.shards} if state else set()


def _batches(shards: list[ShardInfo], limit: int) -> list[list[ShardInfo]]:
    """Consecutive groups of shards of about `limit` bytes (at least one shard each)."""
    out: list[list[ShardInfo]] = []
    size = limit
    for shard in shards:
        if size >= limit:
            out.append([])
            size = 0
        out[-1].append(shard)
        size += shard.bytes
    return out
