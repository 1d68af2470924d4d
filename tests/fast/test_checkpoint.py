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


def test_round_trip_restores_each_ranks_rng_from_its_own_file(tmp_path):
    states = []
    for rank in range(2):   # two ranks with different streams
        torch.manual_seed(rank)
        np.random.seed(rank)
        random.seed(rank)
        states.append(checkpoint.rng_state())
    model = build_model("resnet18", 3, blurpool=True)
    checkpoint.save(tmp_path, model=model.state_dict(), optimizer={}, scaler={}, epoch=2,
                    meta=checkpoint.meta(TrainConfig(arch="resnet18"), CLASSES, 2, {}),
                    world_size=2)
    for rank in range(2):   # each rank writes its own (no rank receives another's)
        checkpoint.save_rng(tmp_path, rank, states[rank])
    expected = []
    for rank in range(2):
        checkpoint.set_rng_state(states[rank])
        expected.append(draws())
    assert expected[0] != expected[1]
    meta, state = checkpoint.load(Storage(), str(tmp_path))
    assert meta["num_classes"] == 3 and state["epoch"] == 2 and "rng" not in state
    for rank in range(2):
        torch.manual_seed(99)
        checkpoint.set_rng_state(checkpoint.load_rng(Storage(), str(tmp_path), state, rank, 2))
        assert draws() == expected[rank]
    # resumed on another world size: no rank takes a state that was another rank's
    assert checkpoint.load_rng(Storage(), str(tmp_path), state, 0, 3) is None
    assert checkpoint.load_rng(Storage(), str(tmp_path), state, 1, 1) is None
    # a checkpoint written before per-rank files (every rank's state in checkpoint.pt) loads
    old = {"model": {}, "epoch": 1, "rng": states}
    torch.manual_seed(99)
    checkpoint.set_rng_state(checkpoint.load_rng(Storage(), str(tmp_path), old, 1, 2))
    assert draws() == expected[1]
    assert checkpoint.load_rng(Storage(), str(tmp_path), old, 1, 4) is None


def test_checkpoint_pt_is_the_same_size_whatever_the_world_size(tmp_path):
    """Without the model: what the pipeline adds (RNG, cursor, epochs) does not grow with ranks;
    only the cursor's cuts (at most two per node) grow with the nodes: bytes, not RNG states."""
    from pipeline.bench.scale import fake_shards, node_name
    from pipeline.data.placement import Cursor, Segment, plan_layout

    shards = fake_shards("train", 1_281_167, 1024)
    sizes = {}
    for ranks in (8, 2048):
        layout = plan_layout(shards, "node", [node_name(r // 8) for r in range(ranks)], 0, 8192)
        cursor = Cursor(0, 0, 8192, [Segment(layout, 10)])
        folder = tmp_path / str(ranks)
        folder.mkdir()
        checkpoint.save(folder, model={}, optimizer={}, scaler={}, epoch=0, meta={},
                        cursor=cursor.to_dict(), world_size=ranks)
        sizes[ranks] = (folder / checkpoint.CHECKPOINT_FILE).stat().st_size
    assert sizes[2048] - sizes[8] <= 200 * 256   # 14.6 KB per rank when it held RNG states


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


def test_a_torn_checkpoint_is_passed_over_for_the_complete_one_before_it(tmp_path):
    """On a local or NFS path Ray copies straight to the final name: a node killed mid-copy
    leaves a checkpoint.pt cut short beside a whole meta.json. The run resumes from the last
    complete checkpoint, and loading the torn one says what it is."""
    from pipeline.training.checkpoint import CHECKPOINT_FILE, furthest, load

    cfg = TrainConfig(arch="resnet18", epochs=2)
    model = build_model("resnet18", len(CLASSES), True)

    def write(name: str, epoch: int, steps: int) -> str:
        d = tmp_path / name
        d.mkdir()
        cursor = {"epoch": epoch, "steps": steps}
        checkpoint.save(d, model=model.state_dict(), optimizer={}, scaler={}, epoch=epoch, rng=[],
                        meta={**checkpoint.meta(cfg, CLASSES, epoch, {}), "cursor": cursor})
        return str(d)

    whole = write("step-0001-000003-aaaaaa", 0, 3)
    torn = write("step-0001-000006-bbbbbb", 0, 6)
    weights = tmp_path / "step-0001-000006-bbbbbb" / CHECKPOINT_FILE
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    assert furthest(Storage(), str(tmp_path), None) == whole
    assert furthest(Storage(), str(tmp_path), torn) == whole       # even when Ray recorded it
    with pytest.raises(UserError, match="cut short"):
        load(Storage(), torn)
    meta, state = load(Storage(), whole)
    assert meta["checkpoint_bytes"] == (tmp_path / "step-0001-000003-aaaaaa" / CHECKPOINT_FILE).stat().st_size


def test_a_file_that_goes_while_the_run_folder_is_listed_is_left_out(tmp_path, monkeypatch):
    """Other ranks write events into the run folder as part files renamed into place: a local
    walk can name one that is gone when it is stat'ed. The listing leaves it out (as an S3
    listing would) and choosing the checkpoint goes on (it failed a first start once)."""
    import os
    from pathlib import Path

    from pipeline.training.checkpoint import CHECKPOINT_FILE, META_FILE, furthest

    d = tmp_path / "epoch-0001-aaaaaa"
    d.mkdir()
    (d / META_FILE).write_text(json.dumps({"epoch": 1}))
    (d / CHECKPOINT_FILE).write_bytes(b"weights")
    part = tmp_path / "events" / ".x.json.123.part"
    part.parent.mkdir()
    part.write_text("{}")
    real_stat = Path.stat

    def renamed_meanwhile(self, *args, **kwargs):
        if self == part and os.path.exists(part):
            os.rename(part, part.parent / "x.json")   # after the walk named it
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", renamed_meanwhile)
    assert furthest(Storage(), str(tmp_path), None) == str(d)
    monkeypatch.undo()
    assert sorted(rel for rel, _ in Storage().list(str(tmp_path))) == [
        f"{d.name}/{CHECKPOINT_FILE}", f"{d.name}/{META_FILE}", "events/x.json"]
