"""`pipeline train`: launch a fault-tolerant Ray Train (V2) TorchTrainer over a staged dataset."""
from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

from ray.train.v2.api.callback import UserCallback

from .config import TrainConfig
from .errors import UserError
from .manifest import manifest_sha256, read_manifest
from .ray_connect import connect
from .run_events import RunEvents, recoveries
from .storage import Storage, is_s3, join, split_s3
from .tracking import (Tracking, experiment_id, find_or_start_run, lineage_tags, log_epoch,
                       safe_params)
from .tracking import client as tracking_client
from .trainer import CHECKPOINT_FILE, FAULT_ENV, META_FILE, train_worker

SUMMARY_FILE = "summary.json"   # written last, once a run has finished


def absolute(uri: str) -> str:
    """Workers chdir into their run folder: local paths must not be relative."""
    return uri if not uri or is_s3(uri) or uri.startswith("models:/") else str(Path(uri).resolve())


def storage_for_ray(storage: Storage, uri: str):
    """(storage_path, storage_filesystem) for RunConfig. pyarrow ignores AWS_ENDPOINT_URL, so an
    S3-compatible endpoint has to be handed over explicitly."""
    if not is_s3(uri):
        return absolute(uri), None
    import pyarrow.fs

    s3 = storage.s3
    kwargs = {"region": s3.region or "us-east-1"}
    if s3.endpoint_url:
        scheme, _, host = s3.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if s3.access_key:
        kwargs.update(access_key=s3.access_key, secret_key=s3.secret_key)
    bucket, prefix = split_s3(uri)
    return f"{bucket}/{prefix}".rstrip("/"), pyarrow.fs.S3FileSystem(**kwargs)


def worker_bundle(cfg: TrainConfig) -> dict[str, float]:
    bundle = {"CPU": float(cfg.cpus_per_worker), **cfg.worker_resources}
    if cfg.gpus_per_worker:
        bundle["GPU"] = cfg.gpus_per_worker
    return bundle


