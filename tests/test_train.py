"""`pipeline train`: Ray Train V2 on multi-node clusters on this machine, its fault tolerance, each
node's share of the data, and faults outside the training loop."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import add_trainer_node, start_cluster
from helpers import (PIPELINE, Running, actor_ids, events, last_json, mlflow_client,
                     pending_placement_groups, run_cli, train_workers, wait_for)

from ray_internals import (PLACEMENT_GROUP_CLEANER, TRAIN_CONTROLLER, TRAIN_WORKER, alive_actors,
                           registered_checkpoint)

from pipeline.training.run_events import recoveries
from pipeline.training.trainer import HOLD_ENV

pytestmark = pytest.mark.slow   # real services / Ray clusters

# ResNet-18 at 32 px on 600 images: ~4 s per epoch with 2 workers on 2 cores.
TINY = ["--arch", "resnet18", "--batch-size", 16, "--min-res", 32, "--max-res", 32,
        "--val-res", 32, "--start-ramp", 0, "--end-ramp", 0, "--lr", 0.4, "--lr-peak-epoch", 1,
        "--worker-resources", "trainer=1", "--json"]


def train_args(data, tmp_path, name, epochs=3, workers="2", extra=(), cache=True):
    """With cache=False each node uses its own cache folder (PIPELINE_CACHE_DIR of its node)."""
    return ["train", "--data", data, "--storage", tmp_path / "runs", "--name", name,
            *(["--cache-dir", tmp_path / "cache"] if cache else []), "--epochs", epochs,
            "--num-workers", workers, *TINY, *extra]


_registered = registered_checkpoint


def wait_for_checkpoint(run_dir: Path, epoch: int, proc=None, timeout=300) -> None:
    wait_for(lambda: _registered(run_dir, epoch), f"the checkpoint of epoch {epoch} in {run_dir}",
             timeout, proc)


def manifest_of(data: str) -> dict:
    return json.loads((Path(data) / "manifest.json").read_text())


def share_bound(data: str, split: str, nodes: int) -> int:
    """Goal of the per-node placement: at most D/N plus two shards (a node reads its exact share:
    whole shards and at most two cut ones, which it holds whole)."""
    shards = manifest_of(data)["splits"][split]["shards"]
    return sum(s["bytes"] for s in shards) / nodes + 2 * max(s["bytes"] for s in shards)


def test_worker_exception_restarts_from_last_checkpoint(train_data, ray_cluster, tmp_path):
    """Two workers on two nodes, each node holding only its share, learn the sample classes; a
    worker raising in epoch 2 after its 6th step, checkpoints every 4 steps, costs one restart
    from step 4 and exactly 6 mod 4 = 2 steps lost (counted from what the group trained)."""
    marker = tmp_path / "fault-fired"
    out = last_json(run_cli(*train_args(train_data, tmp_path, "exc", epochs=4, cache=False,
                                        extra=["--placement", "node",
                                               "--checkpoint-every", "4 steps"]),
                            env={"RAY_ADDRESS": ray_cluster.address,
                                 "PIPELINE_INJECT_FAULT": f"1:5:{marker}"}).stdout)
    assert marker.exists()
    assert out["epochs_completed"] == 4
    meta = json.loads((Path(out["checkpoint"]) / "meta.json").read_text())
    # the figure said is the last checkpoint's, over the whole val split (whatever it learned)
    assert out["val_top1"] == meta["metrics"]["val_top1"] and 0 <= out["val_top1"] <= 1, out
    assert meta["num_classes"] == 4 and meta["metrics"]["world_size"] == 2
    assert meta["metrics"]["val_images"] == 40   # the whole val split, counted once
    assert meta["classes"][0]["wnid"].startswith("n") and len(meta["manifest_sha256"]) == 64
    # the best and the last checkpoint are kept, older ones removed
    kept = sorted(p.name for p in (tmp_path / "runs" / "exc").glob("epoch-*"))
    assert 1 <= len(kept) <= 2 and kept[-1].startswith("epoch-0004")
    for name in kept:   # each rank wrote its own RNG state there: none went through another rank
        assert sorted(p.name for p in (tmp_path / "runs" / "exc" / name).glob("rng-*.pt")) == \
            ["rng-00000.pt", "rng-00001.pt"]
    assert out["restarts"] == 1 and out["resumed_from_epoch"] == 1   # not from epoch 0
    assert [r["cause"] for r in out["recoveries"]] == ["worker failure"]
    assert "injected fault" in out["recoveries"][0]["error"]
    assert out["recoveries"][0]["resumed_at"] == [1, 4]
    assert out["recoveries"][0]["steps_lost"] == 6 % 4
    assert out["recoveries"][0]["seconds"] > 0
    # each node holds its share of each split, no more; together they hold all of it
    data = out["node_data"]
    assert len({d["node"] for d in data}) == 2
    for split in ("train", "val"):
        held = [d for d in data if d["split"] == split]
        assert all(d["share_bytes"] <= share_bound(train_data, split, 2) for d in held), held
        total = len(manifest_of(train_data)["splits"][split]["shards"])
        assert total <= sum(d["shards"] for d in held) <= total + 1   # one shard cut in two
        assert all(d["placement"] == "node" for d in held)
    print("recoveries:", json.dumps(out["recoveries"]), "node data:", json.dumps(data))


def test_worker_then_driver_killed_and_rerun_with_same_name_resumes(train_data, ray_cluster,
                                                                    tmp_path):
    """A worker is kill -9ed mid-epoch (Ray Train restarts the group from the checkpoint), then
    the driver itself is killed: the same command with the same name resumes the run. Then the
    finished run is trained again from scratch with --restart, starting from its own weights
    (--init-from): the two flags as users give them, on a finished run's checkpoint."""
    args = [PIPELINE, *map(str, train_args(train_data, tmp_path, "driver", epochs=4))]
    # every worker group of this driver is held at epoch 2 step 4 (never released): both kills
    # come mid-epoch, before the run could end, however fast the machine
    hold = tmp_path / "hold"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, **{HOLD_ENV: f"1:3:{hold}"})
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    run_dir = tmp_path / "runs" / "driver"
    wait_for_checkpoint(run_dir, 1, proc)
    wait_for(lambda: Path(f"{hold}.held").exists(), "the workers held in epoch 2", 300, proc)
    # this cluster's workers (its State API): another suite's on this machine are not ours
    wait_for(lambda: len(train_workers(ray_cluster.address)) == 2, "two training workers", 60, proc)
    os.kill(train_workers(ray_cluster.address)[0], signal.SIGKILL)

    def training_again() -> bool:
        failures = events(run_dir, "failure")
        return bool(failures) and any(e["time"] > failures[0]["time"]
                                      for e in events(run_dir, "first_step"))

    wait_for(training_again, "training again after the worker was killed", 300, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = last_json(run_cli(*args[1:], env={"RAY_ADDRESS": ray_cluster.address}).stdout)
    assert out["epochs_completed"] == 4
    # where each start resumed from (the summary keeps only the last one's): the first from
    # nothing, the worker group Ray Train restarted after the kill from a checkpoint (not epoch
    # 0), and the rerun of the killed driver from one too
    killed = events(run_dir, "failure")[0]["time"]
    rerun = events(run_dir, "driver_start")[1]["time"]
    starts = [(e["time"], e["resumed_from_epoch"]) for e in events(run_dir, "start")]
    assert starts[0][1] is None, starts
    after_kill = [epoch for t, epoch in starts if killed < t < rerun]
    after_rerun = [epoch for t, epoch in starts if t > rerun]
    assert after_kill and all(epoch is not None and epoch >= 1 for epoch in after_kill), starts
    assert after_rerun and all(epoch is not None and epoch >= 1 for epoch in after_rerun), starts
    assert out["restarts"] >= 2
    causes = [r["cause"] for r in out["recoveries"]]
    assert causes[0] == "worker failure" and "driver restarted" in causes
    assert all(r["seconds"] > 0 for r in out["recoveries"])
    print("recoveries:", json.dumps(out["recoveries"]), "starts:", starts)
    again = run_cli(*args[1:], env={"RAY_ADDRESS": ray_cluster.address})
    assert "finished earlier" in again.stdout   # reported, not run (or counted) once more
    assert last_json(again.stdout) == out

    # The same name with another recipe or other data is not this run: refused, not resumed
    # (nor handed back as if it were the new one).
    env = {"RAY_ADDRESS": ray_cluster.address}
    other = _train_error(*map(str, train_args(train_data, tmp_path, "driver", epochs=4,
                                              extra=["--lr", 0.2])[1:]), env=env)
    assert "run driver" in other and "lr 0.4 -> 0.2" in other and "--restart" in other
    copy = tmp_path / "copy-of-data"
    shutil.copytree(train_data, copy)
    other = _train_error(*map(str, train_args(str(copy), tmp_path, "driver", epochs=4)[1:]), env=env)
    assert "data" in other and "copy-of-data" in other

    # --restart: the finished run is discarded and trained from epoch 0 again; --init-from: from
    # the finished run's weights (copied out first: --restart empties the run's folder). One
    # step at an lr of 1e-6 leaves the weights where they started, so they show where that was.
    weights = tmp_path / "weights"
    shutil.copytree(out["checkpoint"], weights)
    restarted = run_cli(*train_args(train_data, tmp_path, "driver", epochs=1, workers="1",
                                    extra=["--restart", "--init-from", weights, "--lr", 1e-6,
                                           "--max-steps-per-epoch", 1]), env=env)
    assert "finished earlier" not in restarted.stdout
    assert f"init from {weights}" in restarted.stdout
    fresh = last_json(restarted.stdout)
    assert fresh["epochs_completed"] == 1 and fresh["restarts"] == 0
    assert [e["resumed_from_epoch"] for e in events(run_dir, "start")] == [None]   # from epoch 0
    assert len(events(run_dir, "driver_start")) == 1   # the old run's events went with it
    meta = json.loads((Path(fresh["checkpoint"]) / "meta.json").read_text())
    assert meta["config"]["run"]["init_from"] == str(weights)
    import torch

    from pipeline.training.model import build_model

    source, tuned = _weights(weights), _weights(fresh["checkpoint"])
    torch.manual_seed(0)   # what the run would have started from without --init-from
    scratch = build_model("resnet18", 4, True).state_dict()
    assert _distance(source, tuned) < 1e-4 < _distance(scratch, tuned), (
        _distance(source, tuned), _distance(scratch, tuned))


def _weights(folder) -> dict:
    import torch

    state = torch.load(Path(folder) / "checkpoint.pt", map_location="cpu", weights_only=True)
    return state["model"]


def _distance(a: dict, b: dict) -> float:
    """The largest difference between two models' learned weights (not BatchNorm's running
    statistics, which one training step moves by 10 %)."""
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a
               if a[k].is_floating_point() and "running_" not in k)


