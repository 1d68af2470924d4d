"""`pipeline submit`: run a pipeline command as a Ray job on a cluster, follow its logs, exit with
the job's status.

The job gets this project as its working_dir and, in its runtime_env, the S3 and MLflow settings
of the submitting shell (their values are never printed). Ray 2.60 heads require a token: the
client reads ~/.ray/auth_token (or RAY_AUTH_TOKEN) when RAY_AUTH_MODE=token, which is set here
unless the caller chose otherwise.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from .errors import UserError

PASS_THROUGH = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
                "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_ENDPOINT_URL", "PIPELINE_CACHE_DIR")
EXCLUDES = [".venv", ".git", "demo", ".stack", "runs", "mlruns", "mlartifacts", "mlflow.db",
            "*.beton", "__pycache__", ".pytest_cache", "*.egg-info"]
PROJECT = Path(__file__).resolve().parents[1]
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_client(address: str):
    # read when Ray is imported: set it first
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 30
    while True:
        try:
            return JobSubmissionClient(address)
        except Exception as exc:   # noqa: BLE001 - said in words below
            text = str(exc)
            if "Authentication" in type(exc).__name__ or "401" in text or "token" in text.lower():
                raise UserError(f"{address}: the Ray head refused this client's token; run on a "
                                "machine with the head's ~/.ray/auth_token, or set RAY_AUTH_TOKEN "
                                f"({text.splitlines()[0][:160]})") from exc
            if time.monotonic() > deadline:
                raise UserError(f"cannot reach the Ray dashboard at {address}: is the head running "
                                f"and the address (http://HEAD:8265) right? ({text.splitlines()[0][:120]})") from exc
            time.sleep(1)


def submit(address: str, command: list[str], wait: bool = True, say=print) -> tuple[str, str]:
    """Submit `python -m pipeline COMMAND...`; returns (job id, final or current status)."""
    if not command:
        raise UserError("nothing to submit: give the pipeline command after --, e.g. "
                        "pipeline submit --address http://HEAD:8265 -- run --config jobs/configs/x.yaml")
    client = job_client(address)
    env_vars = {k: os.environ[k] for k in PASS_THROUGH if os.environ.get(k)}
    entrypoint = "python -m pipeline " + " ".join(shlex.quote(c) for c in command)
    runtime_env = {"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env_vars}
    deadline = time.monotonic() + 60
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as exc:
            # right after the head starts: 500 "No available agent to submit job"
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise UserError(f"{address}: the job was not accepted "
                                f"({str(exc).splitlines()[0][:200]})") from exc
            time.sleep(2)
    say(f"[submit] job {job_id}: {entrypoint}  (env passed: {', '.join(sorted(env_vars)) or 'none'})")
    if not wait:
        return job_id, _name(client.get_job_status(job_id))

    async def follow():
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(follow())
    status = _name(client.get_job_status(job_id))
    while status not in FINAL:
        time.sleep(1)
        status = _name(client.get_job_status(job_id))
    say(f"[submit] job {job_id} {status}")
    return job_id, status


def _name(status) -> str:
    return str(getattr(status, "value", status))
