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
    # a drain without a deadline: Ray ends the group after its grace period, with no warning
    assert final_checkpoint_due(1000.0, None, checkpoint_s, step_s, every)


def test_a_coming_epoch_end_is_counted_before_the_deadline():
    """60 s left, 0.5 s steps, checkpoints of 2 s, rounds every 10 steps: mid-epoch there is
    time for another round; with the epoch's last 4 steps ahead, its validation and epoch
    checkpoint (50 s) come before the next round: the last checkpoint is now."""
    assert not final_checkpoint_due(1000.0, 1060.0, 2.0, 0.5, 10, steps_left=500, epoch_end_s=50)
    assert final_checkpoint_due(1000.0, 1060.0, 2.0, 0.5, 10, steps_left=4, epoch_end_s=50)
    assert not final_checkpoint_due(1000.0, 1060.0, 2.0, 0.5, 10, steps_left=4, epoch_end_s=5)


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


def _control(notices, epochs=2):
    import torch

    cfg = TrainConfig(epochs=epochs, checkpoint_every="1")
    return RunControl(cfg, rank=0, world=1, device=torch.device("cpu"), label="t",
                      get_notice=lambda: notices.pop(0) if notices else None, say=lambda s: None)


def test_a_notice_near_its_deadline_checkpoints_the_last_time_on_the_round_it_is_seen():
    """8 s left and 1 s steps: the first round that sees the notice is the last chance (the
    next round would be past the deadline); a drain with no deadline hands over at once."""
    control = _control([FakeNotice(8.0)])
    control.control_every = 10   # a GPU's rounds
    assert [control.after_step(0, s, 100, 1.0, 0.0, 1.0, s) for s in range(10)] == [None] * 9 + ["final"]
    assert control.notice_change == "new" and control.notice.nodes == ["n2"]
    no_deadline = FakeNotice(0.0)
    no_deadline.deadline_ms = None
    control = _control([no_deadline])
    assert control.after_step(0, 0, 100, 0.1, 0.0, 1.0, 0) == "final"


def test_a_second_notice_with_an_earlier_deadline_replaces_the_first():
    first, second = FakeNotice(600.0), FakeNotice(3.0)
    control = _control([first, None, second])
    assert control.after_step(0, 0, 100, 0.1, 0.0, 1.0, 0) == "notice"
    control.checkpointed(1.0)
    assert control.after_step(0, 1, 100, 0.1, 0.0, 1.0, 1) is None   # 600 s: train on
    assert control.after_step(0, 2, 100, 0.1, 0.0, 1.0, 2) == "final"
    assert control.notice_change == "earlier"
    assert control.notice.deadline == second.deadline_ms / 1000


def test_the_hand_over_waits_for_every_rank_so_rank_0_s_upload_is_not_cut(tmp_path):
    """Ray's report() returns at once on ranks that upload nothing: without a collective their
    HandOver reaches the controller while rank 0 still uploads, and the controller ends the
    group, rank 0 with it. Two real gloo ranks: rank 1's HandOver comes after the upload."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    uploaded = tmp_path / "uploaded"
    procs = [ctx.Process(target=_hand_over_rank, args=(r, port, str(uploaded), out))
             for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert got == {0: True, 1: True}, got   # each rank's HandOver saw the upload complete


def _hand_over_rank(rank: int, port: int, uploaded: str, out) -> None:
    import os
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    control = RunControl(TrainConfig(epochs=1), rank=rank, world=2, device=torch.device("cpu"),
                         label="t")
    try:
        if rank == 0:
            time.sleep(2.0)   # rank 0's report(): the upload of the last checkpoint
            open(uploaded, "w").close()
        control.hand_over()
    except HandOver:
        out.put((rank, os.path.exists(uploaded)))
    finally:
        dist.destroy_process_group()


def test_a_hand_over_restarts_uncounted_and_is_no_failure(tmp_path):
    """Every rank raising HandOver after the last checkpoint before a deadline restarts the
    group whatever max_failures is, and records no failure; one rank failing otherwise is a
    failure, counted by Ray's policy (here: max_failures 0, so it ends the run)."""
    from ray.train import FailureConfig
    from ray.train import WorkerGroupError
    from ray_internals import failure_policy_classes

    from pipeline.storage import Storage
    from pipeline.training.failures import FailureRecorder, StopOnUserError
    from pipeline.training.run_events import RunEvents

    def group_error(*errors):
        return WorkerGroupError("failed", dict(enumerate(errors)))

    DefaultFailurePolicy, FailureDecision = failure_policy_classes()
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
    from ray_internals import monitor_now, resize_decision_classes

    from pipeline.training import failures

    NoopDecision, ResizeDecision = resize_decision_classes()
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
    monitor_now(policy)
    one = SimpleNamespace(start_time=float("-inf"), num_workers=1)
    assert isinstance(policy.make_decision_for_running_worker_group(one, None), NoopDecision)
    # ...a running group of 3 is not shrunk (its notice checkpoints first)...
    monitor_now(policy)
    three = SimpleNamespace(start_time=float("-inf"), num_workers=3)
    assert isinstance(policy.make_decision_for_running_worker_group(three, None), NoopDecision)
    # ...and a group of 1 grows when a node that can take a worker joins
    monkeypatch.setattr(failures, "alive_nodes", lambda: {"a", "b", "c"})
    monitor_now(policy)
    grown = policy.make_decision_for_non_running_worker_group()
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


