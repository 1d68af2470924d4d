"""`pipeline tune`: sweeps on a 2-node Ray cluster, tracked in a real MLflow server with S3
artifacts, ASHA early stopping, registration, predict, resume and errored trials."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import PIPELINE, last_json, mlflow_client, run_cli, upload_tree, wait_for

from pipeline.training.trainer import HOLD_ENV

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
    # the flags are constants of the sweep; only the space's lr varies
    assert out["search_space"] == {"lr": {"grid": [0.4, 0.2, 0.000001]}}
    assert out["fixed"]["arch"] == "resnet18" and out["fixed"]["batch_size"] == 16
    # ASHA may stop a trial or not (it depends on which trial reaches a rung first); the best is
    # the best score of the trials that went furthest, whichever learned (ties: the first id)
    stopped = [t for t in trials if t["stopped_early"]]
    assert all(t["epochs_completed"] < 3 for t in stopped)
    best = max(trials, key=lambda t: (t["epochs_completed"], t["val_top1"]))
    assert (out["best_trial"], out["best_val_top1"]) == (best["id"], best["val_top1"]), out
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
    epochs_of = {t["id"]: t["epochs_completed"] for t in trials}
    for child in children:
        # every epoch a trial completed is in MLflow, also the last one of a trial ASHA stopped
        history = client.get_metric_history(child.info.run_id, "val_top1")
        done = epochs_of[child.data.tags["pipeline.trial_id"]]
        assert [m.step for m in history] == list(range(1, done + 1)), (child.data.tags, history)
        tags = child.data.tags
        assert tags["pipeline.data"] == data and len(tags["pipeline.manifest_sha256"]) == 64
        assert tags["pipeline.trial_id"] and tags["pipeline.git_commit"]
        assert "lr" in child.data.params and "batch_size" in child.data.params
        values = " ".join([*child.data.params.values(), *tags.values()])
        assert s3.secret_key not in values and s3.access_key not in values
        assert tags["pipeline.stopped_early"] in ("True", "False")
    assert sum(c.data.tags["pipeline.stopped_early"] == "True" for c in children) == len(stopped)
    # a trial ASHA stopped scored, at the rung where it stopped (its last epoch), below the
    # cut-off of the scores recorded there before it: below at least one other trial's score
    scores = {c.data.tags["pipeline.trial_id"]: {m.step: m.value for m in client.get_metric_history(
        c.info.run_id, "val_top1")} for c in children}
    for t in stopped:
        rung, mine = t["epochs_completed"], scores[t["id"]][t["epochs_completed"]]
        assert any(other.get(rung, -1.0) > mine for tid, other in scores.items()
                   if tid != t["id"]), (t, scores)
    # artifacts went through the server into the S3 bucket
    assert any(True for _ in s3_storage.list("s3://mlflow/artifacts"))

    # the best trial's checkpoint registered again ties the champion, whatever the scores: it
    # becomes @challenger (a tie keeps the old), the reason said and stored; the champion stays
    # (a model at chance getting no alias: test_operators_stay_in_charge... in test_registry.py)
    proc = run_cli("register", "--checkpoint", out["best_checkpoint"], "--model", "tiny-resnet",
                   "--json", env=env)
    reg = last_json(proc.stdout)
    assert reg["decision"] == "challenger" and "does not beat champion version 1" in reg["reason"]
    assert f"registered @challenger: {reg['reason']}" in proc.stdout
    assert client.get_model_version("tiny-resnet", reg["model_version"]).tags[
        "pipeline.promotion.reason"] == reg["reason"]
    assert client.get_model_version_by_alias("tiny-resnet", "challenger").version == reg["model_version"]
    assert client.get_model_version_by_alias("tiny-resnet", "champion").version == "1"

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


def test_failing_trial_is_errored_and_the_sweep_goes_on(train_data, ray_cluster, tmp_path):
    """One trial's worker raises an ordinary exception at the same step after every restart:
    Ray Train restarts it once (--max-failures 1), then the trial is ERROR; one trial is refused
    (a UserError: a batch larger than the data, never retried); the third finishes and is the
    best."""
    space = tmp_path / "space.yaml"
    # 600 images cannot feed a batch of 5000: that trial is refused, the others go on
    space.write_text("batch_size: {grid: [16, 16, 5000]}\n")
    marker = tmp_path / "faults"
    args = [a for a in sweep_args(train_data, tmp_path / "runs", "witherror", space, epochs=1,
                                  extra=["--scheduler", "none", "--min-val-top1", 0.01,
                                         "--max-concurrent", 1, "--max-failures", 1,
                                         "--cache-dir", tmp_path / "cache"])]
    i = args.index("--batch-size")
    del args[i:i + 2]   # batch_size is searched here, so it is not also a flag
    # the first trial to reach epoch 0 step 1 fails there twice: once more than its one retry
    proc = run_cli(*args, env={"RAY_ADDRESS": ray_cluster.address,
                               "PIPELINE_INJECT_FAULT": f"0:1:{marker}:2"})
    out = last_json(proc.stdout)
    status = sorted(t["status"] for t in out["trials"])
    assert status == ["ERROR", "ERROR", "TERMINATED"], out["trials"]
    assert out["best_config"]["batch_size"] == 16
    assert "warning: batch_size 5000" in proc.stdout
    assert len(marker.read_text().splitlines()) == 2
    runs = tmp_path / "runs" / "witherror" / "runs"
    failed = [runs / t["id"] for t in out["trials"] if t["status"] == "ERROR"
              and (runs / t["id"] / "events").exists()]
    assert len(failed) == 1   # the refused trial never started a run
    events = {kind: list((failed[0] / "events").glob(f"*-{kind}-*.json"))
              for kind in ("start", "failure")}
    assert len(events["start"]) == 2 and len(events["failure"]) == 2, events
    assert "injected fault" in events["failure"][0].read_text()

    # a space naming a setting that is also a flag is refused in words
    clash = run_cli(*sweep_args(train_data, tmp_path / "runs", "clash", space), check=False,
                    env={"RAY_ADDRESS": ray_cluster.address})
    assert clash.returncode == 2 and "'batch_size', which --batch-size also sets" in clash.stderr


def test_default_space_keeps_the_given_settings_and_fits_the_data(train_data, ray_cluster, tmp_path):
    """The issue's sweep: --arch given, batch size left open, default space, ~600 images."""
    args = ["tune", "--data", train_data, "--storage", tmp_path / "runs", "--name", "defaults",
            "--arch", "resnet18", "--min-res", 32, "--max-res", 32, "--val-res", 32,
            "--start-ramp", 0, "--end-ramp", 0, "--epochs", 1, "--trials", 2,
            "--num-workers", 1, "--worker-resources", "trainer=1", "--min-val-top1", 0.01,
            "--cache-dir", tmp_path / "cache", "--json"]
    proc = run_cli(*args, env={"RAY_ADDRESS": ray_cluster.address})
    out = last_json(proc.stdout)
    assert "arch" not in out["search_space"] and out["fixed"]["arch"] == "resnet18"
    assert set(out["search_space"]) == {"lr", "weight_decay", "label_smoothing", "batch_size"}
    assert "[tune] searching: lr loguniform" in proc.stdout and "fixed: arch=resnet18" in proc.stdout
    assert "batch_size 256, 512 left out" in proc.stdout
    train_images = json.loads((Path(train_data) / "manifest.json").read_text())["splits"]["train"]["samples"]
    for trial in (tmp_path / "runs" / "defaults" / "runs").iterdir():
        meta = json.loads(next(trial.glob("epoch-*/meta.json")).read_text())
        assert meta["arch"] == "resnet18"
        assert train_images // meta["config"]["recipe"]["batch_size"] >= 20


