"""A node's file: only its shards, fetched straight into place, checked, grown in place; filling it
costs about its shards' data (commits write their own rows, not all rows so far) and leaves no dead
byte the room check does not count."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.config import WriterSettings
from pipeline.data.manifest import ClassInfo, ShardInfo, ShardManifest, SplitInfo
from pipeline.data import node_cache
from pipeline.data.node_cache import NodeSplit
from pipeline.data.node_fill import Digest, State, digest_v1, fill_overhead
from pipeline.data.node_data import local_map
from pipeline.data.placement import SampleIds
from pipeline.data.shards import write_beton
from pipeline.errors import UserError
from pipeline.storage import Storage, sha256_file


@pytest.fixture
def dataset(tmp_path):
    """Six shards whose labels are their global sample numbers."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    shards, label = [], 0
    for i in range(6):
        n = 7 + i
        images = [rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8) for _ in range(n)]
        path = root / "train" / f"shard-{i:05d}.beton"
        write_beton(path, images, list(range(label, label + n)),
                    WriterSettings(max_resolution=64), seed=i)
        shards.append(ShardInfo(path=f"train/shard-{i:05d}.beton", samples=n,
                                bytes=path.stat().st_size, sha256=sha256_file(path)))
        label += n
    manifest = ShardManifest(classes=[ClassInfo(index=0, wnid="n0")],
                             splits={"train": SplitInfo(samples=label, shards=shards)},
                             writer=WriterSettings(max_resolution=64), source={}, plan="p")
    return str(root), manifest


def labels(path, indices=None):
    from ffcv.reader import Reader

    r = Reader(str(path))
    values = r.metadata["f1"].reshape(-1) if "f1" in r.metadata.dtype.names else r.metadata["label"]
    return values if indices is None else values[indices]


def test_holds_only_what_it_was_given_and_grows_in_place(dataset, tmp_path):
    root, manifest = dataset
    paths = [s.path for s in manifest.splits["train"].shards]
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    state, stats = node.ensure(paths[:2])
    assert stats.shards_fetched == 2 and stats.bytes_downloaded == sum(
        s.bytes for s in manifest.splits["train"].shards[:2])
    ids = SampleIds(manifest.splits["train"].shards)
    local = local_map(ids, state)
    assert sorted(labels(node.path, local[ids.of(paths[:2])]).tolist()) == list(range(15))
    assert (local[ids.of(paths[2:])] == -1).all()   # not held here
    share = stats.bytes_downloaded
    assert node.path.stat().st_size <= 1.1 * share + 2 * 2**21   # no second copy
    state, stats = node.ensure([paths[4], paths[0]])              # keeps 0, fetches 4 only
    assert (stats.shards_fetched, stats.shards_kept) == (1, 1)
    # global sample id -> the node file's sample: the label (= global number) comes back
    local = local_map(ids, state)
    wanted = ids.of([paths[0], paths[4]])
    assert labels(node.path, local[wanted]).tolist() == wanted.tolist()
    again = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    assert again.ensure(paths[:2])[1].shards_fetched == 0          # reused, checked


def test_a_corrupt_shard_is_refused_and_leaves_nothing_half_written(dataset, tmp_path):
    root, manifest = dataset
    paths = [s.path for s in manifest.splits["train"].shards]
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    node.ensure(paths[:1])
    size = node.path.stat().st_size
    bad = os.path.join(root, paths[3])
    data = bytearray(open(bad, "rb").read())
    data[-10] ^= 0xFF
    open(bad, "wb").write(bytes(data))
    with pytest.raises(UserError, match="does not match the manifest.*re-run `pipeline stage`"):
        node.ensure(paths[:1] + paths[3:4])
    assert node.path.stat().st_size == size and node.current() is not None


