"""`pipeline tune`: sweeps on a 2-node Ray cluster, tracked in a real MLflow server with S3
artifacts, ASHA early stopping, registration, predict, resume and errored trials."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PIPELINE, last_json, mlflow_client, run_cli, upload_tree

pytestmark = pytest.mark.slow   # real services / Ray clusters


TINY = ["--arch", "resnet18", "--batch-size", 16, "--min-res", 32, "--max-res", 32,
        "--val-res", 32, "--start-ramp", 0, "--end-ramp", 0, "--lr-peak-epoch", 1,
        "--worker-resources", "trainer=1", "--num-workers", 1, "--json"]


def sweep_args(data, storage, name, space: Path, epochs=3, extra=()):
    return ["tune", "--data", data, "--storage", storage, "--name", name, "--epochs", epochs,
            "--search-space", space, "--trials", 1, *TINY, *extra]


def test_sweep_tracked_registered_and_served(train_data, ray_cluster, s3, bucket, s3_storage,
                                             mlflow_server, tmp_path):
    data = f"s3://{bucket}/datasets/tiny"
    upload_tree(s3_storage, train_data, data)
    space = tmp_path / "space.yaml"
    # one lr far too small: ASHA has something clear to stop
    space.write_text("lr: {grid: [0.4, 0.2, 0.000001]}\n")
    env = {**s3.env(), "RAY_ADDRESS": ray_cluster.address,
           "MLFLOW_TRACKING_URI": mlflow_server.uri}
    out = last_json(run_cli(*sweep_args(data, f"s3://{bucket}/runs", "sweep1", space,
                                        extra=["--register-as", "tiny-resnet", "--experiment", "t1",
                                               "--cache-dir", tmp_path / "cache"]),
                            env=env).stdout)
    trials = out["trials"]
    assert len(trials) == 3 and all(t["status"] == "TERMINATED" for t in trials)
    stopped = [t for t in trials if t["stopped_early"]]
    assert stopped and all(t["epochs_completed"] < 3 for t in stopped)
    assert out["best_val_top1"] >= 0.9 and out["best_config"]["lr"] in (0.4, 0.2)
    assert out["best_checkpoint"].startswith(f"s3://{bucket}/runs/sweep1/runs/")
    assert out["model_name"] == "tiny-resnet" and out["alias"] == "champion"
    assert s3_storage.exists(f"s3://{bucket}/runs/sweep1/val_top1.png")

    client = mlflow_client(mlflow_server.uri)
    exp = client.get_experiment_by_name("t1")
    parent = client.get_run(out["parent_run_id"])
    assert "val_top1.png" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_top1")
        assert [m.step for m in history] == list(range(1, len(history) + 1))   # step = epoch
        tags = child.data.tags
        assert tags["pipeline.data"] == data and len(tags["pipeline.manifest_sha256"]) == 64
        assert tags["pipeline.trial_id"] and tags["pipeline.git_commit"]
        assert "lr" in child.data.params and "batch_size" in child.data.params
        values = " ".join([*child.data.params.values(), *tags.values()])
        assert s3.secret_key not in values and s3.access_key not in values
        assert tags["pipeline.stopped_early"] in ("True", "False")
    assert sum(c.data.tags["pipeline.stopped_early"] == "True" for c in children) == len(stopped)
    # artifacts went through the server into the S3 bucket
    assert any(True for _ in s3_storage.list("s3://mlflow/artifacts"))

    # a second, worse registration becomes challenger; the champion stays
    stopped_id = stopped[0]["id"]
    worse = sorted(k for k, _ in s3_storage.list(f"s3://{bucket}/runs/sweep1/runs/{stopped_id}")
                   if k.endswith("/meta.json") and k.startswith("epoch-"))[-1].rsplit("/", 1)[0]
    proc = run_cli("register", "--checkpoint", f"s3://{bucket}/runs/sweep1/runs/{stopped_id}/{worse}",
                   "--model", "tiny-resnet", "--json", env=env)
    second = last_json(proc.stdout)
    assert second["decision"] == "challenger" and second["model_version"] == "2"
    assert "vs current champion" in proc.stdout
    assert client.get_model_version_by_alias("tiny-resnet", "champion").version == "1"
    assert client.get_model_version_by_alias("tiny-resnet", "challenger").version == "2"

    # predict: the champion names each class's val image correctly
    src = Path(train_data).parent / "src" / "val"
    images = sorted(str(next(d.iterdir())) for d in sorted(src.iterdir()))
    pred = last_json(run_cli("predict", "--model", "models:/tiny-resnet@champion", *images,
                             "--json", env=env).stdout)["predictions"]
    right = 0
    for image, p in zip(images, pred):
        wnid = Path(image).parent.name
        assert wnid in [t["wnid"] for t in p["top"]]
        right += p["top"][0]["wnid"] == wnid
    assert right >= len(images) - 1


def test_resume_after_killed_sweep_skips_finished_trials(train_data, ray_cluster, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.4, 0.3, 0.2, 0.1]}\n")
    args = [PIPELINE, *map(str, sweep_args(train_data, tmp_path / "runs", "resumable", space,
                                           epochs=2, extra=["--max-concurrent", 1,
                                                            "--scheduler", "none",
                                                            "--cache-dir", tmp_path / "cache"]))]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    runs = tmp_path / "runs" / "resumable" / "runs"
    deadline = time.monotonic() + 400
    while len(list(runs.glob("*/summary.json"))) < 1:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(3)   # let Tune record the finished trial in its experiment state
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = {p.parent.name for p in runs.glob("*/summary.json")}

    out = last_json(run_cli(*args[1:], "--resume", env={"RAY_ADDRESS": ray_cluster.address}).stdout)
    assert len(out["trials"]) == 4 and all(t["status"] == "TERMINATED" for t in out["trials"])
    assert all(t["epochs_completed"] == 2 for t in out["trials"])
    for trial in finished_before:
        starts = list((runs / trial / "events").glob("*-driver_start-*.json"))
        assert len(starts) == 1, f"finished trial {trial} was run again"


def test_failing_trial_is_errored_and_the_sweep_goes_on(train_data, ray_cluster, tmp_path):
    space = tmp_path / "space.yaml"
    # 600 images cannot feed a batch of 5000: that trial fails in its workers, every retry
    space.write_text("batch_size: {grid: [16, 5000]}\n")
    out = last_json(run_cli(*sweep_args(train_data, tmp_path / "runs", "witherror", space, epochs=1,
                                        extra=["--max-failures", 0, "--scheduler", "none",
                                               "--cache-dir", tmp_path / "cache"]),
                            env={"RAY_ADDRESS": ray_cluster.address}).stdout)
    status = sorted(t["status"] for t in out["trials"])
    assert status == ["ERROR", "TERMINATED"]
    assert out["best_config"]["batch_size"] == 16