def test_a_sweep_at_chance_fails_and_registers_nothing(train_data, ray_cluster, mlflow_server,
                                                       tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.000001]}\n")
    proc = run_cli(*sweep_args(train_data, tmp_path / "runs", "chance", space, epochs=1,
                               extra=["--register-as", "never-a-champion",
                                      "--cache-dir", tmp_path / "cache"]),
                   env={"RAY_ADDRESS": ray_cluster.address, "MLFLOW_TRACKING_URI": mlflow_server.uri},
                   check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "no better than chance" in error[0] and "Likely:" in error[0]
    assert "nothing was registered" in error[0]
    names = [m.name for m in mlflow_client(mlflow_server.uri).search_registered_models()]
    assert "never-a-champion" not in names
    result = json.loads((tmp_path / "runs" / "chance" / "result.json").read_text())
    assert result["verdict"] == "at chance"


def test_interrupted_sweep_registers_nothing_and_resumes(train_data, ray_cluster, mlflow_server,
                                                         tmp_path):
    """SIGTERM while the second trial is held in its epoch 2, the first finished: exit 143, no
    model, no result, MLflow runs KILLED (the finished trial's stays FINISHED); `--resume`
    finishes the sweep without training the finished trial again, and registers its model.
    (Ctrl-C mid-sweep: test_run.py's test_run_chain_then_rerun_resumes_without_redoing.)"""
    space = tmp_path / "space.yaml"
    space.write_text("lr: {grid: [0.4, 0.3]}\n")
    args = sweep_args(train_data, tmp_path / "runs", "stopped", space, epochs=2,
                      extra=["--register-as", "resumed-model", "--experiment", "interrupt",
                             "--max-concurrent", 1, "--scheduler", "none",
                             "--cache-dir", tmp_path / "cache"])
    # the hold (epoch 2's first step) is open for the first trial; once it has finished it is
    # closed, and the second trial (which starts after: one at a time) waits there for SIGTERM
    hold = tmp_path / "hold"
    hold.touch()
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, MLFLOW_TRACKING_URI=mlflow_server.uri,
               **{HOLD_ENV: f"1:0:{hold}"})
    proc = subprocess.Popen([PIPELINE, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs" / "stopped" / "runs"
    wait_for(lambda: list(runs.glob("*/summary.json")), "a finished trial", 400, proc)
    hold.unlink()
    finished = {p.parent.name for p in runs.glob("*/summary.json")}
    wait_for(lambda: Path(f"{hold}.held").exists(), "the second trial held in epoch 2", 400, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, (stdout[-2000:], stderr[-3000:])
    assert "interrupted (SIGTERM)" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "runs" / "stopped" / "result.json").exists()
    client = mlflow_client(mlflow_server.uri)
    assert "resumed-model" not in [m.name for m in client.search_registered_models()]
    exp = client.get_experiment_by_name("interrupt")
    statuses = {r.data.tags.get("mlflow.runName"): r.info.status
                for r in client.search_runs([exp.experiment_id])}
    assert statuses["sweep-stopped"] == "KILLED", statuses
    assert {statuses[t] for t in finished} == {"FINISHED"}, statuses
    assert "RUNNING" not in statuses.values(), statuses

    out = last_json(run_cli(*args, "--resume", env={"RAY_ADDRESS": ray_cluster.address,
                                                   "MLFLOW_TRACKING_URI": mlflow_server.uri}).stdout)
    assert len(out["trials"]) == 2 and all(t["epochs_completed"] == 2 for t in out["trials"])
    assert out["model_version"] == "1"
    for trial in finished:
        starts = list((runs / trial / "events").glob("*-driver_start-*.json"))
        assert len(starts) == 1, f"finished trial {trial} was run again"
