"""MLflow tracking: where runs go, how they are found again, what they carry (never a secret), and
how their metrics survive an outage of the server.

The tracking URI comes from --tracking-uri, else MLFLOW_TRACKING_URI, else the embedded store
sqlite:///<cwd>/mlflow.db with artifacts beside it in <cwd>/mlartifacts (a database-backed store,
which the model registry needs). Not inside a Ray job: its cwd is the job's unpacked working dir,
deleted with the job, and a store there would take every run with it (store_lost_with_job).
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

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


WORKING_DIR_FILES = "/runtime_resources/working_dir_files/"   # where Ray unpacks a job's working_dir
UNNAMED_JOB = "a Ray job"


def tracking_uri(explicit: str | None = None, env=None, cwd: Path | None = None) -> str:
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    uri = explicit or env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cwd / 'mlflow.db'}"
    problem = store_lost_with_job(uri, explicit or env.get("MLFLOW_TRACKING_URI") or None, env, cwd)
    if problem:
        raise UserError(problem)
    return uri


JOB_ID_ENV = "PIPELINE_RAY_JOB_ID"   # the job's id handed on to processes Ray does not tell it


def submitted_job_id(env) -> str | None:
    """The submission id of the Ray job whose driver this is: Ray 2.60 hands a job's driver its
    JobConfig (metadata included) in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    try:
        job = (json.loads(env.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}) \
            .get("job_submission_id")
    except (ValueError, AttributeError):
        return None
    return str(job) if job else None


def ray_job(env, cwd: Path) -> str | None:
    """The Ray job this process runs in (its submission id, or "a Ray job" when only the cwd
    says so: a job's tasks and actors, like its driver, run in the unpacked working dir)."""
    return submitted_job_id(env) or (UNNAMED_JOB if job_working_dir(cwd) else None)


