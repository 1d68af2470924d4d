"""`pipeline tune`: a Ray Tune sweep where each trial is one `pipeline train` run.

Ray 2.60 pattern: a function trainable per trial launches a TorchTrainer (through train()) whose
reports reach Tune via TuneReportCallback; ASHA stops weak trials on val top-1. Trials are named by
their Tune trial id, without timestamps, so an interrupted sweep resumed with Tuner.restore finds
its trials' own Train runs and checkpoints again.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import TrainConfig, build, load_yaml
from .errors import UserError
from .storage import Storage, join
from .tracking import Tracking

DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "lr": {"loguniform": [0.05, 0.5]},
    "weight_decay": {"loguniform": [1e-5, 1e-4]},
    "label_smoothing": {"choice": [0.0, 0.1]},
    "batch_size": {"choice": [256, 512]},
    "arch": {"choice": ["resnet18", "resnet50"]},
}
SAMPLERS = ("loguniform", "uniform", "choice", "randint", "grid")


class TuneSettings(BaseModel):
    """`pipeline tune`: the sweep around the training settings."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(4, ge=1, description="trials to run (samples of the search space)")
    max_concurrent: int = Field(0, ge=0, description="trials at once (0: as many as the "
                                                     "cluster's CPUs/GPUs hold)")
    search_space: str | dict[str, Any] = Field(
        "", description="YAML file (or, in a config file, a mapping): setting -> "
                        "{loguniform|uniform|randint: [lo, hi]} or {choice|grid: [values]} "
                        "(default: lr, weight decay, label smoothing, batch size, arch)")
    scheduler: Literal["asha", "none"] = Field("asha", description="early stopping on val top-1")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep 1/N of trials at each rung")
    search: Literal["random", "optuna"] = Field("random", description="search algorithm")
    name: str = Field("sweep", description="sweep name; --resume continues the sweep of this name")
    register_as: str = Field("", description="register the best trial's model under this name")
    search_seed: int = Field(0, description="seed of the search algorithm")


def load_search_space(spec: str | dict) -> dict[str, Any]:
    path = spec if isinstance(spec, str) else "search_space"
    space = spec if isinstance(spec, dict) else (load_yaml(spec) if spec else DEFAULT_SEARCH_SPACE)
    for key, spec in space.items():
        if key not in TrainConfig.model_fields:
            raise UserError(f"{path}: '{key}' is not a training setting")
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise UserError(f"{path}: {key}: expected one of {', '.join(SAMPLERS)} "
                                f"with its arguments, e.g. {{loguniform: [0.01, 1.0]}}")
    return space


def to_param_space(space: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        kind, args = next(iter(spec.items()))
        out[key] = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
                    "randint": lambda a: tune.randint(*a), "choice": tune.choice,
                    "grid": tune.grid_search}[kind](args)
    return out


