"""`pipeline train`: Ray Train V2 on multi-node clusters on this machine, and its fault tolerance."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import start_cluster
from helpers import PIPELINE, last_json, run_cli

pytestmark = pytest.mark.slow   # real services / Ray clusters

# ResNet-18 at 32 px on 600 images: ~4 s per epoch with 2 workers on 2 cores.
TINY = ["--arch", "resnet18", "--batch-size", 16, "--min-res", 32, "--max-res", 32,
        "--val-res", 32, "--start-ramp", 0, "--end-ramp", 0, "--lr", 0.4, "--lr-peak-epoch", 1,
        "--worker-resources", "trainer=1", "--json"]


def train_args(data, tmp_path, name, epochs=3, workers="2", extra=()):
    return ["train", "--data", data, "--storage", tmp_path / "runs", "--name", name,
            "--cache-dir", tmp_path / "cache", "--epochs", epochs, "--num-workers", workers,
            *TINY, *extra]


def _registered(run_dir: Path, epoch: int) -> bool:
    """The checkpoint is written and Ray Train's controller has recorded it in its snapshot
    (only then can a new driver resume from it)."""
    try:
        return f'"epoch-{epoch:04d}-' in (run_dir / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return False


def wait_for_checkpoint(run_dir: Path, epoch: int, proc=None, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while not _registered(run_dir, epoch):
        if proc is not None:
            assert proc.poll() is None, "training ended before the fault could be injected"
        assert time.monotonic() < deadline, f"no checkpoint for epoch {epoch} in {run_dir}"
        time.sleep(0.2)


def test_worker_exception_restarts_from_last_checkpoint(train_data, ray_cluster, tmp_path):
    """Two workers learn the sample classes; a worker raising in epoch 2 costs one restart from
    the epoch-1 checkpoint."""
    marker = tmp_path / "fault-fired"
    out = last_json(run_cli(*train_args(train_data, tmp_path, "exc", epochs=4),
                            env={"RAY_ADDRESS": ray_cluster.address,
                                 "PIPELINE_INJECT_FAULT": f"1:5:{marker}"}).stdout)
    assert marker.exists()
    assert out["epochs_completed"] == 4
    assert out["val_top1"] > 0.6, out   # 4 colour-coded classes: chance is 0.25
    meta = json.loads((Path(out["checkpoint"]) / "meta.json").read_text())
    assert meta["num_classes"] == 4 and meta["metrics"]["world_size"] == 2
    assert meta["metrics"]["val_images"] == 40   # the whole val split, counted once
    assert meta["classes"][0]["wnid"].startswith("n") and len(meta["manifest_sha256"]) == 64
    # the best and the last checkpoint are kept, older ones removed
    kept = sorted(p.name for p in (tmp_path / "runs" / "exc").glob("epoch-*"))
    assert 1 <= len(kept) <= 2 and kept[-1].startswith("epoch-0004")
    assert out["restarts"] == 1 and out["resumed_from_epoch"] == 1   # not from epoch 0
    assert [r["cause"] for r in out["recoveries"]] == ["worker failure"]
    assert "injected fault" in out["recoveries"][0]["error"]
    assert out["recoveries"][0]["seconds"] > 0
    print("recoveries:", json.dumps(out["recoveries"]))


def _train_workers() -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "ray::RayTrainWorker" in line]


def test_worker_killed_with_sigkill_mid_epoch(train_data, ray_cluster, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address)
    proc = subprocess.Popen([PIPELINE, *map(str, train_args(train_data, tmp_path, "kill9", epochs=4))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for_checkpoint(tmp_path / "runs" / "kill9", 1, proc)
    time.sleep(1.5)   # into epoch 2
    victims = _train_workers()
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:]
    out = last_json(stdout)
    assert out["epochs_completed"] == 4 and out["restarts"] >= 1
    assert out["resumed_from_epoch"] >= 1
    assert out["recoveries"] and out["recoveries"][0]["seconds"] > 0
    print("recoveries:", json.dumps(out["recoveries"]))


def test_driver_killed_then_rerun_with_same_name_resumes(train_data, ray_cluster, tmp_path):
    args = [PIPELINE, *map(str, train_args(train_data, tmp_path, "driver", epochs=4))]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_for_checkpoint(tmp_path / "runs" / "driver", 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = last_json(run_cli(*args[1:], env={"RAY_ADDRESS": ray_cluster.address}).stdout)
    assert out["epochs_completed"] == 4
    assert out["resumed_from_epoch"] >= 1 and out["restarts"] >= 1
    assert "driver restarted" in [r["cause"] for r in out["recoveries"]]
    print("recoveries:", json.dumps(out["recoveries"]))


def train_while(cluster, args, run_dir: Path, change) -> dict:
    """Train on `cluster` in a subprocess; once epoch 1 is checkpointed, `change(cluster)`;
    return the run's JSON summary. The cluster is changed from this (main) thread: Ray's
    cluster utilities hang when driven from a side thread."""
    env = dict(os.environ, RAY_ADDRESS=cluster.address)
    proc = subprocess.Popen([PIPELINE, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    wait_for_checkpoint(run_dir, 1, proc)
    change(cluster)
    assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    reader.join(timeout=10)
    return last_json("".join(lines))


def test_node_removed_and_replaced_mid_training(train_data, tmp_path):
    """Rank 0's node may be the one removed: the run resumes from its checkpoint on the new node."""
    def replace_a_node(cluster):
        cluster.remove_node(list(cluster.worker_nodes)[0], allow_graceful=False)
        cluster.add_node(num_cpus=1, resources={"trainer": 1})

    cluster = start_cluster(2)
    try:
        out = train_while(cluster, train_args(train_data, tmp_path, "node", epochs=4),
                          tmp_path / "runs" / "node", replace_a_node)
    finally:
        cluster.shutdown()
    assert out["epochs_completed"] == 4 and out["restarts"] >= 1
    assert out["resumed_from_epoch"] >= 1
    assert out["recoveries"][0]["seconds"] > 0
    print("recoveries:", json.dumps(out["recoveries"]))


