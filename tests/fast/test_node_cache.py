"""A node's file: only its shards, fetched straight into place, checked, grown in place."""
from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.config import WriterSettings
from pipeline.data.manifest import ClassInfo, ShardInfo, ShardManifest, SplitInfo
from pipeline.data.node_cache import NodeSplit
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
    assert sorted(labels(node.path, node.indices(state, paths[:2])).tolist()) == list(range(15))
    share = stats.bytes_downloaded
    assert node.path.stat().st_size <= 1.1 * share + 2 * 2**21   # no second copy
    state, stats = node.ensure([paths[4], paths[0]])              # keeps 0, fetches 4 only
    assert (stats.shards_fetched, stats.shards_kept) == (1, 1)
    got = labels(node.path, node.indices(state, [paths[0], paths[4]])).tolist()
    assert got == list(range(7)) + list(range(7 + 8 + 9 + 10, 7 + 8 + 9 + 10 + 11))
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


def test_disk_full_is_one_line_and_no_file_left(dataset, tmp_path, monkeypatch):
    import shutil

    root, manifest = dataset
    node = NodeSplit(Storage(), root, manifest, "train", str(tmp_path / "cache"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(UserError, match=r"node cache .*needs \d+ bytes .* 100 are free"):
        node.ensure([manifest.splits["train"].shards[0].path])
    assert not node.path.exists() and not list(node.folder.glob("*.part"))


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