def trial_fn(config: dict, base: dict, sweep: dict) -> None:
    """One trial: a whole `pipeline train` run, its reports forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import finished_summary, train

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = TrainConfig(**{**base, **config, "name": trial_id, "storage": sweep["runs"]})
    storage = sweep["storage"]
    done = finished_summary(storage, join(cfg.storage, trial_id))
    if done is not None:
        # Finished before the sweep was killed, but Tune had not saved that yet: report the
        # recorded result instead of training again.
        ray.tune.report({"epoch": done["epochs_completed"], "val_top1": done["val_top1"],
                         "val_top5": done["val_top5"]})
        return
    tracking = None
    if sweep.get("tracking"):
        tracking = Tracking(**{**sweep["tracking"], "trial_id": trial_id})
    train(cfg, storage=storage, callbacks=[TuneReportCallback()], tracking=tracking)


def trial_row(result, max_epochs: int) -> dict:
    metrics = result.metrics or {}
    epochs = int(metrics.get("epoch") or 0)
    errored = result.error is not None
    return {"id": metrics.get("trial_id") or os.path.basename(result.path),
            "status": "ERROR" if errored else "TERMINATED",
            "epochs_completed": epochs,
            "val_top1": metrics.get("val_top1"), "val_top5": metrics.get("val_top5"),
            "stopped_early": (not errored) and epochs < max_epochs,
            "config": result.config, "checkpoint_path": metrics.get("checkpoint_path")}


def plot_trials(results, rows: list[dict], path: str) -> None:
    """Val top-1 per epoch for every trial; ASHA-stopped trials dashed and marked with x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result, row in zip(results, rows):
        df = result.metrics_dataframe
        if df is None or "val_top1" not in df or "epoch" not in df:
            continue
        df = df.dropna(subset=["val_top1"])
        style = "--" if row["stopped_early"] else "-"
        label = row["id"] + (" (stopped by ASHA)" if row["stopped_early"] else "") + \
            (" (error)" if row["status"] == "ERROR" else "")
        (line,) = ax.plot(df["epoch"], df["val_top1"], style, marker="o", label=label)
        if row["stopped_early"] and len(df):
            ax.plot(df["epoch"].iloc[-1], df["val_top1"].iloc[-1], "x", color=line.get_color(),
                    markersize=12, mew=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1")
    ax.set_title("val top-1 per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tune(base: TrainConfig, settings: TuneSettings, storage: Storage | None = None,
         ray_address: str | None = None, tracking: Tracking | None = None,
         resume: bool = False) -> dict:
    import ray
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from .manifest import read_manifest
    from .ray_connect import connect
    from .tracking import client as tracking_client
    from .tracking import experiment_id, find_or_start_run, safe_params
    from .train import absolute, storage_for_ray, worker_bundle, workers_that_fit

    storage = storage or Storage()
    if not base.data:
        raise UserError("--data is required: the staged dataset (folder or s3:// URI)")
    base = base.model_copy(update={"data": absolute(base.data), "storage": absolute(base.storage),
                                   "cache_dir": absolute(base.cache_dir)})
    read_manifest(storage, base.data)   # fail early, in words, on a dataset that is not staged
    space = load_search_space(settings.search_space)
    for key, value in space.items():
        if not isinstance(value, dict):
            build(TrainConfig, {**base.model_dump(), key: value}, "search_space")
    storage.check_bucket(base.storage)
    sweep_dir = join(base.storage, settings.name)

    connect(ray_address)
    lo, _ = base.workers_range
    fits, _ = workers_that_fit(worker_bundle(base))
    if fits < lo and not base.autoscaling:
        raise UserError(f"each trial needs {lo} workers of {worker_bundle(base)}, and the cluster "
                        f"can hold {fits}; lower --num-workers or add nodes (or set autoscaling "
                        "when the cluster adds nodes on demand)")
    concurrent = settings.max_concurrent or max(1, fits // lo)

    parent = None
    if tracking is not None:
        mlflow_client = tracking_client(tracking.uri)
        exp_id = experiment_id(mlflow_client, tracking.experiment, tracking.uri)
        parent_id = find_or_start_run(mlflow_client, exp_id, f"sweep-{settings.name}",
                                      tags={"pipeline.data": base.data, "pipeline.sweep": settings.name},
                                      params=safe_params({**settings.model_dump(),
                                                          "search_space": json.dumps(space)}))
        parent = {"client": mlflow_client, "run_id": parent_id}
        tracking = Tracking(tracking.uri, tracking.experiment, parent_id)

    sweep = {"storage": storage, "runs": join(sweep_dir, "runs"),
             "tracking": tracking and {"uri": tracking.uri, "experiment": tracking.experiment,
                                      "parent_run_id": tracking.parent_run_id}}
    # A trial only drives its TorchTrainer: keep it on the head node, holding no CPU that a
    # training worker needs (Tune refuses an all-zero request, hence the sliver of the head).
    trainable = rtune.with_resources(
        rtune.with_parameters(trial_fn, base=base.model_dump(), sweep=sweep),
        {"CPU": 0, "node:__internal_head__": 0.01})
    storage_path, filesystem = storage_for_ray(storage, base.storage)
    tune_path = join(storage_path, settings.name) if filesystem is None else f"{storage_path}/{settings.name}"

    if resume and rtune.Tuner.can_restore(tune_path, storage_filesystem=filesystem):
        tuner = rtune.Tuner.restore(tune_path, trainable, resume_unfinished=True,
                                    resume_errored=False, storage_filesystem=filesystem)
    else:
        if resume:
            print(f"[tune] nothing to resume at {sweep_dir}: starting the sweep", flush=True)
        # max_t one past the last epoch: ASHA never stops a trial that is about to finish anyway,
        # so finishing trials end their own train() (summary, MLflow status) instead of being cut.
        scheduler = (ASHAScheduler(time_attr="epoch", grace_period=settings.grace_period,
                                   max_t=base.epochs + 1, reduction_factor=settings.reduction_factor)
                     if settings.scheduler == "asha" else FIFOScheduler())
        search_alg = None
        if settings.search == "optuna":
            try:
                from ray.tune.search.optuna import OptunaSearch
            except ImportError as exc:
                raise UserError("--search optuna needs the optuna package: pip install optuna") from exc
            search_alg = OptunaSearch(seed=settings.search_seed)
        tuner = rtune.Tuner(
            trainable,
            param_space=to_param_space(space),
            tune_config=rtune.TuneConfig(
                metric="val_top1", mode="max", num_samples=settings.trials,
                max_concurrent_trials=concurrent, scheduler=scheduler, search_alg=search_alg,
                trial_name_creator=lambda t: t.trial_id, trial_dirname_creator=lambda t: t.trial_id),
            run_config=rtune.RunConfig(name=settings.name, storage_path=storage_path,
                                       storage_filesystem=filesystem,
                                       failure_config=rtune.FailureConfig(max_failures=0)))
    results = tuner.fit()
    return summarize(results, base, settings, storage, sweep_dir, parent, tracking)


def summarize(results, base, settings, storage, sweep_dir, parent, tracking) -> dict:
    """Per-trial table, the plot, MLflow bookkeeping, the best trial (registered if asked)."""
    # in trial-id order, so a tie always picks the same best (a restored sweep lists its
    # trials in another order)
    pairs = sorted(((trial_row(results[i], base.epochs), results[i]) for i in range(len(results))),
                   key=lambda p: p[0]["id"])
    rows, items = [p[0] for p in pairs], [p[1] for p in pairs]
    done = [row for row in rows if row["status"] != "ERROR" and row["val_top1"] is not None]
    if not done:
        raise UserError(f"sweep {settings.name}: every trial failed; see the trial errors above")
    best = max(done, key=lambda r: (r["epochs_completed"], r["val_top1"]))
    from .train import checkpoint_uri, finished_summary

    best_summary = finished_summary(storage, join(sweep_dir, "runs", best["id"]))
    best_checkpoint = None
    if best_summary is not None:
        best_checkpoint = best_summary["checkpoint"]
    elif best["checkpoint_path"]:   # Ray's path, without the s3:// of its filesystem
        best_checkpoint = checkpoint_uri(best["checkpoint_path"], base.storage)

    with tempfile.TemporaryDirectory() as tmp:
        plot = os.path.join(tmp, "val_top1.png")
        plot_trials(items, rows, plot)
        storage.upload_file(plot, join(sweep_dir, "val_top1.png"))
        if parent:
            parent["client"].log_artifact(parent["run_id"], plot)
    if parent:
        _mark_children(parent["client"], tracking, rows)
        parent["client"].log_metric(parent["run_id"], "best_val_top1", best["val_top1"])
        parent["client"].set_terminated(parent["run_id"], status="FINISHED")

    out = {"name": settings.name, "best_trial": best["id"], "best_config": best["config"],
           "best_val_top1": best["val_top1"], "best_val_top5": best["val_top5"],
           "best_checkpoint": best_checkpoint, "plot": join(sweep_dir, "val_top1.png"),
           "parent_run_id": parent and parent["run_id"],
           "trials": [{k: v for k, v in r.items() if k not in ("config", "checkpoint_path")}
                      for r in rows]}
    storage.write_bytes(join(sweep_dir, "result.json"), json.dumps(out, indent=1, default=str).encode())
    if settings.register_as:
        from .registry import register

        reg = register(best_checkpoint, settings.register_as, storage,
                       tracking.uri if tracking else None,
                       extra_tags={"pipeline.sweep": settings.name, "pipeline.trial_id": best["id"]})
        out.update(model_name=reg["model_name"], model_version=reg["model_version"],
                   alias=reg["alias"], promotion=reg)
    return out


def _mark_children(mlflow_client, tracking, rows) -> None:
    """Close each trial's child run: stopped early by ASHA, errored, or finished."""
    from .tracking import TRIAL_TAG, experiment_id

    exp_id = experiment_id(mlflow_client, tracking.experiment, tracking.uri)
    for row in rows:
        runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{TRIAL_TAG}` = '{row['id']}'")
        for run in runs:
            mlflow_client.set_tag(run.info.run_id, "pipeline.stopped_early", str(row["stopped_early"]))
            if run.info.status == "RUNNING":
                status = "FAILED" if row["status"] == "ERROR" else \
                    ("KILLED" if row["stopped_early"] else "FINISHED")
                mlflow_client.set_terminated(run.info.run_id, status=status)