def test_a_node_joining_is_not_a_resize_the_group_checkpoints_and_hands_over_first(monkeypatch):
    """Ray's resize restarts the group with no checkpoint. The policy raises the grow flag
    instead; rank 0 reads it at its next round, the group checkpoints ("grow") and hands over;
    the restart (a non-running group's decision) clears the flag and takes the new node."""
    from types import SimpleNamespace

    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    from pipeline.training import failures

    flags = {}
    monkeypatch.setattr(failures, "set_grow", lambda key, wanted: flags.__setitem__(key, wanted))
    policy = failures.SkipDrainingNodes(ScalingConfig(num_workers=(1, 3)), grow=b"run")
    monkeypatch.setattr(policy, "_maybe_send_resource_request", lambda: None)
    monkeypatch.setattr(failures.ElasticScalingPolicy, "_get_reserved_resources",
                        lambda self: {"a": {"CPU": 1}, "b": {"CPU": 1}})
    monkeypatch.setattr(failures, "ray_state", lambda: SimpleNamespace(get_draining_nodes=dict))
    monkeypatch.setattr(failures, "alive_nodes", lambda: {"a", "b"})
    one = SimpleNamespace(start_time=float("-inf"), num_workers=1)
    policy._latest_monitor_time = float("-inf")
    assert isinstance(policy.make_decision_for_running_worker_group(one, None), NoopDecision)
    assert flags == {b"run": True}
    control = _control([])
    control.get_grow = lambda: flags[b"run"]
    assert control.after_step(0, 0, 100, 0.1, 0.0, 1.0, 0) == "grow"
    with pytest.raises(HandOver, match="nodes that joined"):
        control.hand_over("grow")
    restart = policy.make_decision_for_non_running_worker_group()
    assert isinstance(restart, ResizeDecision) and restart.num_workers == 2
    assert flags == {b"run": False}


def test_an_elastic_run_below_its_minimum_waits_a_bounded_time_then_ends_in_words(monkeypatch):
    from ray.train import ControllerError, ScalingConfig
    from ray.train.v2._internal.execution.failure_handling import (DefaultFailurePolicy,
                                                                   FailureDecision)
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    from pipeline.training import failures

    now = [0.0]
    policy = failures.SkipDrainingNodes(ScalingConfig(num_workers=(2, 4)), wait_s=600,
                                        clock=lambda: now[0])
    monkeypatch.setattr(policy, "_maybe_send_resource_request", lambda: None)
    room = {"a": {"CPU": 1}}
    monkeypatch.setattr(failures.ElasticScalingPolicy, "_get_reserved_resources",
                        lambda self: room)
    monkeypatch.setattr(failures, "ray_state", lambda: (_ for _ in ()).throw(RuntimeError()))
    for t in (0.0, 300.0, 599.0):
        now[0] = t
        assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)
    now[0] = 600.0
    with pytest.raises(UserError, match="minimum of 2 training worker.*10 minutes") as got:
        policy.make_decision_for_non_running_worker_group()
    # through the controller: a ControllerError the failure policy does not retry, in words
    error = ControllerError(got.value)
    policy_ = failures.StopOnUserError(DefaultFailurePolicy(
        __import__("ray.train", fromlist=["FailureConfig"]).FailureConfig(max_failures=5)))
    assert policy_.make_decision(error) == FailureDecision.RAISE
    assert failures.explain_failure(error, TrainConfig()) is got.value
    # room again before the bound: the wait starts over
    room["b"] = {"CPU": 1}
    assert isinstance(policy.make_decision_for_non_running_worker_group(), ResizeDecision)
    assert policy.below_since is None


