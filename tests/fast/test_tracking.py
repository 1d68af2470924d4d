"""Where MLflow runs go: never into a Ray job's temporary working dir, which is deleted with it."""
from __future__ import annotations

import json
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
