"""The checkpoint format: tensors and plain values only, each rank's RNG state, best is best."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.storage import Storage
from pipeline.training import checkpoint
from pipeline.training.model import build_model
from pipeline.training.summary import best_checkpoint

CLASSES = [{"index": i, "wnid": f"n0000000{i}", "name": f"c{i}"} for i in range(3)]


def draws() -> tuple:
    return torch.rand(2).tolist(), np.random.rand(2).tolist(), random.random()


def test_round_trip_restores_each_ranks_rng(tmp_path):
    states = []
    for rank in range(2):   # two ranks with different streams
        torch.manual_seed(rank)
        np.random.seed(rank)
        random.seed(rank)
        states.append(checkpoint.rng_state())
    model = build_model("resnet18", 3, blurpool=True)
    checkpoint.save(tmp_path, model=model.state_dict(), optimizer={}, scaler={}, epoch=2,
                    rng=states, meta=checkpoint.meta(TrainConfig(arch="resnet18"), CLASSES, 2, {}))
    expected = []
    for rank in range(2):
        checkpoint.set_rng_state(states[rank])
        expected.append(draws())
    assert expected[0] != expected[1]
    meta, state = checkpoint.load(Storage(), str(tmp_path))
    assert meta["num_classes"] == 3 and state["epoch"] == 2
    for rank in range(2):
        torch.manual_seed(99)
        checkpoint.set_rng_state(state["rng"][rank])
        assert draws() == expected[rank]


class Planted:
    def __reduce__(self):
        return (print, ("this ran on load",))


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    torch.save({"model": {}, "extra": Planted()}, tmp_path / checkpoint.CHECKPOINT_FILE)
    (tmp_path / checkpoint.META_FILE).write_text(json.dumps({"arch": "resnet18"}))
    with pytest.raises(UserError, match="refused: it holds pickled Python objects"):
        checkpoint.load(Storage(), str(tmp_path))
    with pytest.raises(UserError, match="refused"):
        checkpoint.init_weights(Storage(), str(tmp_path))


def test_best_checkpoint_is_the_highest_score_whatever_the_order():
    kept = [("b", {"val_top1": 0.9}), ("a", {"val_top1": 0.5}), ("c", {"val_top1": 0.7})]
    assert best_checkpoint(kept) == "b"
    assert best_checkpoint(list(reversed(kept))) == "b"
    assert best_checkpoint([("a", {})]) is None


def test_the_summary_reports_the_furthest_checkpoint_not_only_what_ray_recorded(tmp_path):
    """A group restarted (a resize, a hand-over) after its last epoch's checkpoint, before Ray
    recorded it, trains nothing and returns: Ray's latest is then a mid-epoch checkpoint without
    a score, and the summary said val top-1 None (the CLI crashed formatting it)."""
    import json

    from pipeline.storage import Storage
    from pipeline.training.checkpoint import CHECKPOINT_FILE, META_FILE
    from pipeline.training.summary import build_summary

    def folder(name, meta):
        d = tmp_path / name
        d.mkdir()
        (d / META_FILE).write_text(json.dumps(meta))
        (d / CHECKPOINT_FILE).write_bytes(b"weights")
        return SimpleNamespace(path=str(d))

    third = folder("epoch-0003-aaaaaa", {"epoch": 3, "metrics": {"val_top1": 0.8}})
    mid = folder("step-0004-000009-bbbbbb", {"epoch": 3, "cursor": {"epoch": 3, "steps": 9},
                                              "metrics": {"mid_epoch": True}})
    folder("epoch-0004-cccccc", {"epoch": 4, "metrics": {"val_top1": 0.9, "val_top5": 1.0},
                                 "epoch_samples": [{"epoch": 4}]})
    result = SimpleNamespace(checkpoint=mid, best_checkpoints=[(third, {"val_top1": 0.8}),
                                                               (mid, {"checkpoint_score": -1})])
    s = build_summary("r", result, Storage(), str(tmp_path), str(tmp_path), [], None)
    assert s["val_top1"] == 0.9 and s["epochs_completed"] == 4
    assert s["checkpoint"] == s["best_checkpoint"] == str(tmp_path / "epoch-0004-cccccc")
    assert s["epoch_samples"] == [{"epoch": 4}]


def test_a_run_resumes_from_its_furthest_complete_checkpoint(tmp_path):
    """Ray records a checkpoint only when its controller next hears from every worker: one on
    storage that it has not recorded yet (a node died just after it) is further along."""
    import json

    from pipeline.storage import Storage
    from pipeline.training.checkpoint import CHECKPOINT_FILE, META_FILE, furthest

    def folder(name, epoch, steps=None, weights=True):
        d = tmp_path / name
        d.mkdir()
        meta = {"epoch": epoch, **({"cursor": {"epoch": epoch, "steps": steps}} if steps else {})}
        (d / META_FILE).write_text(json.dumps(meta))
        if weights:
            (d / CHECKPOINT_FILE).write_bytes(b"weights")
        return str(d)

    ray_latest = folder("epoch-0001-aaaaaa", 1)
    later = folder("step-0002-000006-bbbbbb", 1, 6)
    folder("step-0002-000009-cccccc", 1, 9, weights=False)   # its upload never finished
    folder("step-0001-000003-dddddd", 0, 3)
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "x.json").write_text("{}")
    assert furthest(Storage(), str(tmp_path), ray_latest) == later
    assert furthest(Storage(), str(tmp_path), later) == later
    assert furthest(Storage(), str(tmp_path), None) == later   # Ray recorded none yet
    assert furthest(Storage(), str(tmp_path / "events"), None) is None