def test_a_file_that_does_not_match_its_state_is_rebuilt(dataset, tmp_path):
    root, manifest = dataset
    paths = [s.path for s in manifest.splits["train"].shards]
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    node.ensure(paths[:3])
    with open(node.path, "r+b") as f:       # someone changed the metadata
        f.seek(2000)
        f.write(b"\x01" * 8)
    assert node.current() is None
    state, stats = node.ensure(paths[:3])
    assert stats.shards_fetched == 3 and len(labels(node.path)) == 7 + 8 + 9


def test_disk_full_before_fetching_is_one_line_and_no_file_left(dataset, tmp_path, monkeypatch):
    import shutil

    root, manifest = dataset
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(UserError, match=r"node cache .*needs \d+ bytes .* 100 are free"):
        node.ensure([manifest.splits["train"].shards[0].path])
    assert not node.path.exists() and not list(node.folder.glob("*.part"))


def failing_writes_after(monkeypatch, limit: int, error: int):
    """os.pwrite into the node file fails with `error` once `limit` bytes went in: a disk that
    fills up (or a node that dies) in the middle of a fetch."""
    import errno  # noqa: F401

    real, written = os.pwrite, [0]

    def pwrite(fd, data, offset):
        if written[0] + len(data) > limit:
            raise OSError(error, os.strerror(error))
        written[0] += len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(node_cache.os, "pwrite", pwrite)


