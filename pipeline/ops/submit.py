"""`pipeline submit`: run a pipeline command as a Ray job on a cluster, follow its logs, exit with
the job's status.

The job gets this project as its working_dir and, in its runtime_env, where S3 and MLflow are
(endpoints, region, tracking URI). Never credentials: a job's runtime_env is logged on the head
and returned to anyone who can query the job, so keys must come from the cluster itself (an
instance profile, a Kubernetes secret, the environment of `ray start`). A Ray 2.60 head started
while ~/.ray/auth_token exists requires that token: the client then uses it (RAY_AUTH_TOKEN or
the file), never printing it.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..retry import retry

# Where things are: passed to the job. Credentials are not (see above).
PASS_THROUGH = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "PIPELINE_CACHE_DIR")
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "RAY_AUTH_TOKEN")
# gitignore patterns; the leading / anchors them at the project root (pipeline/data/ must travel)
EXCLUDES = ["/.venv", ".git", "/demo", "/.stack", "/runs", "/mlruns", "/mlartifacts", "mlflow.db",
            "*.beton", "__pycache__", ".pytest_cache", "*.egg-info", "/logs", "/data", "s3-keys",
            "*.so"]
PROJECT = Path(__file__).resolve().parents[2]
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


ENDPOINTS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
REGIONS = ("AWS_DEFAULT_REGION", "AWS_REGION")


def job_env(environ=None) -> tuple[dict[str, str], list[str]]:
    """(what the job is given, credentials seen here and held back).

    A region travels only with the endpoint it belongs to. On AWS (no endpoint) the region in
    this shell is where its user's default is, often not where the bucket is, and pyarrow (Ray's
    checkpoints) would then address the bucket in the wrong region: the job finds each bucket's
    own region instead (storage.pyarrow_region)."""
    environ = os.environ if environ is None else environ
    env = {k: environ[k] for k in PASS_THROUGH if environ.get(k)}
    if not any(k in env for k in ENDPOINTS):
        for k in REGIONS:
            env.pop(k, None)
    uri = env.get("MLFLOW_TRACKING_URI", "")
    held = [k for k in CREDENTIALS if environ.get(k)]
    if "@" in uri.partition("://")[2].split("/", 1)[0]:   # user:password@host
        del env["MLFLOW_TRACKING_URI"]
        held.append("MLFLOW_TRACKING_URI (it carries a password)")
    return env, held


def job_client(address: str):
    # Read when Ray is imported: set it first. A head started while a token existed requires
    # it; one started without any token refuses clients that send one.
    token_file = Path.home() / ".ray" / "auth_token"
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.exists()):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    def refused(exc) -> bool:
        text = str(exc)
        return "Authentication" in type(exc).__name__ or "401" in text or "token" in text.lower()

    try:
        return retry(lambda: JobSubmissionClient(address), timeout=30, first_delay=1,
                     transient=lambda exc: not refused(exc))
    except Exception as exc:   # noqa: BLE001 - said in words
        text = (str(exc).splitlines() or [""])[0]
        if refused(exc):
            raise UserError(f"{address}: the Ray head refused this client's token; run on a "
                            "machine with the head's ~/.ray/auth_token, or set RAY_AUTH_TOKEN "
                            f"({text[:160]})") from exc
        raise UserError(f"cannot reach the Ray dashboard at {address}: is the head running and "
                        f"the address (http://HEAD:8265) right? ({text[:120]})") from exc


def submit(address: str, command: list[str], wait: bool = True, say=print) -> tuple[str, str]:
    """Submit `python -m pipeline COMMAND...`; returns (job id, final or current status)."""
    if not command:
        raise UserError("nothing to submit: give the pipeline command after --, e.g. "
                        "pipeline submit --address http://HEAD:8265 -- run --config jobs/configs/x.yaml")
    client = job_client(address)
    env_vars, held = job_env()
    if held:
        say(f"[submit] note: {', '.join(held)} set here but not sent with the job (a job's "
            "runtime_env is readable on the head): the cluster's nodes use their own credentials "
            "(instance profile, Kubernetes secret, or the environment of `ray start`)")
    entrypoint = "python -m pipeline " + " ".join(shlex.quote(c) for c in command)
    runtime_env = {"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env_vars}
    try:   # right after the head starts: 500 "No available agent to submit job"
        job_id = retry(lambda: client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env),
                       timeout=60, first_delay=2,
                       transient=lambda exc: "No available agent" in str(exc))
    except RuntimeError as exc:
        raise UserError(f"{address}: the job was not accepted "
                        f"({str(exc).splitlines()[0][:200]})") from exc
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
