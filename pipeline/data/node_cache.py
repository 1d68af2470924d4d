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
restarted, a worker group torn down) resumes with the shards it completed, not from zero. A
commit writes only its own shards' rows (node_fill.py), so filling a node costs its shards' data
and a few bytes per sample, however large the split.

The cache lives in a folder of this user only (0700): the default is not a shared /tmp path that
another user could prepare.
"""
from __future__ import annotations

import errno
import getpass
import hashlib
import os
import shutil
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from ..errors import UserError
from ..storage import Storage, join
from .manifest import ShardInfo, ShardManifest
from .node_fill import (Digest, FileIO, Filler, Layout, State, align, commit_batches, digest_v1,
                        ffcv_types, fill)

FETCH_THREADS = 4
HEAD_BYTES = 64 * 1024
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
class FetchStats:
    split: str
    shards_fetched: int = 0
    shards_kept: int = 0
    bytes_downloaded: int = 0
    file_bytes: int = 0
    dead_bytes: int = 0
    seconds: float = 0.0


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
    def _read_structure(self, state: State):
        """(header, descriptors, metadata, alloc table) as the file holds them now."""
        ALLOC, FieldDesc, Header, get_handlers, get_metadata_type = ffcv_types()
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
        self._digest = None
        try:
            state = State.load(self.state_path.read_text())
        except OSError:
            return None
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
        digest = Digest(descriptors, meta.tobytes(), table.tobytes())
        expected = digest_v1(header, descriptors, meta, table) if state.version == 1 else \
            digest.hexdigest(header)
        if int(header["num_samples"]) != state.num_samples or expected != state.structure_sha256:
            return None
        state.table_ptr = int(header["alloc_table_ptr"])
        self._digest = digest   # what the next commit extends
        return state

    # -- fetching -----------------------------------------------------------------------------
    def ensure(self, wanted: list[str]) -> tuple[State, FetchStats]:
        """Make the node file hold every shard in `wanted` (paths from the manifest); fetch only
        what it lacks, committing every COMMIT_BYTES. Safe to call from every worker of the
        node at once."""
        ffcv_types()   # its first import takes seconds: not part of the fetch
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
            if missing:
                state = self._fill(state, missing, stats)
            stats.file_bytes = self.path.stat().st_size if self.path.exists() else 0
            stats.dead_bytes = state.dead_bytes if state else 0
            stats.seconds = round(time.monotonic() - started, 2)
            return state, stats

    def _check_room(self, state: State | None, missing: list[ShardInfo]) -> None:
        """Refuse before fetching anything when the shards cannot fit: the metadata region is
        reserved for the whole split, and a fetch that does not fit below the allocation table
        writes it again after the old one (node_fill.py)."""
        if not missing:
            return
        needed = sum(s.bytes for s in missing)   # each shard's data, metadata and table
        if state is None:   # a new file reserves the metadata of the whole split up front
            needed += HEAD_BYTES + 64 * self.manifest.splits[self.split].samples
        else:
            needed += state.logical_end - state.table_ptr
        free = shutil.disk_usage(self.folder).free
        if needed > free:
            raise UserError(f"node cache {self.folder}: needs {needed} bytes for the "
                            f"{self.split} shards of this node, {free} are free; free space or "
                            "set --cache-dir to a larger disk")

    def _fill(self, state: State | None, missing: list[ShardInfo], stats: FetchStats) -> State:
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            layouts = list(pool.map(self._head, missing))
        first = layouts[0]
        for shard, lay in zip(missing, layouts):
            if lay.header["page_size"] != first.header["page_size"] or \
                    lay.descriptors != first.descriptors:
                raise UserError(f"{join(self.data_uri, shard.path)}: other fields or page size "
                                "than the other shards; the dataset was staged inconsistently")
        if state is not None and (state.page_size != int(first.header["page_size"]) or
                                  self._digest.descriptors != first.descriptors):
            raise UserError(f"{self.path}: the cached copy has other fields or another page size "
                            "than the dataset; delete the node cache folder and try again")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        filler = Filler(FileIO(fd), state, layouts, self.manifest.splits[self.split].samples,
                        self.split, self._digest)
        saved = [state]

        def save(new: State) -> None:
            self._save(new)
            saved.append(new)

        def stream(batch, lays, targets):
            # every fetch has stopped writing to fd before it is closed or truncated
            with ThreadPoolExecutor(FETCH_THREADS) as pool:
                futures = [pool.submit(self._stream_into, fd, s, lay, t)
                           for s, lay, t in zip(batch, lays, targets)]
                try:
                    return [f.result() for f in futures]
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise

        try:
            try:
                return fill(filler, missing, layouts, commit_batches(missing, COMMIT_BYTES), stream,
                            save, stats)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise UserError(f"node cache {self.folder}: the disk filled up while "
                                    f"fetching the {self.split} shards (needed about "
                                    f"{sum(s.bytes for s in missing) + filler.room()} bytes); "
                                    "free space or set --cache-dir to a larger disk") from exc
                raise
        except BaseException:
            self._undo(saved[-1])
            raise
        finally:
            os.close(fd)

    def _save(self, state: State) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        os.replace(tmp, self.state_path)   # last: only now does the file hold these shards

    def _head(self, shard: ShardInfo) -> Layout:
        ALLOC, FieldDesc, Header, get_handlers, get_metadata_type = ffcv_types()
        uri = join(self.data_uri, shard.path)
        head = self.storage.read_bytes(uri, 0, min(HEAD_BYTES, shard.bytes))
        header = np.frombuffer(head[:Header.itemsize], Header)[0].copy()
        end = Header.itemsize + int(header["num_fields"]) * FieldDesc.itemsize
        if len(head) < end:
            raise self._corrupt(shard, "its header is cut short")
        descriptors = head[Header.itemsize:end]
        meta_type = get_metadata_type(list(get_handlers(np.frombuffer(descriptors, FieldDesc))))
        n = int(header["num_samples"])
        data_start = align(end + n * meta_type.itemsize, int(header["page_size"]))
        data_end = int(header["alloc_table_ptr"])
        if n != shard.samples or not data_start <= data_end <= shard.bytes:
            raise self._corrupt(shard, "its header does not match the manifest")
        return Layout(header, descriptors, end, n, data_start, data_end, shard.bytes)

    def _corrupt(self, shard: ShardInfo, why: str) -> UserError:
        return UserError(f"{join(self.data_uri, shard.path)}: {why}: the shard is corrupt; re-run "
                         "`pipeline stage` with the same settings and --replace to repair it")

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
        try:
            state = State.load(self.state_path.read_text())
        except OSError:
            return set()
        return {s.path for s in state.shards} if state else set()
