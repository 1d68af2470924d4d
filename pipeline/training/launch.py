"""`pipeline train`: launch a fault-tolerant Ray Train (V2) TorchTrainer over a staged dataset.

The shape of Ray's own Train examples: check the inputs, build a TorchTrainer around the plain
PyTorch worker (worker.py), fit, summarise. The pieces around it live beside this file: what the
cluster can hold (cluster.py), how failures are judged (failures.py), the summary (summary.py),
the checkpoint format (checkpoint.py); the MLflow run's lifecycle is tracking.TrackedRun.
"""
from __future__ import annotations

import math
import os
import time
import uuid

from ..config import TrainConfig
from ..data.manifest import manifest_sha256, read_manifest
from ..errors import UserError
from ..ray_connect import connect, pin_cluster_address
from ..storage import Storage, absolute, join
from ..tracking import Tracking, TrackedRun, lineage_tags, safe_params
from . import checkpoint, identity
from .cluster import check_capacity, check_data, worker_bundle
from .failures import FailureRecorder, Trainer, explain_failure, grow_key
from .model import init_state_mismatch
from .run_events import RunEvents
from .summary import build_summary, finished_summary, write_summary
from .trainer import FAULT_ENV, HOLD_ENV
from .worker import train_worker


def resolved(cfg: TrainConfig) -> TrainConfig:
    """Paths made absolute (workers run in their own folders) and a run name that no other
    run started in the same second can share."""
    if not cfg.data:
        raise UserError("--data is required: the staged dataset (folder or s3:// URI)")
    name = cfg.run.name or f"{cfg.recipe.arch}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    return cfg.model_copy(update={
        "data": absolute(cfg.data),
        "run": cfg.run.model_copy(update={"storage": absolute(cfg.run.storage), "name": name,
                                          "init_from": absolute(cfg.run.init_from)}),
        "loader": cfg.loader.model_copy(update={"cache_dir": absolute(cfg.loader.cache_dir)})})


def worker_env() -> dict[str, str]:
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # our one line per epoch would be logged twice
    for name in (FAULT_ENV, HOLD_ENV):   # fault injection and holds for the tests
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"   # Ray passes it to its controller
START_TIMEOUT_S = 30.0


def start_timeout() -> float:
    """Seconds a worker-group start waits for its workers before trying again (with what the
    cluster then holds). Ray's 60 s made a restart after a node died wait that long for the dead
    node, which the cluster still counted for the first seconds; a start on an autoscaling
    cluster just tries more often."""
    os.environ.setdefault(START_TIMEOUT_ENV, str(START_TIMEOUT_S))
    return float(os.environ[START_TIMEOUT_ENV])