def test_the_failure_recorder_writes_one_event_per_failure_not_one_per_poll(tmp_path):
    from pipeline.storage import Storage
    from pipeline.training.failures import FailureRecorder
    from pipeline.training.run_events import RunEvents

    recorder = FailureRecorder(Storage(), str(tmp_path))
    for _ in range(5):   # Ray polls every 2 s while it waits for the group to stop
        recorder.after_exception(None, {1: RuntimeError("node died")})
    assert len(RunEvents(Storage(), str(tmp_path)).all()) == 1
    recorder.after_report(None, [{}], None)   # the restarted group trained and reported
    recorder.after_exception(None, {1: RuntimeError("node died")})
    assert len(RunEvents(Storage(), str(tmp_path)).all()) == 2


def _events(*specs):
    return [{"kind": k, "time": float(t), **f} for t, (k, f) in enumerate(specs)]


@pytest.mark.parametrize("k,c", [(5, 3), (7, 3), (4, 4), (13, 5)])
def test_steps_lost_are_what_was_trained_past_the_checkpoint_resumed_from(tmp_path, k, c):
    """A death at step k of epoch 2 (k steps trained in it), checkpoints every c steps: the group
    resumes at the last multiple of c; the ranks' Reached records say k: k mod c are lost (the
    checkpoints and progress lines alone would have said 0 or less)."""
    from pipeline.training.run_events import Reached

    folder = tmp_path / "reached"
    first = Reached(folder, 0, attempt=1)
    first.write(1, 0, 20)
    for step in range(1, k + 1):
        first.write(1, step, 20)
    Reached(folder, 1, attempt=0).write(3, 19, 20)   # an earlier, larger group's rank: ignored
    reached = Reached.latest(folder)[1:]
    assert reached == (1, k, 20)
    kept = c * (k // c)
    events = _events(("driver_start", {}), ("start", {"world_size": 2}), ("first_step", {}),
                     ("checkpoint", {"epoch": 1, "step": kept}),
                     ("failure", {"error": "rank 0: RuntimeError: injected"}),
                     ("start", {"resumed_from_epoch": 1, "resumed_from_step": kept,
                                "world_size": 2, "reached": list(reached)}),
                     ("first_step", {}))
    [r] = recoveries(events)
    assert r["steps_lost"] == k % c and r["resumed_at"] == [1, kept]
    # across an epoch's end: 18 of 20 trained in epoch 2, resumed from the end of epoch 1
    assert steps_lost((1, 18, 20), (1, 0)) == 18 and steps_lost((2, 3, 20), (1, 15)) == 8
    assert steps_lost((1, 20, 20), (2, 0)) == 0


def test_a_notice_is_recorded_when_seen_even_when_no_checkpoint_followed():
    """The notice's entry comes from its own event: a group that died before its first
    checkpoint on the notice still shows the notice, with the steps it lost; a later notice
    with an earlier deadline replaces the deadline; a group that grew is a recovery."""
    notice = {"nodes": ["n2"], "ranks": [1], "deadline": 50.0, "seen": 3.0, "epoch": 1, "step": 4}
    events = _events(("driver_start", {}), ("start", {"world_size": 2}), ("first_step", {}),
                     ("checkpoint", {"epoch": 1, "step": 3}),
                     ("notice", {**notice, "update": False}),
                     ("notice", {**notice, "update": True, "deadline": 20.0}),
                     ("failure", {"error": "rank 1: ActorDiedError"}),
                     ("start", {"resumed_from_epoch": 1, "resumed_from_step": 3, "world_size": 1,
                                "reached": [1, 5, 20]}),
                     ("first_step", {}),
                     ("checkpoint", {"epoch": 1, "step": 9}),
                     ("handover", {"reason": "grow", "epoch": 1, "step": 9}),
                     ("start", {"resumed_from_epoch": 1, "resumed_from_step": 9, "world_size": 2,
                                "reached": [1, 9, 20]}),
                     ("first_step", {}))
    [p] = preemptions(events)
    assert p["checkpoint"] is None and p["deadline"] == 20.0 and p["notice_at"] == 3.0
    assert p["steps_lost"] == 2 and not p["handed_over"] and p["world_size_after"] == 1
    died, grew = recoveries(events)
    assert died["cause"] == "worker failure" and died["steps_lost"] == 2
    assert grew["cause"] == "nodes joined" and grew["steps_lost"] == 0
