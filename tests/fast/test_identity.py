"""A run's name stands for its settings: the same settings resume, others are refused in words."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.storage import Storage
from pipeline.training.identity import claim

SETTINGS = {"data": "/d", "manifest_sha256": "a" * 64, "recipe": {"lr": 0.1, "epochs": 4}}


def test_same_settings_resume_other_settings_are_named(tmp_path):
    storage, folder = Storage(), str(tmp_path / "run")
    assert claim(storage, folder, "run.json", "run r", SETTINGS, restart=False) is False
    assert claim(storage, folder, "run.json", "run r", SETTINGS, restart=False) is True
    other = {**SETTINGS, "recipe": {"lr": 0.5, "epochs": 4}}
    with pytest.raises(UserError, match=r"recipe.lr 0.1 -> 0.5\): choose another --name"):
        claim(storage, folder, "run.json", "run r", other, restart=False)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"old")
    assert claim(storage, folder, "run.json", "run r", other, restart=True) is False
    assert not (tmp_path / "run" / "checkpoint.pt").exists()   # the old run is gone


def test_a_garbled_record_or_a_foreign_folder_is_not_resumed(tmp_path):
    storage = Storage()
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "run.json").write_text('{"data": "/d", "manif')
    with pytest.raises(UserError, match="run.json cannot be read, so run g cannot be resumed"):
        claim(storage, str(tmp_path / "garbled"), "run.json", "run g", SETTINGS, restart=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("someone else's")
    with pytest.raises(UserError, match="already holds files but no run.json"):
        claim(storage, str(tmp_path / "foreign"), "run.json", "run f", SETTINGS, restart=False)


def test_resuming_with_another_most_workers_is_refused_naming_both_batches(tmp_path):
    """The global batch is batch_size x the most workers: 2-4 -> 2-8 would double it and the
    lr with it, mid-run. Fewer workers of the moment (2-4 -> 1-4) resume."""
    from pipeline.config import TrainConfig
    from pipeline.training.identity import defining

    storage, folder = Storage(), str(tmp_path / "run")

    def settings(workers):
        return defining(TrainConfig(data="/d", batch_size=512, num_workers=workers), "a" * 64)

    assert claim(storage, folder, "run.json", "run r", settings("2-4"), restart=False) is False
    assert claim(storage, folder, "run.json", "run r", settings("1-4"), restart=False) is True
    with pytest.raises(UserError, match=r"global batch of 2048 \(at most 4 workers\); this "
                       r"command's is 4096 \(at most 8\).*--num-workers N-4.*--restart"):
        claim(storage, folder, "run.json", "run r", settings("2-8"), restart=False)
    assert claim(storage, folder, "run.json", "run r", settings("2-8"), restart=True) is False


def test_a_cursor_taken_with_another_global_batch_is_refused():
    from pipeline.config import TrainConfig
    from pipeline.data.placement import Cursor
    from pipeline.training.worker import check_cursor

    cfg = TrainConfig(data="/d", batch_size=512, num_workers="2-8")
    check_cursor(Cursor(1, 0, 4096), cfg, "ckpt")
    with pytest.raises(UserError, match="ckpt: taken with a global batch of 2048; this run's is "
                       "4096 .*--restart"):
        check_cursor(Cursor(1, 0, 2048), cfg, "ckpt")


def test_a_record_from_before_the_global_batch_was_recorded_still_resumes(tmp_path):
    storage, folder = Storage(), str(tmp_path / "run")
    claim(storage, folder, "run.json", "run r", SETTINGS, restart=False)
    assert claim(storage, folder, "run.json", "run r",
                 {**SETTINGS, "global_batch": 2048, "most_workers": 4}, restart=False) is True


def test_pipeline_train_refuses_another_global_batch_before_ray_starts(tmp_path, capfd, monkeypatch):
    """The CLI path: `pipeline train --name r --num-workers 2-8` on a run started with 2-4 ends
    with exit 2 and the one line, before connecting to any cluster (none is here)."""
    import json

    from pipeline import cli
    from pipeline.config import TrainConfig
    from pipeline.data.manifest import manifest_sha256
    from pipeline.training.identity import defining
    from pipeline.training.launch import resolved

    data = tmp_path / "staged"
    shards = {}
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
        (data / split / "shard-00000.beton").write_bytes(b"x" * 100)
        shards[split] = {"samples": 4096, "shards": [{"path": f"{split}/shard-00000.beton",
                                                      "samples": 4096, "bytes": 100,
                                                      "sha256": "0" * 64}]}
    (data / "manifest.json").write_text(json.dumps({
        "format": "ffcv-shards/1", "classes": [{"index": 0, "wnid": "n01440764"}],
        "splits": shards, "writer": {}, "source": {}}))
    args = ["--data", str(data), "--storage", str(tmp_path / "runs"), "--name", "r",
            "--batch-size", "256"]
    started = resolved(TrainConfig(data=str(data), storage=str(tmp_path / "runs"), name="r",
                                   batch_size=256, num_workers="2-4"))
    claim(Storage(), str(tmp_path / "runs" / "r"), "run.json", "run r",
          defining(started, manifest_sha256(Storage(), str(data))), restart=False)
    from pipeline.training import launch

    def no_cluster(*a, **k):
        raise AssertionError("connected to a cluster before refusing")

    monkeypatch.setattr(launch, "connect", no_cluster)
    assert cli.main(["train", *args, "--num-workers", "2-8"]) == 2
    err = [x for x in capfd.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "global batch of 1024 (at most 4 workers); this command's is " \
        "2048 (at most 8)" in err[0] and "--restart" in err[0], err
