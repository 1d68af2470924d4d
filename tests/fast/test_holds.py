"""The tests' holds (PIPELINE_TEST_HOLD, PIPELINE_TEST_STAGE_HOLD): a run waits at the named step
or shard until the test makes the file, and nowhere else."""
from __future__ import annotations

import threading

from helpers import wait_for

from pipeline.data import stage
from pipeline.training import trainer


def held_in_thread(fn, *args) -> threading.Thread:
    """A daemon thread: one a failed test leaves waiting ends with the session (at most 10 min)."""
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


def test_a_step_hold_waits_for_its_file_at_its_step_and_world_only(tmp_path, monkeypatch):
    release = tmp_path / "go"
    monkeypatch.setenv(trainer.HOLD_ENV, f"1:3:{release}:2,2:0:{tmp_path / 'other'}")
    trainer.maybe_hold(1, 2, 0, 2)   # another step
    trainer.maybe_hold(1, 3, 0, 1)   # another world size
    assert not (tmp_path / "go.held").exists()
    thread = held_in_thread(trainer.maybe_hold, 1, 3, 0, 2)
    # the file appears before its line is written: wait for the line
    wait_for(lambda: (tmp_path / "go.held").exists()
             and (tmp_path / "go.held").read_text() == "1 3 2\n", "rank 0 held", 30)
    assert thread.is_alive()
    release.touch()
    thread.join(30)
    assert not thread.is_alive()
    trainer.maybe_hold(1, 3, 0, 2)   # released for good
    assert (tmp_path / "go.held").read_text() == "1 3 2\n"


def test_a_stage_hold_waits_for_its_file_at_its_shard_only(tmp_path, monkeypatch):
    release = tmp_path / "go"
    monkeypatch.setenv(stage.HOLD_ENV, f"3:{release}")
    stage._maybe_hold(2)
    assert not (tmp_path / "go.held").exists()
    thread = held_in_thread(stage._maybe_hold, 3)
    wait_for(lambda: (tmp_path / "go.held").exists(), "the stage held", 30)
    assert thread.is_alive()
    release.touch()
    thread.join(30)
    assert not thread.is_alive()
