"""Decisions between steps (checkpoints inside epochs, preemption notices, progress lines) and
what a run's events say about its interruptions."""
from __future__ import annotations

import pytest

from pipeline.config import TrainConfig, checkpoint_interval
from pipeline.errors import UserError
from pipeline.training.control import (HandOver, RunControl, checkpoint_due_by_steps,
                                       epoch_checkpoint_due, final_checkpoint_due, progress_line)
from pipeline.training.run_events import preemptions, recoveries, steps_lost


def test_checkpoint_every_takes_epochs_steps_or_minutes():
    assert checkpoint_interval("1") == (1, "epochs") and checkpoint_interval("3 epochs") == (3, "epochs")
    assert checkpoint_interval("500 steps") == (500, "steps")
    assert checkpoint_interval("2.5 min") == (2.5, "minutes")
    for bad in ("0", "two", "5 hours", "1.5 steps", "-3"):
        with pytest.raises(ValueError):
            checkpoint_interval(bad)
    assert TrainConfig(checkpoint_every=2).run.checkpoint_every == "2"   # YAML gives an int
    from pipeline.config import build
    with pytest.raises(UserError, match="checkpoint_every.*'N steps'"):
        build(TrainConfig, {"checkpoint_every": "often"})


def test_when_checkpoints_are_due():
    assert [s for s in range(10) if checkpoint_due_by_steps(s, 4)] == [3, 7]
    assert not checkpoint_due_by_steps(3, 0)
    # every N epochs and the last; with steps or minutes every epoch (its val score)
    assert [e for e in range(6) if epoch_checkpoint_due(e, 6, 2, "epochs")] == [1, 3, 5]
    assert [e for e in range(5) if epoch_checkpoint_due(e, 5, 2, "epochs")] == [1, 3, 4]
    assert all(epoch_checkpoint_due(e, 5, 100, "steps") for e in range(5))


@pytest.mark.parametrize("left,checkpoint_s,step_s,every,due", [
    (120, 5, 0.5, 10, False),     # AWS's two minutes, a fast step: train on
    (20, 5, 0.5, 10, True),       # 20 s left: 2 x 5 s + 11 x 0.5 s + 5 s = 20.5 s
    (30, 2, 1.0, 1, False),       # GCP's 30 s, a checkpoint of 2 s, checked every step
    (10, 2, 1.0, 1, True),
])
def test_the_last_checkpoint_before_a_deadline_starts_in_time(left, checkpoint_s, step_s, every, due):
    assert final_checkpoint_due(1000.0, 1000.0 + left, checkpoint_s, step_s, every) is due
    assert not final_checkpoint_due(1000.0, None, checkpoint_s, step_s, every)   # no deadline


def test_progress_line_says_where_the_epoch_stands():
    line = progress_line("train", 2, 16, 1200, 2502, 2310.4, 0.043, 0.25, 700)
    assert line == ("[train] epoch 3/16 step 1200/2502 2310 img/s, waiting for data 4% of step "
                    "time, epoch ETA 5m25s, run ETA 2h37m")   # 325 s + 13 x 700 s


class FakeNotice:
    def __init__(self, deadline_s):
        import time

        self.deadline_ms = int((time.time() + deadline_s) * 1000)
        self.preempted_node_ids = ["n2"]
        self.preempted_ranks = [1]


def test_a_notice_makes_a_checkpoint_at_once_and_another_before_the_deadline():
    import torch

    cfg = TrainConfig(epochs=2, checkpoint_every="1")
    notices = [None, None, FakeNotice(200.0)]
    control = RunControl(cfg, rank=0, world=1, device=torch.device("cpu"), label="t",
                         get_notice=lambda: notices.pop(0) if notices else None, say=lambda s: None)
    actions = [control.after_step(0, s, 100, 0.1, 0.0, 1.0, s) for s in range(4)]
    assert actions == [None, None, "notice", None]   # checkpoint on the notice, then train on
    control.checkpointed(1.0)
    control.notice.deadline = __import__("time").time() + 3.0   # the deadline comes near
    assert control.after_step(0, 4, 100, 0.1, 0.0, 1.0, 4) == "final"
    assert control.after_step(0, 5, 100, 0.1, 0.0, 1.0, 5) is None   # only once
    with pytest.raises(HandOver, match="before the deadline"):
        control.hand_over()


def test_a_hand_over_restarts_uncounted_and_is_no_failure(tmp_path):
    """Every rank raising HandOver after the last checkpoint before a deadline restarts the
    group whatever max_failures is, and records no failure; one rank failing otherwise is a
    failure, counted by Ray's policy (here: max_failures 0, so it ends the run)."""
    from ray.train import FailureConfig
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.execution.failure_handling import (DefaultFailurePolicy,
                                                                   FailureDecision)

    from pipeline.storage import Storage
    from pipeline.training.failures import FailureRecorder, StopOnUserError
    from pipeline.training.run_events import RunEvents

    def group_error(*errors):
        return WorkerGroupError("failed", dict(enumerate(errors)))

    policy = StopOnUserError(DefaultFailurePolicy(FailureConfig(max_failures=0)))
    handed = group_error(HandOver("a"), HandOver("b"))
    for _ in range(3):
        assert policy.make_decision(handed) == FailureDecision.RETRY
    assert policy.make_decision(group_error(HandOver("a"), RuntimeError("b"))) == FailureDecision.RAISE

    recorder = FailureRecorder(Storage(), str(tmp_path))
    recorder.after_exception(None, handed.worker_failures)
    assert RunEvents(Storage(), str(tmp_path)).all() == []
    recorder.after_exception(None, {0: HandOver("a"), 1: RuntimeError("node died")})
    [failure] = RunEvents(Storage(), str(tmp_path)).all()
    assert "RuntimeError: node died" in failure["error"]