def test_elastic_training_grows_when_a_node_joins(train_data, tmp_path):
    cluster = start_cluster(1)
    try:
        args = train_args(train_data, tmp_path, "elastic", epochs=5, workers="1-2",
                          extra=["--elastic-resize-seconds", 3])
        out = train_while(cluster, args, tmp_path / "runs" / "elastic",
                          lambda c: c.add_node(num_cpus=1, resources={"trainer": 1}))
    finally:
        cluster.shutdown()
    assert out["world_sizes"][0] == 1 and out["world_sizes"][-1] == 2, out
    assert out["epochs_completed"] == 5


def _train_error(*args, env=None):
    proc = run_cli("train", *args, env=env, check=False, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_clear_errors(train_data, ray_cluster, tmp_path):
    env = {"RAY_ADDRESS": ray_cluster.address}
    (tmp_path / "nothing").mkdir()
    assert "manifest.json is missing" in _train_error("--data", tmp_path / "nothing", env=env)
    assert "invalid choice: 'resnet99'" in _train_error("--data", train_data, "--arch", "resnet99")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("arch: resnet99\nepochs: 2\n")
    msg = _train_error("--config", cfg, "--data", train_data, env=env)
    assert "arch" in msg and "resnet99" in msg
    msg = _train_error("--data", train_data, "--num-workers", 5, "--worker-resources", "trainer=1",
                       "--storage", tmp_path / "runs", env=env)
    assert "can hold 2 such workers" in msg

    corrupt = tmp_path / "corrupt"
    shutil.copytree(train_data, corrupt)
    manifest = json.loads((corrupt / "manifest.json").read_text())
    shard = corrupt / manifest["splits"]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    msg = _train_error(*map(str, train_args(str(corrupt), tmp_path, "corrupt")[1:]), env=env)
    assert "does not match the manifest" in msg and "re-run `pipeline stage`" in msg


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