def test_sigterm_stops_the_run_in_words_and_the_same_command_resumes(train_data, ray_cluster,
                                                                       tmp_path):
    """What a scheduler (or Kubernetes) sends: the driver ends at once with 143 and one line,
    not Ray's abort (exit 134 and a stack dump); the same command then resumes the run."""
    args = [PIPELINE, *map(str, train_args(train_data, tmp_path, "term", epochs=3, workers="1"))]
    hold = tmp_path / "hold"   # held at epoch 2 step 4 until the signal has ended the run
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, **{HOLD_ENV: f"1:3:{hold}"})
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    wait_for_checkpoint(tmp_path / "runs" / "term", 1, proc)
    wait_for(lambda: Path(f"{hold}.held").exists(), "the worker held in epoch 2", 300, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "interrupted (SIGTERM): re-run with the same --name to resume" in stderr
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr
    out = last_json(run_cli(*args[1:], env={"RAY_ADDRESS": ray_cluster.address}).stdout)
    # from epoch 1's checkpoint: the signal came while the run was held in epoch 2
    assert out["epochs_completed"] == 3 and out["resumed_from_epoch"] == 1, out


class Training(Running):
    """`pipeline train` on `cluster` in the background (helpers.Running), killed when the test
    ends. The test changes the cluster from this (main) thread: Ray's cluster utilities hang when
    driven from a side thread."""

    def __init__(self, cluster, args, env: dict | None = None):
        super().__init__(*args, env={"RAY_ADDRESS": cluster.address, **(env or {})})

    def wait_for(self, check, what: str, timeout: float = 400):
        return wait_for(check, what, timeout, self.proc)

    def interrupt(self) -> None:
        """Ctrl-C, which must end the run at once, saying how to resume."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        code, said = self.finish(timeout=120)
        print(f"Ctrl-C ended the run in {time.monotonic() - sent:.1f} s")   # a figure, not a bound
        assert code == 130, said[-3000:]
        assert [line for line in self.lines if line.startswith("interrupted")] == [
            "interrupted (SIGINT): re-run with the same --name to resume from its last "
            "checkpoint\n"], self.lines[-20:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# Each time Ray Train starts the worker group it waits this long for room (Ray's own variable,
# which the run reads to set how many tries --resource-wait-minutes allows): the node test's
# waits take seconds.
START_TRY_SECONDS = 10
WAIT_MINUTES = 0.5


def test_node_removed_waited_for_replaced_then_lost_for_good(train_data, s3, node_caches,
                                                             tmp_path):
    """Rank 0's node may be the one removed. The run waits for room (a first try to start the
    workers times out and is tried again) and resumes from its checkpoint on the replacement
    when one joins: the node that stayed keeps its shards, the new one fetches only its share.
    Then a node goes for good: once the tries --resource-wait-minutes allows are spent, the run
    ends, exit 2, in one line."""
    run_dir = tmp_path / "runs" / "node"
    args = train_args(train_data, tmp_path, "node", epochs=50, cache=False,
                      extra=["--placement", "node", "--resource-wait-minutes", WAIT_MINUTES])
    cluster = start_cluster(2, s3.env(), node_caches)
    try:
        with Training(cluster, args, env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S":
                                          str(START_TRY_SECONDS)}) as run:
            run.wait_for(lambda: _registered(run_dir, 1), "the checkpoint of epoch 1")
            cluster.remove_node(list(cluster.worker_nodes)[0], allow_graceful=False)
            removed = time.time()
            waiting: set[str] = set()

            def tried_again() -> bool:   # a second placement group: the first one timed out
                waiting.update(pending_placement_groups(cluster.address))
                return len(waiting) >= 2

            run.wait_for(tried_again, "a second try to place the workers", 300)
            add_trainer_node(cluster)

            def restarted() -> dict | None:
                later = [e for e in events(run_dir, "start") if e["time"] > removed]
                steps = events(run_dir, "first_step")
                if later and any(e["time"] > later[0]["time"] for e in steps):
                    return later[0]
                return None

            restart = run.wait_for(restarted, "training again on the new node", 300)
            run.wait_for(lambda: _registered(run_dir, restart["resumed_from_epoch"] + 1),
                         "an epoch trained after the restart", 300)
            cluster.remove_node(list(cluster.worker_nodes)[0], allow_graceful=False)
            lost = time.monotonic()
            code, said = run.finish(timeout=300)
            gave_up_after = time.monotonic() - lost
            assert code == 2, said[-3000:]
    finally:
        cluster.shutdown()
    assert [line for line in run.lines if line.startswith("error:")] == [
        "error: could not place 2 training workers for 0.5 minutes (the cluster lost nodes, or "
        "never had room); add nodes or lower --num-workers\n"], run.lines[-20:]
    assert "Traceback" not in said
    # it waited, at least one whole try, and gave up once the bound was spent (at most one try
    # over it; seconds for the loss to be seen and the run to end)
    assert START_TRY_SECONDS <= gave_up_after <= 60 * WAIT_MINUTES + START_TRY_SECONDS + 45
    starts = events(run_dir, "start")
    assert starts[0]["resumed_from_epoch"] is None and restart["resumed_from_epoch"] >= 1
    assert restart["world_size"] == 2 and len(starts) == 2   # nothing started after the loss
    history = sorted((json.loads(p.read_text()) for p in (run_dir / "events").glob("*.json")),
                     key=lambda e: e["time"])
    recovery = recoveries(history)[0]
    assert recovery["cause"] == "worker failure"
    assert recovery["seconds"] > START_TRY_SECONDS   # the replacement came after a try timed out
    records = events(run_dir, "node_data")
    first = {r["node"] for r in records[:4]}
    assert len(first) == 2
    for split in ("train", "val"):
        before = {r["node"]: r for r in records[:4] if r["split"] == split}
        later = [r for r in records[4:] if r["split"] == split]
        stayed = [r for r in later if r["node"] in first]
        new = [r for r in later if r["node"] not in first]
        assert new and stayed, records
        # the node that stayed kept every shard it had; only what the removed node held was
        # fetched again, and the shard cut between the two nodes (val has one shard: each node
        # reads part of it)
        assert all(r["shards_kept"] >= before[r["node"]]["shards"] for r in stayed), records
        total = len(manifest_of(train_data)["splits"][split]["shards"])
        kept = sum(before[n]["shards"] for n in {r["node"] for r in stayed})
        assert total - kept <= sum(r["shards_fetched"] for r in later) <= total - kept + 1, records
        # the replacement fetched its share and no more; together they hold the whole split
        bound = share_bound(train_data, split, 2)
        arrived = {}
        for r in new:   # what each new node fetched when it joined
            arrived.setdefault(r["node"], r)
        assert all(r["bytes_downloaded"] == r["share_bytes"] <= bound
                   for r in arrived.values()), new
        final = {r["node"]: r for r in later}   # each node's last record
        assert total <= sum(r["shards"] for r in final.values()) <= total + 1
        if split == "train":
            assert all(r["bytes_downloaded"] > 0 for r in arrived.values())
    print("recoveries:", json.dumps(recoveries(history)), "gave up after",
          round(gave_up_after), "s")


def test_elastic_training_grows_when_a_node_joins(train_data, s3, node_caches, tmp_path):
    """Starts with one worker, grows to two when a node joins; the data re-balances: the first
    node keeps what it has, the new one fetches only its share. The test waits for the events it
    asserts, holding the run at a step of epoch 2 (PIPELINE_TEST_HOLD) until then: the one
    worker until the node has joined, the two workers of the grown group until Ctrl-C stops
    the run."""
    run_dir = tmp_path / "runs" / "elastic"
    # the one worker waits at epoch 2 step 6 until the node has joined (then it goes on, sees
    # the grow at its next control round, checkpoints and hands over); the grown group waits at
    # its first step until Ctrl-C
    one, two = tmp_path / "hold-one", tmp_path / "hold-two"

    def held(path, world: int) -> bool:
        try:
            return any(line.endswith(f" {world}")
                       for line in Path(f"{path}.held").read_text().splitlines())
        except OSError:
            return False

    cluster = start_cluster(1, s3.env(), node_caches)
    try:
        args = train_args(train_data, tmp_path, "elastic", epochs=50, workers="1-2", cache=False,
                          extra=["--elastic-resize-seconds", 3, "--placement", "node"])
        with Training(cluster, args, env={HOLD_ENV: f"1:5:{one}:1,*:*:{two}:2"}) as run:
            run.wait_for(lambda: held(one, 1), "one worker held at epoch 2 step 6")
            run.wait_for(lambda: _registered(run_dir, 1), "the checkpoint of epoch 1")
            add_trainer_node(cluster)
            one.touch()
            run.wait_for(lambda: held(two, 2), "the grown group held at its first step")
            run.interrupt()
    finally:
        cluster.shutdown()
    sizes = [e["world_size"] for e in events(run_dir, "start")]
    assert sizes[0] == 1 and sizes[-1] == 2, sizes
    records = [r for r in events(run_dir, "node_data") if r["split"] == "train"]
    first_node = records[0]["node"]
    after = [r for r in records if r["world_size"] == 2]
    assert {r["node"] for r in after} >= {first_node} and len({r["node"] for r in after}) == 2
    for r in after:
        if r["node"] == first_node:
            assert r["shards_fetched"] == 0 and r["shards"] < records[0]["shards"]
        else:
            assert 0 < r["bytes_downloaded"] <= share_bound(train_data, "train", 2)


def _train_error(*args, env=None):
    proc = run_cli("train", *args, env=env, check=False, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_clear_errors(train_data, ray_cluster, tmp_path):
    env = {"RAY_ADDRESS": ray_cluster.address}
    (tmp_path / "nothing").mkdir()
    assert "manifest.json is missing" in _train_error("--data", tmp_path / "nothing", env=env)
    proc = run_cli("train", "--data", train_data, "--arch", "resnet99", check=False)
    assert proc.returncode == 2 and "invalid choice: 'resnet99'" in proc.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("arch: resnet99\nepochs: 2\n")
    msg = _train_error("--config", cfg, "--data", train_data, env=env)
    assert "arch" in msg and "resnet99" in msg
    msg = _train_error("--data", train_data, "--num-workers", 5, "--worker-resources", "trainer=1",
                       "--batch-size", 16, "--storage", tmp_path / "runs", env=env)
    assert "can hold 2 such workers" in msg

    # Errors that can never succeed are not retried, even with unlimited restarts.
    msg = _train_error(*map(str, train_args(train_data, tmp_path, "huge", extra=[
        "--batch-size", 4096, "--max-failures", -1])[1:]), env=env)
    assert "--batch-size 4096" in msg and "fewer than one batch" in msg
    assert not (tmp_path / "runs" / "huge").exists()   # refused before anything started

    corrupt = tmp_path / "corrupt"
    shutil.copytree(train_data, corrupt)
    manifest = json.loads((corrupt / "manifest.json").read_text())
    shard = corrupt / manifest["splits"]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF   # same size: only the sha256, checked as a node fetches it, can tell
    shard.write_bytes(bytes(data))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    msg = _train_error(*map(str, train_args(str(corrupt), tmp_path, "corrupt", extra=[
        "--max-failures", -1, "--tracking-uri", tracking, "--experiment", "refused"])[1:]), env=env)
    assert msg.startswith(f"error: {shard}: ")   # the line names the shard
    assert "does not match the manifest" in msg and "re-run `pipeline stage`" in msg
    assert len(events(tmp_path / "runs" / "corrupt", "failure")) == 1   # not retried
    client = mlflow_client(tracking)   # the refused run is not left RUNNING
    runs = client.search_runs([client.get_experiment_by_name("refused").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]

    # A missing shard is found before anything starts, even with unlimited restarts: no run
    # folder, no MLflow run, no Train controller or worker in the cluster.
    missing = corrupt / manifest["splits"]["val"]["shards"][0]["path"]
    missing.unlink()

    def train_actors():
        return {cls: actor_ids(ray_cluster.address, cls)
                for cls in (TRAIN_CONTROLLER, TRAIN_WORKER)}

    before = train_actors()
    msg = _train_error(*map(str, train_args(str(corrupt), tmp_path, "gone", extra=[
        "--max-failures", -1, "--tracking-uri", tracking, "--experiment", "gone"])[1:]), env=env)
    assert f"{missing} is missing" in msg and "re-run `pipeline stage`" in msg
    assert not (tmp_path / "runs" / "gone").exists()
    gone = client.get_experiment_by_name("gone")
    assert gone is None or not client.search_runs([gone.experiment_id])
    assert train_actors() == before


def test_running_out_of_max_failures_ends_the_run_in_words(train_data, ray_cluster, tmp_path):
    """A worker that fails at the same step every time (twice here) with --max-failures 1: Ray
    Train restarts the group once, then the run ends with exit 2 and one line naming the bound
    and the failure, not a traceback."""
    marker = tmp_path / "faults"
    args = train_args(train_data, tmp_path, "spent", epochs=2, workers="1",
                      extra=["--max-failures", 1])
    msg = _train_error(*map(str, args[1:]), env={"RAY_ADDRESS": ray_cluster.address,
                                                  "PIPELINE_INJECT_FAULT": f"0:1:{marker}:2"})
    assert "failed 2 times, more than --max-failures 1 allows" in msg, msg
    assert "RuntimeError: injected fault 2 of 2 at epoch 0 step 1" in msg, msg
    assert "--name spent" in msg
    run_dir = tmp_path / "runs" / "spent"
    assert len(marker.read_text().splitlines()) == 2
    assert len(events(run_dir, "failure")) == 2 and len(events(run_dir, "start")) == 2


def test_mlflow_outage_mid_training_costs_no_restart(train_data, ray_cluster, tmp_path):
    """The tracking server goes away after epoch 1 and comes back two epochs later on the same
    port: training goes on, and every epoch's metrics reach MLflow. Meanwhile another Ray
    instance, started later on this machine, is up (a user's own `ray start`): Ray Train's
    placement-group cleaner must ask this run's cluster whether its controller lives, not that
    one. Asking that one, it finds no such controller and either quits at once (no safety net
    for the run) or, when the answer comes after the workers started, removes their placement
    group: the healthy run's workers are killed."""
    from ray.cluster_utils import Cluster

    from pipeline.ops.local_services import free_ports, start_mlflow

    port = free_ports(1)[0]
    # epoch 2 waits at its first step until the server is down, epoch 4 until the outbox is seen
    hold, hold4 = tmp_path / "hold", tmp_path / "hold4"
    other = Cluster(initialize_head=True,   # now /tmp/ray/ray_current_cluster names it
                    head_node_args={"num_cpus": 0, "dashboard_port": free_ports(1)[0]})
    server = start_mlflow(tmp_path / "mlflow", port=port)
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, MLFLOW_TRACKING_URI=server.uri,
               **{HOLD_ENV: f"1:0:{hold},3:0:{hold4}"})
    args = train_args(train_data, tmp_path, "outage", epochs=4, extra=["--experiment", "outage"])
    proc = subprocess.Popen([PIPELINE, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    run_dir = tmp_path / "runs" / "outage"
    try:
        wait_for_checkpoint(run_dir, 1, proc)
        wait_for(lambda: Path(f"{hold}.held").exists(), "epoch 2 held at its first step", 300, proc)
        server.stop()
        hold.touch()
        cleaners = alive_actors(ray_cluster.address, PLACEMENT_GROUP_CLEANER)
        assert len(cleaners) == 1, cleaners   # this run's, still watching its controller
        wait_for_checkpoint(run_dir, 3, proc)

        def held_epochs() -> set:
            held = []
            for f in (run_dir / "mlflow-outbox").glob("*.json"):
                try:
                    held.append(json.loads(f.read_text()))
                except (OSError, ValueError):   # being written
                    pass
            return {e["step"] for e in held if "val_top1" in e["metrics"]}

        # during the outage the outbox holds what could not be sent: epochs 2 and 3
        wait_for(lambda: held_epochs() >= {2, 3}, "epochs 2 and 3 in the outbox", 300, proc)
        server = start_mlflow(tmp_path / "mlflow", port=port)
        hold4.touch()
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-3000:]
        out = last_json(stdout)
        assert out["restarts"] == 0 and out["epochs_completed"] == 4
        assert stdout.count("[mlflow] warning") == 1   # said once, in one line
        client = mlflow_client(server.uri)
        run = client.get_run(out["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
        assert sorted(steps) == [1, 2, 3, 4]
        assert not list((run_dir / "mlflow-outbox").glob("*.json"))   # all sent
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
        other.shutdown()


def test_loader_sees_every_sample_once_per_epoch_across_workers(tmp_path):
    """Two gloo ranks over one .beton whose labels are the sample indices."""
    import numpy as np

    from pipeline.config import WriterSettings
    from pipeline.data.shards import write_beton

    path = tmp_path / "ids.beton"
    n = 103   # not a multiple of world x batch: the trim and drop_last are exercised
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(n)]
    write_beton(path, images, list(range(n)), WriterSettings(max_resolution=64), seed=0)
    script = Path(__file__).with_name("loader_ranks.py")
    out = subprocess.run([os.path.join(os.path.dirname(PIPELINE), "python"), str(script), str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    for epoch in ("0", "1"):
        ranks = seen[epoch]
        assert len(ranks["0"]) == len(ranks["1"]) == 48   # 51 each, 3 dropped by drop_last (bs 8)
        both = ranks["0"] + ranks["1"]
        assert len(set(both)) == len(both)                # no sample twice in an epoch
    assert seen["0"]["0"] != seen["1"]["0"]               # reshuffled per epoch
