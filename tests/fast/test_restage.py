"""A re-run of `pipeline stage` over an unchanged source finds it staged without listing it: the
manifest keeps each archive's size and ETag (mtime locally), checked one HEAD each."""
from __future__ import annotations

import os

from pipeline.config import StageConfig
from pipeline.data.manifest import ClassInfo, ShardInfo, ShardManifest, SplitInfo
from pipeline.data.source import listing_digest
from pipeline.data.stage import already_staged
from pipeline.storage import Storage


def staged(tmp_path, archives: bool):
    src, dest = tmp_path / "src", tmp_path / "dest"
    names = ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"] if archives else \
        ["train/n1/a.JPEG", "train/n1/b.JPEG", "val/n1/c.JPEG"]
    for i, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"x" * (100 + i))
    entries = list(Storage().list_detailed(str(src)))
    shards = {}
    for split in ("train", "val"):
        (dest / split).mkdir(parents=True)
        (dest / split / "shard-00000.beton").write_bytes(b"s" * 50)
        shards[split] = SplitInfo(samples=1, shards=[ShardInfo(
            path=f"{split}/shard-00000.beton", samples=1, bytes=50, sha256="0" * 64)])
    cfg = StageConfig(source=str(src), dest=str(dest))
    source = {"uri": str(src), "layout": "tars" if archives else "folders", "shard_size": 1024,
              "listing_sha256": listing_digest(entries), "bytes": 1}
    if archives:
        source["files"] = {rel: [size, version] for rel, size, version in entries}
    manifest = ShardManifest(classes=[ClassInfo(index=0, wnid="n1")], splits=shards,
                             writer=cfg.writer, source=source, plan="p")
    (dest / "manifest.json").write_text(manifest.to_json())
    return cfg, src, dest


def check(cfg, storage=None):
    return already_staged(storage or Storage(), cfg, cfg.source, cfg.dest)


def test_unchanged_archives_are_one_head_each_and_nothing_is_listed(tmp_path):
    cfg, src, dest = staged(tmp_path, archives=True)
    got = check(cfg)
    assert got is not None and got.already_staged and got.shards_reused == 2
    assert (got.source_heads, got.source_gets, got.source_lists) == (2, 0, 0)
    assert got.summary()["already_staged"] is True


def test_an_archive_of_another_size_or_version_is_not_taken_for_staged(tmp_path):
    cfg, src, dest = staged(tmp_path, archives=True)
    tar = src / "ILSVRC2012_img_val.tar"
    tar.write_bytes(tar.read_bytes() + b"y")          # another size
    assert check(cfg) is None
    tar.write_bytes(tar.read_bytes()[:-1])            # the same size, written again
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert check(cfg) is None


def test_other_settings_or_a_missing_shard_go_the_full_way(tmp_path):
    cfg, src, dest = staged(tmp_path, archives=True)
    assert check(cfg.model_copy(update={"shard_size": 512})) is None
    assert check(cfg.model_copy(update={"splits": ["train"]})) is None
    assert check(cfg.model_copy(update={"max_resolution": 128})) is None
    (dest / "val" / "shard-00000.beton").unlink()     # the full path stages it again
    assert check(cfg) is None


def test_loose_files_are_compared_by_one_listing_and_no_read(tmp_path):
    cfg, src, dest = staged(tmp_path, archives=False)
    got = check(cfg)
    assert got is not None and (got.source_lists, got.source_gets) == (1, 0)
    (src / "train" / "n1" / "new.JPEG").write_bytes(b"z")
    assert check(cfg) is None