def test_events_give_each_preemption_and_recovery_with_the_steps_lost():
    t = iter(range(1000))

    def ev(kind, **f):
        return {"kind": kind, "time": float(next(t)), **f}

    events = [ev("driver_start"), ev("start", resumed_from_epoch=None, world_size=2),
              ev("first_step"), ev("checkpoint", epoch=1, step=0),
              ev("preemption_checkpoint", notice=True, nodes=["n2"], ranks=[1], deadline=50.0,
                 seen=4.0, epoch=1, step=7, seconds=1.5),
              ev("progress", epoch=1, step=12),
              ev("preemption_checkpoint", notice=False, nodes=["n2"], ranks=[1], deadline=50.0,
                 seen=4.0, epoch=1, step=15, seconds=1.0),
              ev("start", resumed_from_epoch=1, resumed_from_step=15, world_size=1),
              ev("first_step"),
              ev("checkpoint", epoch=1, step=18), ev("progress", epoch=1, step=21),
              ev("failure", error="node died"),
              ev("start", resumed_from_epoch=1, resumed_from_step=18, world_size=1),
              ev("first_step")]
    [p] = preemptions(events)
    assert p["checkpoint"] == [1, 7] and p["last_checkpoint"] == [1, 15]
    assert p["handed_over"] and p["resumed_at"] == [1, 15] and p["steps_lost"] == 0
    assert p["world_size_after"] == 1 and p["seconds_to_first_step"] == 8.0 - 4.0
    [r] = recoveries(events)
    assert r["cause"] == "worker failure" and r["resumed_at"] == [1, 18] and r["steps_lost"] == 3
    assert steps_lost((2, 5), (2, 5)) == 0 and steps_lost((3, 1), (2, 9)) is None


def test_a_draining_or_lost_node_offers_no_room_to_an_elastic_restart(monkeypatch):
    """Restarts and growth count only nodes that can take a worker; a running group is never
    shrunk (a resize has no checkpoint: the notice path checkpoints first)."""
    from types import SimpleNamespace

    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    from pipeline.training import failures

    policy = failures.SkipDrainingNodes(ScalingConfig(num_workers=(1, 3)))
    monkeypatch.setattr(policy, "_maybe_send_resource_request", lambda: None)
    reserved = {"a": {"CPU": 1}, "b": {"CPU": 1}, "c": {"CPU": 1}}
    monkeypatch.setattr(failures.ElasticScalingPolicy, "_get_reserved_resources",
                        lambda self: reserved)

    class State:
        def get_draining_nodes(self):
            return {"b": 12345}

    monkeypatch.setattr(failures, "ray_state", lambda: State())
    # "c" is gone, though Ray's view still lists it
    monkeypatch.setattr(failures, "alive_nodes", lambda: {"a", "b"})
    restart = policy.make_decision_for_non_running_worker_group()
    assert isinstance(restart, ResizeDecision) and restart.num_workers == 1
    # a running group of 1 does not grow onto the draining or the lost node...
    policy._latest_monitor_time = float("-inf")
    one = SimpleNamespace(start_time=float("-inf"), num_workers=1)
    assert isinstance(policy.make_decision_for_running_worker_group(one, None), NoopDecision)
    # ...a running group of 3 is not shrunk (its notice checkpoints first)...
    policy._latest_monitor_time = float("-inf")
    three = SimpleNamespace(start_time=float("-inf"), num_workers=3)
    assert isinstance(policy.make_decision_for_running_worker_group(three, None), NoopDecision)
    # ...and a group of 1 grows when a node that can take a worker joins
    monkeypatch.setattr(failures, "alive_nodes", lambda: {"a", "b", "c"})
    policy._latest_monitor_time = float("-inf")
    grown = policy.make_decision_for_running_worker_group(one, None)
    assert isinstance(grown, ResizeDecision) and grown.num_workers == 2
    # no node information: every node counts, as Ray counts them
    monkeypatch.setattr(failures, "ray_state", lambda: (_ for _ in ()).throw(RuntimeError()))
    assert policy.make_decision_for_non_running_worker_group().num_workers == 3


def test_a_node_whose_raylet_does_not_answer_is_not_counted():
    """Ray keeps a dead node alive in its view until its health checks fail (~17 s here); its
    raylet's port refuses at once. Real sockets on loopback: one listening, one closed."""
    import socket

    from pipeline.training.failures import answering

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        nodes = [{"NodeID": "up", "NodeManagerAddress": "127.0.0.1",
                  "NodeManagerPort": listening.getsockname()[1]},
                 {"NodeID": "dead", "NodeManagerAddress": "127.0.0.1",
                  "NodeManagerPort": closed_port}]
        assert answering(nodes) == {"up"}
        assert answering([]) == set()
    finally:
        listening.close()
