"""A manifest from someone else's bucket is checked before anything is downloaded."""
from __future__ import annotations

import json

import pytest

from pipeline.data.manifest import read_manifest
from pipeline.errors import UserError
from pipeline.storage import Storage

SHA = "a" * 64


def manifest(**changes) -> dict:
    m = {"format": "ffcv-shards/1",
         "classes": [{"index": 0, "wnid": "n01440764", "name": "tench"},
                     {"index": 1, "wnid": "n02102040", "name": "springer"}],
         "splits": {"train": {"samples": 30, "shards": [
                        {"path": "train/shard-00000.beton", "samples": 20, "bytes": 100, "sha256": SHA},
                        {"path": "train/shard-00001.beton", "samples": 10, "bytes": 100, "sha256": SHA}]},
                    "val": {"samples": 4, "shards": [
                        {"path": "val/shard-00000.beton", "samples": 4, "bytes": 100, "sha256": SHA}]}},
         "writer": {"max_resolution": 64, "jpeg_quality": 90, "compress_probability": 0.5},
         "source": {"uri": "/src", "layout": "folders"}, "skipped": [], "plan": "p"}
    for path, value in changes.items():
        *keys, last = path.split(".")
        target = m
        for k in keys:
            target = target[int(k)] if k.isdigit() else target[k]
        target[int(last) if last.isdigit() else last] = value
    return m


def write(tmp_path, m: dict) -> str:
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    return str(tmp_path)


def test_a_sound_manifest_is_read(tmp_path):
    got = read_manifest(Storage(), write(tmp_path, manifest()))
    assert got.splits["train"].samples == 30 and got.num_classes == 2
    assert len(got.val_set_digest()) == 64


@pytest.mark.parametrize("change, words", [
    ({"splits.train.shards.0.path": "../../x"}, "expected train/<name>.beton"),
    ({"splits.train.shards.0.path": "/etc/passwd"}, "expected train/<name>.beton"),
    ({"splits.train.shards.0.path": "train/../../x.beton"}, "expected train/<name>.beton"),
    ({"splits.train.shards.0.path": "val/shard-00000.beton"}, "expected train/<name>.beton"),
    ({"splits.train.shards.1.path": "train/shard-00000.beton"}, "listed twice"),
    ({"splits.train.samples": 31}, "samples is 31 but its shards hold 30"),
    ({"splits.train.shards.0.bytes": 0}, "must be positive"),
    ({"splits.val.shards.0.sha256": "xyz"}, "not a sha256"),
    ({"classes.1.index": 5}, "index 5, expected 1"),
    ({"format": "other/9"}, "not supported"),
])
def test_a_crafted_manifest_is_refused_in_words(tmp_path, change, words):
    with pytest.raises(UserError, match="refused, .*" + words.replace("(", r"\(").replace("<", "<")):
        read_manifest(Storage(), write(tmp_path, manifest(**change)))


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(UserError, match="manifest.json is missing"):
        read_manifest(Storage(), str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid manifest"):
        read_manifest(Storage(), str(tmp_path))
