"""Where MLflow runs go: never into a Ray job's temporary working dir, which is deleted with it."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.tracking import lineage_tags, ray_job, tracking_uri

WORKING_DIR = Path("/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd")
JOB = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(
    {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"},
     "metadata": {"job_submission_id": "raysubmit_XYZ", "job_name": "raysubmit_XYZ"}})}


def refusal(explicit=None, env=None, cwd=WORKING_DIR) -> str:
    with pytest.raises(UserError) as err:
        tracking_uri(explicit, env=env or {}, cwd=cwd)
    return str(err.value)


def test_outside_a_ray_job_the_default_is_the_local_store():
    assert tracking_uri(None, env={}, cwd=Path("/home/me/work")) == "sqlite:////home/me/work/mlflow.db"
    assert tracking_uri(None, env={"MLFLOW_TRACKING_URI": "http://h:5000"}, cwd=Path("/x")) == "http://h:5000"
    assert tracking_uri("sqlite:///rel.db", env={}, cwd=Path("/x")) == "sqlite:///rel.db"


def test_the_default_store_is_refused_inside_a_ray_job_in_one_line():
    why = refusal(env=JOB)
    assert "\n" not in why
    assert "raysubmit_XYZ" in why and f"sqlite:///{WORKING_DIR}/mlflow.db" in why
    assert "deleted with the job" in why
    for how in ("--runtime-env-json", "MLFLOW_TRACKING_URI", "RayJob", "pipeline submit",
                "--tracking-uri"):
        assert how in why
    # a task or actor of the job: only its cwd says so
    assert "inside Ray job a Ray job" not in refusal(env={}) and "deleted with the job" in refusal(env={})
    # a job submitted without a working_dir: the store would stay on the driver's node
    assert "whichever node" in refusal(env=JOB, cwd=Path("/home/ray"))


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_ray_job_without_a_tracking_uri_is_refused_before_anything_starts(command, tmp_path):
    """The command as a Ray job's driver runs it: exit 2 with the one line, and nothing made
    (no run folder: refused before the dataset is read or Ray is joined)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(JOB, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-m", "pipeline", command, "--data", str(tmp_path / "d"),
                           "--storage", str(tmp_path / "runs"), "--verbose"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "inside Ray job raysubmit_XYZ" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()

def test_a_store_inside_the_jobs_working_dir_is_refused_even_when_named():
    assert "deleted with the job" in refusal("sqlite:///mlflow.db", env=JOB)
    assert "deleted with the job" in refusal(None, env={**JOB, "MLFLOW_TRACKING_URI": f"file://{WORKING_DIR}/mlruns"})
    assert "deleted with the job" in refusal("mlruns", env=JOB)


def test_a_lasting_store_is_taken_inside_a_ray_job():
    for uri in ("http://mlflow:5000", "https://mlflow.example", "databricks",
                "postgresql://db/mlflow", "sqlite:////shared/mlflow.db", "file:///shared/mlruns"):
        assert tracking_uri(uri, env=JOB, cwd=WORKING_DIR) == uri
        assert tracking_uri(None, env={**JOB, "MLFLOW_TRACKING_URI": uri}, cwd=WORKING_DIR) == uri
    assert tracking_uri("sqlite:////home/ray/mlflow.db", env=JOB, cwd=Path("/home/ray")) == \
        "sqlite:////home/ray/mlflow.db"


def test_the_job_is_found_from_its_config_or_its_working_dir():
    assert ray_job(JOB, Path("/anywhere")) == "raysubmit_XYZ"
    assert ray_job({}, WORKING_DIR / "sub") == "a Ray job"
    assert ray_job({}, Path("/home/me")) is None
    assert ray_job({"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"}, Path("/home/me")) is None
    assert ray_job({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"metadata": {}})}, Path("/x")) is None


def test_lineage_names_the_ray_job(monkeypatch):
    monkeypatch.delenv("PIPELINE_RAY_JOB_ID", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB["RAY_JOB_CONFIG_JSON_ENV_VAR"])
    assert lineage_tags("d", "0" * 64)["pipeline.ray_job_id"] == "raysubmit_XYZ"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert "pipeline.ray_job_id" not in lineage_tags("d", "0" * 64)


class _Store:
    """An MLflow client standing in for a tracking store: log_batch blocks until `release` is
    set (a server that hangs, a SQLite store the workers keep locked) or fails (a server down)."""

    def __init__(self, fail: bool = False):
        self.fail, self.release = fail, threading.Event()
        self.batches, self.terminated = 0, []

    def log_batch(self, run_id, metrics=()):
        self.batches += 1
        if self.fail:
            raise ConnectionError("refused")
        self.release.wait()

    def set_terminated(self, run_id, status):
        self.terminated.append((run_id, status))


def _tracked_run(tmp_path, store, monkeypatch, said):
    import pipeline.tracking as tracking
    from pipeline.storage import Storage

    monkeypatch.setattr(tracking, "client", lambda uri, check=True: store)
    run = object.__new__(tracking.TrackedRun)   # no server to find or start the run on
    run.uri, run.run_id, run.storage, run.say = "http://mlflow:5000", "r1", Storage(), said.append
    run.outbox = str(tmp_path / "mlflow-outbox")
    Storage().write_bytes(f"{run.outbox}/0001.json",   # an epoch held back by an earlier outage
                          json.dumps({"metrics": {"val_top1": 0.5}, "step": 1, "time_ms": 1}).encode())
    return run


def test_an_interrupted_run_ends_without_waiting_for_a_store_that_hangs(tmp_path, monkeypatch):
    """Ctrl-C: the driver goes on after its bound even when the store never answers (the bound
    is 0 here: no wait at all), says so in one line, and keeps the held metrics."""
    store, said = _Store(), []
    run = _tracked_run(tmp_path, store, monkeypatch, said)
    gave_up = []
    caller = threading.Thread(target=lambda: gave_up.append(not run.interrupted(within=0)))
    caller.start()
    caller.join(60)   # a bound on the wait for the state asserted, not on its speed
    try:
        assert not caller.is_alive(), "interrupted() waited for the store"
        assert gave_up == [True]
        assert len(said) == 1 and "stays RUNNING until the run is resumed" in said[0], said
        assert list((tmp_path / "mlflow-outbox").glob("*.json"))
    finally:
        store.release.set()
        for left in [t for t in threading.enumerate() if t.name == "mlflow-killed"]:
            left.join(60)   # ends here, on this test's store, not on the next test's


def test_an_interrupted_run_is_marked_killed_trying_the_held_metrics_once(tmp_path, monkeypatch):
    """A server that refuses: the held epoch is tried once (no backing off: the 60 s of the end of
    a finished run), stays in the outbox for the resumed run, and the run is marked KILLED."""
    import pipeline.retry

    store, said = _Store(fail=True), []
    run = _tracked_run(tmp_path, store, monkeypatch, said)

    def no_sleep(seconds):
        raise AssertionError(f"waited {seconds} s for the server")

    monkeypatch.setattr(pipeline.retry.time, "sleep", no_sleep)
    assert run.interrupted(within=60)
    assert store.batches == 1 and store.terminated == [("r1", "KILLED")]
    assert list((tmp_path / "mlflow-outbox").glob("*.json"))
