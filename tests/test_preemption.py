"""A spot node's preemption notice costs no step: Ray drains the node (what the spot agent does
on a cloud's notice), every rank checkpoints at the next step boundary and again just before the
deadline, and the run resumes on the node that remains, at the next step, with the same global
batch; it grows back when a node joins; a node that dies without a notice costs at most one
checkpoint interval. Every epoch reads the samples an undisturbed run reads."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import add_trainer_node, start_cluster
from helpers import Running, events, expected_epoch_samples, last_json, wait_for

from ray_internals import drain_for_preemption, grow_flag_raised

from pipeline.training.trainer import HOLD_ENV

pytestmark = pytest.mark.slow

TINY = ["--arch", "resnet18", "--batch-size", 16, "--min-res", 32, "--max-res", 32,
        "--val-res", 32, "--start-ramp", 0, "--end-ramp", 0, "--lr", 0.4, "--lr-peak-epoch", 1,
        "--worker-resources", "trainer=1", "--json"]
EVERY = 3   # steps between checkpoints


def drain(cluster, node, seconds: float) -> float:
    """What the spot agent does on a notice: drain the node, reason preemption, with a deadline."""
    deadline = time.time() + seconds
    accepted, why = drain_for_preemption(cluster.address, node.node_id, int(deadline * 1000))
    assert accepted, why
    return deadline


def test_a_notice_costs_no_step_a_death_at_most_an_interval(train_data, node_caches, tmp_path):
    from pipeline.data.manifest import read_manifest
    from pipeline.data.placement import plan_layout
    from pipeline.storage import Storage

    run_dir = tmp_path / "runs" / "spot"
    # Holds (PIPELINE_TEST_HOLD) keep the run going however fast the machine: one worker waits
    # at epoch 4 step 5 until the policy wants to grow; the grown group waits at epoch 4 step 11
    # (after its checkpoint at step 9) until its new node has died.
    one, two = tmp_path / "hold-one", tmp_path / "hold-two"

    def held(path, line: str) -> bool:
        try:
            return line in Path(f"{path}.held").read_text().splitlines()
        except OSError:
            return False

    cluster = start_cluster(2, {}, node_caches)
    try:
        run = Running("train", "--data", train_data, "--storage", tmp_path / "runs", "--name",
                      "spot", "--epochs", 4, "--num-workers", "1-2", "--max-failures", 1,
                      "--checkpoint-every", f"{EVERY} steps", "--elastic-resize-seconds", 3,
                      "--progress-seconds", 1, "--log-every-steps", 2, *TINY,
                      env={"RAY_ADDRESS": cluster.address,
                           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
                           HOLD_ENV: f"3:4:{one}:1,3:10:{two}:2"})
        # a notice during epoch 2; the node goes at its deadline (as a cloud takes it)
        wait_for(lambda: any(e["epoch"] == 1 and e["step"] >= 1
                             for e in events(run_dir, "checkpoint")), "a checkpoint in epoch 2",
                 400, run.proc)
        doomed = list(cluster.worker_nodes)[1]
        deadline = drain(cluster, doomed, 20)
        wait_for(lambda: len(events(run_dir, "preemption_checkpoint")) == 2,
                 "the checkpoints on the notice and before the deadline", 120, run.proc)
        wait_for(lambda: time.time() > deadline, "the deadline", 60, run.proc)
        cluster.remove_node(doomed, allow_graceful=False)
        # back on one node; then a new node joins and the run grows back to two workers
        def stepping_on_one():
            starts = events(run_dir, "start")
            return starts[-1]["world_size"] == 1 and any(
                e["time"] > starts[-1]["time"] for e in events(run_dir, "first_step"))

        wait_for(stepping_on_one, "steps on the remaining node", 300, run.proc)
        joined = add_trainer_node(cluster)

        def grown_starts():
            return [e for e in events(run_dir, "start") if e["world_size"] == 2][1:]

        # the one worker held at its step never reaches its control round: it goes on once the
        # grow flag is up (or the group grew before the hold), and its next round checkpoints
        # and hands over
        wait_for(lambda: grow_flag_raised(cluster.address) or grown_starts(), "the grow flag",
                 300, run.proc)
        one.touch()

        def grown_and_checkpointed():
            starts = grown_starts()
            return len(starts) == 1 and any(c["time"] > starts[-1]["time"] and c["step"] > 0
                                            for c in events(run_dir, "checkpoint"))

        wait_for(grown_and_checkpointed, "two workers again, and a checkpoint", 300, run.proc)
        wait_for(lambda: held(two, "3 10 2"), "the grown group held at epoch 4 step 11", 300,
                 run.proc)
        cluster.remove_node(joined, allow_graceful=False)   # dies without a notice
        code, out = run.finish()
        assert code == 0, out[-4000:]
    finally:
        cluster.shutdown()
    summary = last_json(out)
    assert summary["epochs_completed"] == 4
    [p] = summary["preemptions"]
    assert p["nodes"] == [doomed.node_id] and abs(p["deadline"] - deadline) < 1
    assert p["checkpoint"][0] == 1 and p["checkpoint"][1] > 0       # inside epoch 2
    assert p["notice_at"] + p["checkpoint_seconds"] < deadline       # on storage in time
    assert p["handed_over"] and p["resumed_at"] == p["last_checkpoint"]
    # the group ended before its node went: the restart began before the deadline
    [h] = [e for e in events(run_dir, "handover") if e["reason"] == "preemption"]
    assert h["time"] < deadline, (h, deadline)
    assert p["steps_lost"] == 0 and p["world_size_after"] == 1
    # the node joining: a checkpoint and a hand-over, then the restart on two (no resize)
    grew, r = summary["recoveries"]
    assert grew["cause"] == "nodes joined" and grew["steps_lost"] == 0, grew
    assert any("nodes joined: checkpointed epoch" in x for x in out.splitlines())
    # the node that just died: what the group trained past its last checkpoint
    assert r["cause"] == "worker failure" and r["steps_lost"] is not None
    assert r["steps_lost"] <= EVERY, r
    starts = events(run_dir, "start")
    # in this order: two workers, one after the notice, two when a node joined, one after the
    # death (a start tried again at the same size would not break the promise)
    sizes = [s["world_size"] for s in starts]
    assert [w for i, w in enumerate(sizes) if i == 0 or sizes[i - 1] != w] == [2, 1, 2, 1], sizes
    assert {s["global_batch"] for s in starts} == {32}               # and so the lr schedule
    said = [x for x in out.splitlines() if "preemption notice" in x]
    assert len(said) == 2 and "the last before the deadline" in said[1]
    assert any("resumed from epoch" in x and "on 1 worker(s): global batch 32, 32 per worker "
               "per step in 2 micro-batch(es)" in x for x in out.splitlines())
    # long epochs say where they are: a line every --progress-seconds, metrics inside epochs
    assert any("step" in x and "waiting for data" in x and "run ETA" in x for x in out.splitlines())
    import os

    from helpers import mlflow_client
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    steps = client.get_metric_history(summary["mlflow_run_id"], "step_train_loss")
    assert len(steps) >= 10   # every 2 steps of 4 epochs of 18
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["preemptions"] == 1
    assert json.loads(run.data.tags["preemptions"])[0]["steps_lost"] == 0
    # every epoch read exactly what an undisturbed run reads
    shards = read_manifest(Storage(), train_data).splits["train"].shards
    layout = plan_layout(shards, "global", ["x", "y"], 0, 32)
    assert summary["epoch_samples"] == expected_epoch_samples(train_data, 4, 0, [layout] * 4)
    print("preemption:", json.dumps(p), "recovery:", json.dumps(r))


def test_a_sweep_trial_on_a_preempted_node_resumes_and_the_best_is_registered(
        train_data, node_caches, tmp_path):
    """The trial's node is drained in its epoch 2: the trial checkpoints, resumes on the other
    node from that step, completes (not an errored or restarted-from-zero trial), and the sweep
    registers its best. The trial is held at epoch 2 step 2 (PIPELINE_TEST_HOLD) until its node
    is draining: the notice comes almost three epochs before the trial's end, however fast the
    machine."""
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.4]}\n")
    runs = tmp_path / "sweeps"
    hold = tmp_path / "hold"
    cluster = start_cluster(2, {}, node_caches)
    try:
        # --min-val-top1: a gate any trained model passes (preemption is under test, not learning)
        run = Running("tune", "--data", train_data, "--storage", runs, "--name", "spot-sweep",
                      "--epochs", 4, "--search-space", space, "--trials", 1,
                      "--num-workers", 1, "--max-failures", 0, "--register-as", "spot-model",
                      "--min-val-top1", 0.01,
                      *[a for a in TINY if a not in ("--lr", 0.4)], "--cache-dir",
                      tmp_path / "cache", env={"RAY_ADDRESS": cluster.address,
                                               "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
                                               HOLD_ENV: f"1:1:{hold}"})

        def trial_dir():
            found = list((runs / "spot-sweep" / "runs").glob("*/events"))
            return found[0].parent if found else None

        wait_for(lambda: Path(f"{hold}.held").exists(), "the trial held at epoch 2 step 2", 400,
                 run.proc)
        [data] = [e for e in events(trial_dir(), "node_data") if e["split"] == "train"]
        node = next(n for n in cluster.worker_nodes if n.node_id == data["node"])
        deadline = drain(cluster, node, 8)   # accepted: the GCS holds the notice from now on
        hold.touch()
        wait_for(lambda: events(trial_dir(), "preemption_checkpoint"), "the notice's checkpoint",
                 120, run.proc)
        wait_for(lambda: time.time() > deadline, "the deadline", 60, run.proc)
        cluster.remove_node(node, allow_graceful=False)
        code, out = run.finish()
        assert code == 0, out[-4000:]
    finally:
        cluster.shutdown()
    result = last_json(out)
    [trial] = result["trials"]
    assert trial["status"] == "TERMINATED" and trial["epochs_completed"] == 4
    summary = json.loads((trial_dir() / "summary.json").read_text())
    [p] = summary["preemptions"]
    # at a step after the hold, inside an epoch (the last checkpoint before the deadline)
    assert p["steps_lost"] == 0 and tuple(p["resumed_at"]) > (1, 1) and p["resumed_at"][1] > 0
    sizes = [e["world_size"] for e in events(trial_dir(), "start")]
    assert len(sizes) >= 2 and set(sizes) == {1}, sizes   # restarted (a start retried may add one)
    assert result["model_name"] == "spot-model" and result["alias"] == "champion"