def test_disk_full_in_the_middle_of_a_fetch_keeps_what_was_complete(dataset, tmp_path,
                                                                    monkeypatch):
    """A real ENOSPC from a write halfway through: one line naming the folder, the file cut
    back to its last complete state (here: the shards committed before), nothing half-written."""
    import errno

    root, manifest = dataset
    paths = [s.path for s in manifest.splits["train"].shards]
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    first, _ = node.ensure(paths[:2])
    size = node.path.stat().st_size
    failing_writes_after(monkeypatch, manifest.splits["train"].shards[2].bytes // 2, errno.ENOSPC)
    with pytest.raises(UserError, match=f"node cache {node.folder}: the disk filled up while "
                                        "fetching the train shards"):
        node.ensure(paths[:5])
    assert node.path.stat().st_size == size
    kept = node.current()
    assert kept is not None and [s.path for s in kept.shards] == paths[:2]
    monkeypatch.undo()
    _, stats = node.ensure(paths[:5])   # space again: only the missing ones are fetched
    assert (stats.shards_kept, stats.shards_fetched) == (2, 3)


def test_a_fetch_killed_halfway_resumes_with_the_shards_it_completed(dataset, tmp_path,
                                                                     monkeypatch):
    import errno

    root, manifest = dataset
    shards = manifest.splits["train"].shards
    paths = [s.path for s in shards]
    monkeypatch.setattr(node_cache, "COMMIT_BYTES", 1)   # commit after every shard
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    real = NodeSplit._stream_into

    def dies_on_the_fourth(self, fd, shard, layout, target):   # the node dies mid-stream
        if shard.path == paths[3]:
            raise OSError(errno.EIO, "connection lost")
        return real(self, fd, shard, layout, target)

    monkeypatch.setattr(NodeSplit, "_stream_into", dies_on_the_fourth)
    with pytest.raises(OSError):
        node.ensure(paths)
    monkeypatch.setattr(NodeSplit, "_stream_into", real)
    held = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache")).held()
    assert held == set(paths[:3])
    state, stats = node.ensure(paths)
    assert (stats.shards_kept, stats.shards_fetched) == (3, 3)
    ids = SampleIds(shards)
    assert labels(node.path, local_map(ids, state)[ids.of(paths)]).tolist() == list(range(ids.total))


def test_the_cache_folder_is_private(tmp_path):
    from pipeline.data.node_cache import cache_root

    root = cache_root(str(tmp_path / "mine"))
    assert oct(root.stat().st_mode)[-3:] == "700"
    shared = tmp_path / "shared"          # like /tmp or a pod's emptyDir
    shared.mkdir()
    shared.chmod(0o777)
    inside = cache_root(str(shared))
    assert inside.parent == shared and oct(inside.stat().st_mode)[-3:] == "700"
    inside.chmod(0o777)                   # someone opened it up: refused, not used
    with pytest.raises(UserError, match="can be written by others"):
        cache_root(str(shared))


IMAGENET_BYTES, IMAGENET_TRAIN = 543 * 10**9, 1_281_167   # FFCV's published ImageNet .beton


def test_a_cold_node_fills_543_gb_with_at_most_2_percent_overhead_and_nothing_dead():
    got = fill_overhead(IMAGENET_BYTES, IMAGENET_TRAIN, commit_bytes=1 << 30,
                        disk_bytes_per_s=1e9, download_bytes_per_s=1e9)
    assert got["shards"] == 1252 and got["commits"] == 418
    assert got["dead_bytes"] == 0 and got["bytes_read_back"] == 0
    assert got["bytes_rewritten"] <= got["commits"] * 64    # the header, once per commit
    assert got["overhead_pct"] <= 2.0, got
    # beyond the data: the rows, written once, and each shard's data rounded up to a page
    assert got["file_bytes"] - got["data_bytes"] <= (2 * 24 * IMAGENET_TRAIN
                                                     + (got["shards"] + 2) * (1 << 21))


def test_a_later_fetch_that_does_not_fit_moves_the_table_once_and_counts_it(dataset, tmp_path):
    root, manifest = dataset
    paths = [s.path for s in manifest.splits["train"].shards]
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    first, _ = node.ensure(paths[:2])
    assert first.dead_bytes == 0 and first.logical_end == node.path.stat().st_size
    old_table = first.logical_end - first.table_ptr
    state, stats = node.ensure(paths[:5])
    # the old table (the data ends on it) is all that is dead, and the state says so
    assert state.dead_bytes == stats.dead_bytes == old_table
    assert state.table_ptr > first.logical_end
    assert sorted(labels(node.path).tolist()) == list(range(sum(7 + i for i in range(5))))


def test_a_resumed_fetch_fills_the_room_below_its_table(dataset, tmp_path, monkeypatch):
    """A fetch killed after its first commit resumes into the room it planned: no second table."""
    import errno

    from pipeline.data import node_cache

    root, manifest = dataset
    paths = [s.path for s in manifest.splits["train"].shards]
    monkeypatch.setattr(node_cache, "COMMIT_BYTES", 1)
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    real = NodeSplit._stream_into

    def dies_on_the_third(self, fd, shard, layout, target):
        if shard.path == paths[2]:
            raise OSError(errno.EIO, "connection lost")
        return real(self, fd, shard, layout, target)

    monkeypatch.setattr(NodeSplit, "_stream_into", dies_on_the_third)
    try:
        node.ensure(paths)
    except OSError:
        pass
    monkeypatch.setattr(NodeSplit, "_stream_into", real)
    kept = node.current()
    state, stats = node.ensure(paths)
    assert stats.shards_kept == 2 and state.table_ptr == kept.table_ptr and state.dead_bytes == 0
    assert sorted(labels(node.path).tolist()) == list(range(sum(7 + i for i in range(6))))


def test_a_cache_of_the_previous_state_version_is_kept(dataset, tmp_path):
    """Version 1 states hashed the whole metadata and table: read as they are, not refetched."""
    root, manifest = dataset
    paths = [s.path for s in manifest.splits["train"].shards]
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    state, _ = node.ensure(paths[:3])
    header, descriptors, meta, table = node._read_structure(state)
    raw = json.loads(node.state_path.read_text())
    raw.update(version=1, structure_sha256=digest_v1(header, descriptors, meta, table))
    del raw["table_ptr"], raw["dead_bytes"]
    node.state_path.write_text(json.dumps(raw))
    assert node.current() is not None
    state, stats = node.ensure(paths[:4])
    assert (stats.shards_kept, stats.shards_fetched, state.version) == (3, 1, 2)
    assert Digest(descriptors).descriptors == descriptors and State.load("{") is None
