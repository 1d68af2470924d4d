"""ASHA never stops a trial at its last epoch, for the shipped configs and a range of settings;
a trial it stops is recorded as stopped early."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray_internals import ray_asha_rungs, scheduler_rungs

from pipeline.config import TrainConfig, TuneSettings
from pipeline.sweep.asha import asha_max_t, asha_rungs
from pipeline.sweep.tune import make_scheduler, trial_row

CONFIGS = sorted((Path(__file__).parents[2] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("max_t", [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 88, 100])
@pytest.mark.parametrize("grace", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_rungs_are_rays(max_t, grace, factor):
    if grace > max_t:
        return
    assert asha_rungs(max_t, grace, factor) == ray_asha_rungs(grace, max_t, factor)


def test_the_issues_case():
    assert asha_rungs(17, 4, 2) == [4, 8, 16]   # the old max_t (epochs + 1): a rung on epoch 16
    assert asha_rungs(asha_max_t(16, 4, 2), 4, 2) == [4, 8]
    assert asha_max_t(4, 4, 2) is None and asha_max_t(3, 5, 2) is None


def worse_each_trial(i, epoch, epochs):
    return 1.0 - i / 10 + epoch / 100


def better_until_the_last_epoch(i, epoch, epochs):
    """Each trial beats the ones before at every rung but the last epoch's."""
    return 1.0 + (i if epoch < epochs else -i) / 10


def _simulate(scheduler, epochs: int, score=worse_each_trial, trials: int = 4):
    """Trials one after another through the real scheduler: the (trial, epoch) pairs at which it
    stops one."""
    scheduler.set_search_properties("val_top1", "max")
    stops = []
    for i in range(trials):
        trial = SimpleNamespace(trial_id=f"t{i}")
        scheduler.on_trial_add(None, trial)
        for epoch in range(1, epochs + 1):
            action = scheduler.on_trial_result(None, trial, {"epoch": epoch,
                                                             "val_top1": score(i, epoch, epochs)})
            if action == "STOP":
                stops.append((trial.trial_id, epoch))
                break
        else:
            scheduler.on_trial_complete(None, trial, {"epoch": epochs, "val_top1": 1.0})
    return stops


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 32, 40, 88])
@pytest.mark.parametrize("grace", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_no_trial_is_stopped_at_its_last_epoch(epochs, grace, factor):
    settings = TuneSettings(grace_period=grace, reduction_factor=factor)
    late = _simulate(make_scheduler(settings, epochs, say=lambda line: None), epochs,
                     better_until_the_last_epoch)
    assert all(epoch < epochs for _, epoch in late), late
    stops = _simulate(make_scheduler(settings, epochs, say=lambda line: None), epochs)
    assert all(epoch < epochs for _, epoch in stops), stops
    if grace < epochs:   # where a rung fits before the last epoch, weak trials are stopped
        assert stops and stops[0] == ("t1", grace)
    else:
        assert not stops


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs(path):
    doc = yaml.safe_load(path.read_text())
    if not doc.get("tune"):
        return
    settings = TuneSettings(**doc["tune"])
    epochs = TrainConfig(**doc["train"]).recipe.epochs
    lines = []
    scheduler = make_scheduler(settings, epochs, say=lines.append)
    rungs = scheduler_rungs(scheduler)
    assert all(r < epochs for r in rungs)
    if path.name.startswith("imagenet-"):   # 16 epochs, grace 4, factor 2
        assert sorted(rungs) == [4, 8] and "after epoch 4, 8 of 16" in lines[0]
    assert not any(s[1] == epochs for s in _simulate(scheduler, epochs, better_until_the_last_epoch))


def test_a_stopped_trial_is_recorded_as_stopped_early():
    def result(epoch, error=None):
        return SimpleNamespace(metrics={"epoch": epoch, "val_top1": 0.5, "trial_id": "t"},
                               error=error, path="/runs/t", config={})

    assert trial_row(result(8), 16)["stopped_early"] is True
    assert trial_row(result(16), 16)["stopped_early"] is False
    errored = trial_row(result(3, error=RuntimeError("x")), 16)
    assert errored["status"] == "ERROR" and errored["stopped_early"] is False


def test_an_epoch_trained_again_after_a_restart_reaches_tune_once(monkeypatch):
    """checkpoint_every 2: epoch 3 reported, the group fails in epoch 4 and restarts from the
    epoch-2 checkpoint, and reports epoch 3 again: Tune hears it once; mid-epoch reports never."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.sweep.tune import epoch_reports_to_tune

    heard = []
    monkeypatch.setattr(TuneReportCallback, "after_report",
                        lambda self, ctx, metrics, ckpt: heard.append(metrics[0]["epoch"]))
    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: None)   # no Tune session
    callback = epoch_reports_to_tune()
    for epoch, mid in [(1, False), (1, True), (2, False), (3, False), (3, False), (4, False)]:
        callback.after_report(None, [{"epoch": epoch, "mid_epoch": mid}], None)
    assert heard == [1, 2, 3, 4]