def make_trainer(cfg: TrainConfig, loop_config: dict, storage: Storage, run_dir: str,
                 callbacks: list) -> Trainer:
    """The TorchTrainer of one run: scaling (elastic when num_workers is a range), failure
    handling, checkpoints kept (the best and the last), where they go."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig

    lo, hi = cfg.workers_range
    storage_path, filesystem = storage.for_ray(cfg.run.storage)
    trainer = Trainer(
        train_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=lo if lo == hi else (lo, hi), use_gpu=cfg.resources.gpus_per_worker > 0,
            resources_per_worker=worker_bundle(cfg.resources),
            elastic_resize_monitor_interval_s=cfg.resources.elastic_resize_seconds),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(
                max_failures=cfg.run.max_failures,
                # a preempted node (a drained spot node) restarts the group from the checkpoint
                # its notice made, on its own budget: never charged to max_failures
                max_preemption_failures=-1,
                # each worker-group start waits start_timeout() s for resources; bound the
                # retries so a cluster that can no longer hold the workers ends the run, in words
                controller_failure_limit=max(1, math.ceil(
                    60 * cfg.resources.resource_wait_minutes / start_timeout()))),
            # the best (by val top-1 at an epoch's end; checkpoints inside epochs score -1) and
            # the latest are kept
            checkpoint_config=CheckpointConfig(num_to_keep=1,
                                               checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order="max"),
            callbacks=[FailureRecorder(storage, run_dir), *callbacks],
            worker_runtime_env={"env_vars": worker_env()},
            logging_config=LoggingConfig(log_level="WARNING")))
    # an elastic run below its minimum waits this long for nodes (Ray's policy: forever), and
    # grows by a checkpoint and a hand-over, not by Ray's resize (failures.SkipDrainingNodes)
    trainer.wait_s = 60 * cfg.resources.resource_wait_minutes
    trainer.grow = grow_key(run_dir)
    return trainer


def train(cfg: TrainConfig, storage: Storage | None = None, ray_address: str | None = None,
          callbacks: list | None = None, tracking: Tracking | None = None,
          label: str = "train", say=print) -> dict:
    """Run (or resume, when cfg.run.name names an unfinished run) and return the final summary."""
    storage = storage or Storage()
    cfg = resolved(cfg)
    manifest = read_manifest(storage, cfg.data)
    for split in ("train", "val"):
        if not manifest.splits.get(split) or not manifest.splits[split].shards:
            raise UserError(f"{cfg.data}: the staged dataset has no '{split}' split")
    storage.check_bucket(cfg.run.storage)
    check_data(storage, cfg, manifest)
    data_sha = manifest_sha256(storage, cfg.data)
    run_dir = join(cfg.run.storage, cfg.run.name)
    done = None if cfg.run.restart else finished_summary(storage, run_dir)
    if done is not None:
        # the same settings (claim refuses others): the run is done, not restarted
        identity.claim(storage, run_dir, "run.json", f"run {cfg.run.name}",
                       identity.defining(cfg, data_sha), restart=False)
        say(f"[{label}] run {cfg.run.name} finished earlier: its result follows (--restart "
            "trains it again)")
        return done
    init_state = checkpoint.init_weights(storage, cfg.run.init_from, tracking and tracking.uri) \
        if cfg.run.init_from else None
    if init_state is not None:   # refused here, before any worker starts (and pays FFCV's build)
        why = init_state_mismatch(cfg.recipe.arch, len(manifest.classes), cfg.recipe.blurpool,
                                  init_state)
        if why:
            raise UserError(why)
    if not cfg.run.restart:   # another recipe or global batch is refused before Ray starts
        identity.check(storage, run_dir, "run.json", f"run {cfg.run.name}",
                       identity.defining(cfg, data_sha))
    connect(ray_address)
    pin_cluster_address()
    nodes = check_capacity(cfg, say)
    if not nodes:
        # never decided from nodes that are not there: each worker group decides from the
        # memory of the nodes that hold it, when it starts
        say(f"[{label}] data placement: decided when the workers start (no node can hold a "
            "worker yet)")
    identity.claim(storage, run_dir, "run.json", f"run {cfg.run.name}",
                   identity.defining(cfg, data_sha), cfg.run.restart)
    events = RunEvents(storage, run_dir)

    mlflow = None
    if tracking is not None:
        mlflow = TrackedRun(tracking, cfg.run.name, storage=storage, run_dir=run_dir, say=say,
                            tags=lineage_tags(cfg.data, data_sha, tracking.trial_id),
                            params=safe_params(cfg.flat()))
    loop_config = {
        "train": cfg.model_dump(), "manifest": manifest.model_dump(), "storage": storage,
        "run_dir": run_dir, "init_state": init_state, "label": label,
        "lineage": {"manifest_sha256": data_sha, "val_set": manifest.val_set_digest(),
                    "mlflow_run_id": mlflow and mlflow.run_id,
                    "trial_id": tracking and tracking.trial_id},
        "tracking": mlflow and mlflow.for_workers()}
    try:
        events.add("driver_start")
        result = make_trainer(cfg, loop_config, storage, run_dir, callbacks or []).fit()
    except BaseException as exc:
        if mlflow is not None and isinstance(exc, Exception):
            mlflow.finish(status="FAILED")
        elif mlflow is not None:   # Ctrl-C, SIGTERM: the run ends within seconds, MLflow or not
            mlflow.interrupted()
        if isinstance(exc, Exception):
            raise explain_failure(exc, cfg) from exc
        raise

    summary = build_summary(cfg.run.name, result, storage, cfg.run.storage, run_dir, events.all(),
                            mlflow and mlflow.run_id)
    write_summary(storage, run_dir, summary)
    if mlflow is not None:
        mlflow.finish(summary)
    return summary
