"""MLflow tracking: where runs go, how they are found again, and what they carry (never a secret).

The tracking URI comes from --tracking-uri, else MLFLOW_TRACKING_URI, else the embedded store
sqlite:///<cwd>/mlflow.db with artifacts beside it in <cwd>/mlartifacts (a database-backed store,
which the model registry needs).
"""
from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

from .errors import UserError

from dataclasses import dataclass

RUN_NAME_TAG = "pipeline.run_name"
TRIAL_TAG = "pipeline.trial_id"
SECRET_WORDS = ("secret", "password", "token", "access_key", "credential")


@dataclass(frozen=True)
class Tracking:
    """Where a run logs: the tracking URI, the experiment, and for a sweep's trial its parent."""

    uri: str
    experiment: str = "pipeline"
    parent_run_id: str | None = None
    trial_id: str | None = None


def tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a local SQLite store; a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
    return None


def check_reachable(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        raise UserError(f"cannot reach the MLflow tracking server at {redact(uri)}: is it running, "
                        "and is MLFLOW_TRACKING_URI (or --tracking-uri) right?")


def redact(uri: str) -> str:
    """A URI as it may be printed: no user:password@ part."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    # Fail within seconds, not after minutes of retries, when the server goes away mid-run.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri, name))
    except Exception:   # created meanwhile by a concurrent trial
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def lineage_tags(data_uri: str, manifest_sha256: str, trial_id: str | None = None) -> dict[str, str]:
    """Where a model came from: data + manifest, code, Ray job, Tune trial."""
    tags = {"pipeline.data": data_uri, "pipeline.manifest_sha256": manifest_sha256}
    commit = git_commit()
    if commit:
        tags["pipeline.git_commit"] = commit
    job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("PIPELINE_RAY_JOB_ID")
    if job:
        tags["pipeline.ray_job_id"] = job
    if trial_id:
        tags[TRIAL_TAG] = trial_id
    return tags


def safe_params(values: dict) -> dict[str, str]:
    """Config values as MLflow params: flattened, empty ones dropped, anything secret-looking
    refused outright."""
    out = {}
    for key, value in values.items():
        if any(word in key.lower() for word in SECRET_WORDS):
            continue
        if isinstance(value, dict):
            for k, v in safe_params(value).items():
                out[f"{key}.{k}"] = v
        elif value not in ("", None):
            out[key] = str(value)[:500]
    return out


def find_or_start_run(mlflow_client, exp_id: str, run_name: str, tags: dict[str, str],
                      params: dict[str, str], parent_run_id: str | None = None) -> str:
    """The run for this name (so a resumed training keeps its MLflow run), or a new one."""
    found = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                      max_results=1)
    if found:
        run_id = found[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {**tags, RUN_NAME_TAG: run_name, "mlflow.runName": run_name}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(exp_id, tags=all_tags, run_name=run_name)
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def log_epoch(mlflow_client, run_id: str, metrics: dict, epoch: int) -> None:
    from mlflow.entities import Metric
    import time

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mlflow_client.log_batch(run_id, metrics=batch)