def workers_that_fit(bundle: dict[str, float]) -> tuple[int, list[str]]:
    """How many workers the live nodes can hold at once, and which nodes can hold one."""
    import ray

    total, nodes = 0, []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        fit = min((int(res.get(k, 0) // v) if v else 10**6) for k, v in bundle.items())
        if fit > 0:
            nodes.append(node["NodeID"])
        total += fit
    return total, nodes


def check_capacity(cfg: TrainConfig, bundle: dict[str, float]) -> list[str]:
    """Refuse, in words, workers that the cluster can never hold; on an autoscaling cluster the
    nodes may still come, so only say that the run waits for them."""
    lo, _ = cfg.workers_range
    fits, nodes = workers_that_fit(bundle)
    if fits < lo and cfg.autoscaling:
        print(f"[train] the cluster holds {fits} of {lo} workers now; waiting up to "
              f"{cfg.resource_wait_minutes:g} min for the autoscaler to add nodes", flush=True)
    elif fits < lo:
        need = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
        raise UserError(f"--num-workers {cfg.num_workers}: each worker needs {need}, and the "
                        f"cluster's nodes can hold {fits} such workers; lower --num-workers or "
                        "--cpus-per-worker/--gpus-per-worker, or add nodes")
    return nodes


def prefetch_data(storage: Storage, cfg: TrainConfig, manifest, nodes: list[str]) -> None:
    """Copy and verify the shards on every node that can host a worker, before training starts:
    a corrupt shard is reported once, in words, instead of failing every worker again and again."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .shard_cache import local_split

    def fetch(split):
        return str(local_split(storage, cfg.data, manifest, split, cfg.cache_dir))

    task = ray.remote(num_cpus=0, max_retries=0)(fetch)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(s)
            for n in nodes for s in ("train", "val")]
    ray.get(refs)


def load_init_state(storage: Storage, uri: str) -> dict:
    """Weights to fine-tune from: a checkpoint folder or checkpoint.pt (local or S3), or a
    registered model (models:/NAME@ALIAS)."""
    import torch

    if uri.startswith("models:/"):
        from .registry import load_registered_state

        return load_registered_state(uri)
    path = uri if uri.endswith(".pt") else join(uri, CHECKPOINT_FILE)
    if storage.size(path) is None:
        raise UserError(f"--init-from {uri}: no {CHECKPOINT_FILE} there")
    state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=False)
    return state.get("model", state)


def checkpoint_uri(path: str | None, storage_uri: str) -> str | None:
    """A URI for a path as Ray reports it (without the s3:// of its filesystem)."""
    if path is None:
        return None
    return f"s3://{path}" if is_s3(storage_uri) else path


def read_meta(storage: Storage, uri: str | None) -> dict:
    if not uri:
        return {}
    return json.loads(storage.read_bytes(join(uri, META_FILE)))


class FailureRecorder(UserCallback):
    """Ray Train controller callback: note each worker-group failure as a run event."""

    def __init__(self, storage: Storage, run_dir: str):
        self.storage, self.run_dir = storage, run_dir

    def after_exception(self, run_context, worker_exceptions):
        errors = "; ".join(f"rank {r}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                           for r, e in sorted(worker_exceptions.items()))
        RunEvents(self.storage, self.run_dir).add("failure", error=errors[:500])


def explain_failure(exc: Exception, cfg: TrainConfig) -> Exception:
    """Turn a Ray Train failure caused by the user's setup into a UserError."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError):
        for err in exc.worker_failures.values():
            cause = getattr(err, "cause", err)
            if isinstance(cause, UserError):
                return cause
            if isinstance(cause, ValueError) and "lower batch_size" in str(cause):
                return UserError(f"--batch-size {cfg.batch_size}: {cause}")
    if isinstance(exc, ControllerError):
        name = type(exc.controller_failure).__name__
        if "StartupTimeout" in name or "StartupFailed" in name:
            return UserError(f"could not place {cfg.num_workers} training workers for "
                             f"{cfg.resource_wait_minutes:g} minutes (the cluster lost nodes, or "
                             "never had room); add nodes or lower --num-workers")
    return exc


def worker_env() -> dict[str, str]:
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # our one line per epoch would be logged twice
    if os.environ.get(FAULT_ENV):   # fault injection for the fault-tolerance tests
        env[FAULT_ENV] = os.environ[FAULT_ENV]
    return env


def start_tracking(tracking: Tracking | None, cfg: TrainConfig, data_sha: str) -> dict | None:
    """The MLflow run of this training (found again by name when the run resumes)."""
    if tracking is None:
        return None
    mlflow_client = tracking_client(tracking.uri)
    exp_id = experiment_id(mlflow_client, tracking.experiment, tracking.uri)
    run_id = find_or_start_run(mlflow_client, exp_id, cfg.name,
                               tags=lineage_tags(cfg.data, data_sha, tracking.trial_id),
                               params=safe_params(cfg.model_dump()),
                               parent_run_id=tracking.parent_run_id)
    return {"uri": tracking.uri, "run_id": run_id, "client": mlflow_client}


def finish_tracking(run: dict | None, summary: dict | None) -> None:
    if run is None:
        return
    if summary is None:
        run["client"].set_terminated(run["run_id"], status="FAILED")
        return
    final = {f"final_{k}": summary[k] for k in ("val_top1", "val_top5") if summary.get(k) is not None}
    final.update(restarts=summary["restarts"], epochs_completed=summary["epochs_completed"])
    log_epoch(run["client"], run["run_id"], final, summary["epochs_completed"])
    run["client"].set_terminated(run["run_id"], status="FINISHED")


def finished_summary(storage: Storage, run_dir: str) -> dict | None:
    """The summary a run writes once it has finished; None while it has not."""
    uri = join(run_dir, SUMMARY_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def train(cfg: TrainConfig, storage: Storage | None = None, ray_address: str | None = None,
          callbacks: list | None = None, tracking: Tracking | None = None) -> dict:
    """Run (or resume, when cfg.name names an unfinished run) and return the final summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.train.torch import TorchTrainer

    storage = storage or Storage()
    if not cfg.data:
        raise UserError("--data is required: the staged dataset (folder or s3:// URI)")
    cfg = cfg.model_copy(update={"data": absolute(cfg.data), "storage": absolute(cfg.storage),
                                 "cache_dir": absolute(cfg.cache_dir),
                                 "init_from": absolute(cfg.init_from),
                                 "name": cfg.name or f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"})
    manifest = read_manifest(storage, cfg.data)
    for split in ("train", "val"):
        if not manifest.splits.get(split) or not manifest.splits[split].shards:
            raise UserError(f"{cfg.data}: the staged dataset has no '{split}' split")
    storage.check_bucket(cfg.storage)
    init_state = load_init_state(storage, cfg.init_from) if cfg.init_from else None
    data_sha = manifest_sha256(storage, cfg.data)
    run = start_tracking(tracking, cfg, data_sha)
    lineage = {"manifest_sha256": data_sha, "mlflow_run_id": run and run["run_id"],
               "trial_id": tracking and tracking.trial_id}

    connect(ray_address)
    bundle = worker_bundle(cfg)
    nodes = check_capacity(cfg, bundle)
    run_dir = join(cfg.storage, cfg.name)
    events = RunEvents(storage, run_dir)
    events.add("driver_start")
    prefetch_data(storage, cfg, manifest, nodes)

    lo, hi = cfg.workers_range
    storage_path, filesystem = storage_for_ray(storage, cfg.storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"train": cfg.model_dump(), "manifest": manifest.model_dump(),
                           "storage": storage, "run_dir": run_dir, "init_state": init_state,
                           "lineage": lineage,
                           "tracking": run and {"uri": run["uri"], "run_id": run["run_id"]}},
        scaling_config=ScalingConfig(num_workers=lo if lo == hi else (lo, hi),
                                     use_gpu=cfg.gpus_per_worker > 0, resources_per_worker=bundle,
                                     elastic_resize_monitor_interval_s=cfg.elastic_resize_seconds),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(
                max_failures=cfg.max_failures,
                # each worker-group start waits 60 s for resources; bound the retries so a
                # cluster that can no longer hold the workers ends the run, in words
                controller_failure_limit=max(1, math.ceil(cfg.resource_wait_minutes))),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_top1",
                                               checkpoint_score_order="max"),
            callbacks=[FailureRecorder(storage, run_dir), *(callbacks or [])],
            # Our workers print one line per epoch; Ray's print patch would log each twice.
            worker_runtime_env={"env_vars": worker_env()},
            logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        result = trainer.fit()
    except BaseException as exc:
        finish_tracking(run, None)
        if isinstance(exc, Exception):
            raise explain_failure(exc, cfg) from exc
        raise

    last = checkpoint_uri(result.checkpoint and result.checkpoint.path, cfg.storage)
    best = checkpoint_uri(result.best_checkpoints[0][0].path, cfg.storage) \
        if result.best_checkpoints else last
    meta = read_meta(storage, last)
    metrics = meta.get("metrics", {})
    history = events.all()
    starts = [e for e in history if e["kind"] == "start"]
    summary = {
        "name": cfg.name,
        "val_top1": metrics.get("val_top1"),
        "val_top5": metrics.get("val_top5"),
        "epochs_completed": meta.get("epoch", 0),
        "checkpoint": last,
        "best_checkpoint": best,
        "restarts": max(0, len(starts) - 1),
        "world_sizes": [e.get("world_size") for e in starts],
        "resumed_from_epoch": starts[-1].get("resumed_from_epoch") if starts else None,
        "recoveries": recoveries(history),
        "run_dir": run_dir,
        "mlflow_run_id": run and run["run_id"],
    }
    storage.write_bytes(join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=1).encode())
    finish_tracking(run, summary)
    return summary