def local_store(uri: str, cwd: Path) -> Path | None:
    """Where a local tracking store keeps its data (sqlite:///, file:, a plain path); None for
    a server."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
    elif uri.startswith("file:"):
        path = uri[len("file:"):].removeprefix("//")
    elif "://" in uri or uri.startswith(("databricks", "http")):
        return None
    else:
        path = uri
    return cwd / path if not os.path.isabs(path) else Path(path)


def job_working_dir(cwd: Path) -> Path | None:
    """The unpacked working dir of a Ray job that cwd lies in (deleted with the job), else None."""
    text = f"{cwd}/"
    if WORKING_DIR_FILES not in text:
        return None
    return Path(text[:text.index(WORKING_DIR_FILES) + len(WORKING_DIR_FILES)])


def store_lost_with_job(uri: str, given: str | None, env, cwd: Path) -> str | None:
    """Inside a Ray job, the default store (nothing given: sqlite:///<cwd>/mlflow.db) and any
    local store inside the job's unpacked working dir are lost with the job, runs and registry
    with them: why, in one line, and how to pass a lasting URI. None when the store lasts."""
    job = ray_job(env, cwd)
    store = local_store(uri, cwd) if job else None
    if store is None:
        return None
    tmp = job_working_dir(cwd)
    inside = tmp is not None and os.path.normpath(store).startswith(str(tmp))
    if given and not inside:
        return None   # an explicit local path that outlives the job: the user's choice
    what = f"the MLflow tracking store {redact(given)}" if given else \
        f"no MLflow tracking URI is set, and the default store sqlite:///{store}"
    where = "would be written into the job's working dir, deleted with the job" if inside else \
        "would be written on whichever node runs the job's driver, where nothing reads it"
    inside_job = UNNAMED_JOB if job == UNNAMED_JOB else f"Ray job {job}"
    return (f"inside {inside_job} {what} {where}: pass a tracking server's URI in the job's "
            "environment (`ray job submit --runtime-env-json '{\"env_vars\": "
            "{\"MLFLOW_TRACKING_URI\": \"http://HOST:5000\"}}'`, the RayJob's runtimeEnvYAML "
            "env_vars, or `pipeline submit`, which forwards your MLFLOW_TRACKING_URI), or "
            "--tracking-uri with a path that outlives the job")


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a local SQLite store; a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
    return None


def reachable(uri: str) -> bool:
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def check_reachable(uri: str) -> None:
    if not reachable(uri):
        raise UserError(f"cannot reach the MLflow tracking server at {redact(uri)}: is it running, "
                        "and is MLFLOW_TRACKING_URI (or --tracking-uri) right?")


def redact(uri: str) -> str:
    """A URI as it may be printed: no user:password@ part."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def client(uri: str, check: bool = True):
    from mlflow.tracking import MlflowClient

    if check:
        check_reachable(uri)
    # Fail within seconds, not after minutes of retries, when the server goes away mid-run:
    # metrics are kept and sent later (RunLog) rather than waited for.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
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
    job = os.environ.get(JOB_ID_ENV) or submitted_job_id(os.environ)
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
    from mlflow.entities import Param

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
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def metric_batch(metrics: dict, step: int, timestamp_ms: int | None = None):
    from mlflow.entities import Metric

    now = timestamp_ms or int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


class RunLog:
    """Metrics of one MLflow run, never lost to an outage of the tracking server.

    Each log() first sends what an earlier outage held back. When the server does not answer
    (after MLflow's own short retries), the entries are kept as files in `outbox` (the run's
    folder, local or S3) with one warning line, and sent with the next log() or by flush() at
    the end. Training goes on either way: a tracking outage is never a worker failure.
    """

    def __init__(self, uri: str, run_id: str, storage, outbox: str, say=print):
        self.uri, self.run_id, self.storage, self.outbox, self.say = uri, run_id, storage, outbox, say
        self._client = None
        self.warned = False

    def _send(self, entries: list[dict]) -> None:
        if self._client is None:
            self._client = client(self.uri, check=False)
        batch = []
        for e in entries:
            batch += metric_batch(e["metrics"], e["step"], e["time_ms"])
        for i in range(0, len(batch), 500):
            self._client.log_batch(self.run_id, metrics=batch[i:i + 500])

    def _held(self) -> list[tuple[str, dict]]:
        from .storage import join

        out = []
        try:
            names = sorted(rel for rel, _ in self.storage.list(self.outbox))
        except (OSError, UserError):
            return out
        for rel in names:
            try:
                out.append((join(self.outbox, rel), json.loads(self.storage.read_bytes(join(self.outbox, rel)))))
            except (ValueError, OSError, UserError):
                continue
        return out

    def log(self, metrics: dict, step: int) -> bool:
        from .storage import join

        entry = {"metrics": metrics, "step": step, "time_ms": int(time.time() * 1000)}
        held = self._held()
        try:
            self._send([e for _, e in held] + [entry])
        except Exception as exc:   # noqa: BLE001 - any failure of the server: keep, say once
            self.storage.write_bytes(join(self.outbox, f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.json"),
                                     json.dumps(entry).encode())
            if not self.warned:
                self.warned = True
                self.say(f"[mlflow] warning: the tracking server {redact(self.uri)} does not answer "
                         f"({type(exc).__name__}); training goes on and its metrics are kept in "
                         f"{self.outbox} until it is back")
            return False
        for uri, _ in held:
            self.storage.delete(uri)
        return True

    def flush(self, timeout: float = 60.0) -> bool:
        """Send whatever is still held, waiting up to `timeout` s for the server."""
        from .retry import retry

        held = self._held()
        if not held:
            return True
        try:
            retry(lambda: self._send([e for _, e in held]), timeout=timeout,
                  transient=lambda exc: True, first_delay=2)
        except Exception:   # noqa: BLE001
            self.say(f"[mlflow] warning: {len(held)} epochs of metrics could not reach "
                     f"{redact(self.uri)}; they are kept in {self.outbox}")
            return False
        for uri, _ in held:
            self.storage.delete(uri)
        self.say(f"[mlflow] the tracking server is back: {len(held)} held epochs of metrics logged")
        return True


def end_run(uri: str, run_id: str, status: str) -> None:
    """Mark a run FINISHED, FAILED or KILLED; a server that is down is told nothing (said once)."""
    try:
        client(uri, check=False).set_terminated(run_id, status=status)
    except Exception as exc:   # noqa: BLE001
        print(f"[mlflow] warning: could not mark run {run_id} {status} at {redact(uri)} "
              f"({type(exc).__name__})", flush=True)


# -- registered models as files (predict, --init-from) ---------------------------------------------
def download_model(model_uri: str, uri: str | None = None) -> Path:
    """Download a registered model (models:/NAME@ALIAS or models:/NAME/VERSION) to a local dir."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not model_uri.startswith("models:/"):
        raise UserError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except MlflowException as exc:
        raise UserError(f"{model_uri}: no such registered model, version or alias "
                        f"({str(exc).splitlines()[0][:200]})") from exc


def registered_files(model_uri: str, uri: str | None = None) -> Path:
    """The folder of a registered model holding what `pipeline register` logged beside the
    network (classes.json, preprocessing.json, model.json, checkpoint.pt): the pyfunc's
    artifacts/, or extra_files/ in versions registered before the model served itself."""
    root = download_model(model_uri, uri)
    for sub in ("artifacts", "extra_files"):
        if (root / sub / "classes.json").exists():
            return root / sub
    raise UserError(f"{model_uri}: was not registered by `pipeline register` (no classes.json "
                    "in its artifacts/ or extra_files/)")


INTERRUPTED_WAIT_S = 10.0   # the most MLflow may add to the end of an interrupted run


class TrackedRun:
    """The MLflow run of one training, from start (found again by name when the training
    resumes) to its end status; workers log into it through RunLog."""

    def __init__(self, tracking: Tracking, name: str, tags: dict, params: dict, storage,
                 run_dir: str, say=print):
        from .storage import join

        self.uri, self.storage, self.say = tracking.uri, storage, say
        self.client = client(tracking.uri)
        exp_id = experiment_id(self.client, tracking.experiment, tracking.uri)
        self.run_id = find_or_start_run(self.client, exp_id, name, tags=tags, params=params,
                                        parent_run_id=tracking.parent_run_id)
        self.outbox = join(run_dir, "mlflow-outbox")

    def for_workers(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id, "outbox": self.outbox}

    def _record_preemptions(self, log: "RunLog", found: list[dict]) -> None:
        """Each preemption as metrics at step = its number (steps lost, seconds to checkpoint
        on the notice and to the first step after it) and all of them as the tag
        `preemptions` (JSON: nodes, deadline, checkpoint and resume positions)."""
        for i, p in enumerate(found, start=1):
            log.log({f"preemption_{k}": p[k] for k in
                     ("steps_lost", "checkpoint_seconds", "seconds_to_first_step")
                     if isinstance(p.get(k), (int, float))}, i)
        if found:
            try:
                self.client.set_tag(self.run_id, "preemptions", json.dumps(found)[:5000])
            except Exception as exc:   # noqa: BLE001 - the summary keeps them either way
                self.say(f"[mlflow] warning: could not record the preemptions as a tag "
                         f"({type(exc).__name__}); summary.json has them")

    def _log(self) -> RunLog:
        return RunLog(self.uri, self.run_id, self.storage, self.outbox, say=self.say)

    def finish(self, summary: dict | None = None, status: str = "FINISHED") -> None:
        """Send held metrics, the final figures, and the end status (FAILED, KILLED...)."""
        log = self._log()
        if summary is not None:
            final = {f"final_{k}": summary[k] for k in ("val_top1", "val_top5")
                     if summary.get(k) is not None}
            final.update(restarts=summary["restarts"], epochs_completed=summary["epochs_completed"],
                         preemptions=len(summary.get("preemptions", [])))
            log.log(final, summary["epochs_completed"])
            self._record_preemptions(log, summary.get("preemptions", []))
        if log.flush():
            end_run(self.uri, self.run_id, status)

    def interrupted(self, within: float = INTERRUPTED_WAIT_S) -> bool:
        """Ctrl-C or SIGTERM: mark the run KILLED, each call tried once, and go on after `within`
        s whatever the store does (a server that hangs takes minutes through MLflow's retries, a
        SQLite store stays locked while the workers, alive until the driver exits, write to it):
        the user waits for the run to end, not for MLflow. Nothing is lost: held metrics stay in
        the outbox and the resumed run's first log sends them. False when it gave up."""
        def mark():
            self._log().flush(timeout=0)
            end_run(self.uri, self.run_id, "KILLED")

        # a daemon thread: one that is still waiting when the driver exits ends with it
        thread = threading.Thread(target=mark, name="mlflow-killed", daemon=True)
        thread.start()
        thread.join(within)
        if thread.is_alive():
            self.say(f"[mlflow] warning: {redact(self.uri)} did not answer within {within:g} s; "
                     f"run {self.run_id} stays RUNNING until the run is resumed (its held metrics "
                     f"are kept in {self.outbox})")
            return False
        return True
