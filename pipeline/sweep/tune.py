"""`pipeline tune`: a Ray Tune sweep where each trial is one `pipeline train` run.

Ray 2.60 pattern: a function trainable per trial launches a TorchTrainer (through train()) whose
reports reach Tune via TuneReportCallback; ASHA stops weak trials on val top-1. Trials are named by
their Tune trial id, without timestamps, so an interrupted sweep resumed with Tuner.restore finds
its trials' own Train runs and checkpoints again.

Settings the user gave (flags, config file) are constants of the sweep; the search space covers
the rest (search_space.py). A sweep whose best trial is no better than chance says so and exits
non-zero; Ctrl-C or SIGTERM stops it without claiming it finished (no result, no registration,
MLflow runs KILLED), and `--resume` then finishes it.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile

from ..config import TrainConfig, TuneSettings
from ..errors import Interrupted, UserError
from ..storage import Storage, absolute, join
from ..tracking import JOB_ID_ENV, Tracking, submitted_job_id
from .asha import asha_max_t, asha_rungs
from .search_space import MIN_STEPS, describe, load_search_space, plan_space, to_param_space

RESULT_FILE = "result.json"
CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}


def keep_keys_out_of_trials() -> None:
    """Ray Tune copies the driver's AWS keys into every trial actor's runtime_env, which each
    node's runtime-env agent writes to its log. Trials run on nodes that have their own
    credentials (the cluster's), so the copy only leaks them: take the keys off Tune's list."""
    from ray.tune.execution import class_cache

    from ..training.trainer import FAULT_ENV, HOLD_ENV

    class_cache.ENV_VARS_TO_PROPAGATE -= CREDENTIALS
    # the tests' fault injection reaches a trial's workers as it reaches a run's (worker_env)
    class_cache.ENV_VARS_TO_PROPAGATE |= {FAULT_ENV, HOLD_ENV, JOB_ID_ENV}
    # Ray tells a job's id to its driver only: the trials' runs get it from here (lineage tag)
    job = submitted_job_id(os.environ)
    if job:
        os.environ.setdefault(JOB_ID_ENV, job)


def epoch_reports_to_tune():
    """TuneReportCallback for the reports at an epoch's end only: a checkpoint taken inside an
    epoch (a preemption notice, checkpoint_every in steps or minutes) has no validation score,
    and ASHA compares trials by epoch. Each epoch once: with checkpoint_every N > 1 epochs a
    worker group restarted from an earlier epoch's checkpoint trains (and reports) epochs that
    Tune already has; ASHA keeps the first score of a rung anyway, the repeat would only
    duplicate the trial's rows."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReports(TuneReportCallback):
        reported = 0

        def after_report(self, run_context, metrics, checkpoint):
            epoch = int(metrics[0].get("epoch") or 0)
            if metrics[0].get("mid_epoch") or (epoch and epoch <= self.reported):
                return
            self.reported = max(self.reported, epoch)
            super().after_report(run_context, metrics, checkpoint)

    return EpochReports()


def trial_fn(config: dict, base: dict, sweep: dict) -> None:
    """One trial: a whole `pipeline train` run, its reports forwarded to Tune."""
    import ray.tune

    from ..training.launch import train
    from ..training.summary import finished_summary

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = TrainConfig(**base).replace(**config, name=trial_id, storage=sweep["runs"], restart=False)
    storage = sweep["storage"]
    done = finished_summary(storage, join(sweep["runs"], trial_id))
    if done is not None:
        # Finished before the sweep was killed, but Tune had not saved that yet: report the
        # recorded result instead of training again.
        ray.tune.report({"epoch": done["epochs_completed"], "val_top1": done["val_top1"],
                         "val_top5": done["val_top5"]})
        return
    tracking = None
    if sweep.get("tracking"):
        tracking = Tracking(**{**sweep["tracking"], "trial_id": trial_id})
    train(cfg, storage=storage, callbacks=[epoch_reports_to_tune()], tracking=tracking,
          label=f"trial {trial_id}")


def trial_row(result, max_epochs: int) -> dict:
    metrics = result.metrics or {}
    epochs = int(metrics.get("epoch") or 0)
    errored = result.error is not None
    return {"id": metrics.get("trial_id") or os.path.basename(result.path),
            "status": "ERROR" if errored else "TERMINATED",
            "epochs_completed": epochs,
            "val_top1": metrics.get("val_top1"), "val_top5": metrics.get("val_top5"),
            "stopped_early": (not errored) and epochs < max_epochs,
            "config": result.config}


def likely_causes(best: dict, base: TrainConfig, train_samples: int) -> list[str]:
    """Why a sweep's best trial may have learned nothing, from what can be seen."""
    cfg = base.replace(**(best.get("config") or {}))
    workers = cfg.workers_range[0]
    steps = train_samples // workers // cfg.recipe.batch_size
    causes = []
    if steps < MIN_STEPS:
        causes.append(f"batch_size {cfg.recipe.batch_size} gives each of {workers} worker(s) "
                      f"{steps} steps per epoch on {train_samples} images (fewer than {MIN_STEPS})")
    if not 1e-3 <= cfg.recipe.lr <= 2.0:
        causes.append(f"lr {cfg.recipe.lr:g} per 256 images is far outside the usual 0.001-2")
    if best["epochs_completed"] < 3:
        causes.append(f"only {best['epochs_completed']} epoch(s) trained")
    return causes or ["the data may be too small or too hard for this model and schedule"]


class _StopOnSignal:
    """Ctrl-C / SIGTERM while Tune runs: ask Tune for its own graceful stop (it saves the
    experiment state for --resume and ends the trials), remember the signal, and let a second
    one act at once."""

    def __init__(self):
        self.received: list[int] = []
        self.previous = {}

    def __enter__(self):
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"   # ours, below, decides
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received.append(signum)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            Interrupted.raise_for(signum)   # Tune has not started yet
        os.kill(os.getpid(), signal.SIGUSR1)   # Tune's graceful stop

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def tune(base: TrainConfig, settings: TuneSettings, storage: Storage | None = None,
         ray_address: str | None = None, tracking: Tracking | None = None, resume: bool = False,
         flags: set[str] = frozenset(), explicit: set[str] | None = None,
         min_val_top1: float | None = None, say=print, say_when_new: bool = True) -> dict:
    from ray import tune as rtune

    from ..data.manifest import manifest_sha256, read_manifest
    from ..ray_connect import connect
    from ..training import identity
    from ..tracking import client as tracking_client
    from ..tracking import experiment_id, find_or_start_run, safe_params
    from ..training.cluster import worker_bundle, workers_that_fit

    storage = storage or Storage()
    if not base.data:
        raise UserError("--data is required: the staged dataset (folder or s3:// URI)")
    explicit = base.explicit() if explicit is None else explicit
    base = base.replace(data=absolute(base.data), storage=absolute(base.run.storage),
                        cache_dir=absolute(base.loader.cache_dir))
    manifest = read_manifest(storage, base.data)   # fail early, in words
    train_samples = manifest.splits["train"].samples if "train" in manifest.splits else 0
    space, fixed, notes = plan_space(load_search_space(settings.search_space), base, set(flags),
                                     set(explicit), train_samples)
    say(f"[tune] searching: {describe(space)}")
    say(f"[tune] fixed: {', '.join(f'{k}={v}' for k, v in sorted(fixed.items())) or '(nothing given)'}")
    for note in notes:
        say(f"[tune] {note}")
    storage.check_bucket(base.run.storage)
    sweep_dir = join(base.run.storage, settings.name)
    defining = {"trials": identity.defining(base, manifest_sha256(storage, base.data)),
                "search_space": space,
                "sweep": settings.model_dump(exclude={"name", "register_as", "max_concurrent"})}
    existed = identity.claim(storage, sweep_dir, "sweep.json", f"sweep {settings.name}", defining,
                             base.run.restart)
    if existed and not resume:
        raise UserError(f"sweep {settings.name} already exists at {sweep_dir}: --resume continues it "
                        "(or reports it again when it finished), --restart discards it, or choose "
                        "another --name")

    connect(ray_address)
    lo, _ = base.workers_range
    bundle = worker_bundle(base.resources)
    fits, _ = workers_that_fit(bundle)
    if fits < lo and not base.resources.autoscaling:
        raise UserError(f"each trial needs {lo} workers of {bundle}, and the cluster can hold "
                        f"{fits}; lower --num-workers or add nodes (or set autoscaling when the "
                        "cluster adds nodes on demand)")
    concurrent = settings.max_concurrent or max(1, fits // lo)

    parent = None
    if tracking is not None:
        mlflow_client = tracking_client(tracking.uri)
        exp_id = experiment_id(mlflow_client, tracking.experiment, tracking.uri)
        parent_id = find_or_start_run(mlflow_client, exp_id, f"sweep-{settings.name}",
                                      tags={"pipeline.data": base.data, "pipeline.sweep": settings.name},
                                      params=safe_params({**settings.model_dump(),
                                                          "search_space": json.dumps(space),
                                                          "fixed": json.dumps(fixed, default=str)}))
        parent = {"client": mlflow_client, "run_id": parent_id}
        tracking = Tracking(tracking.uri, tracking.experiment, parent_id)

    sweep = {"storage": storage, "runs": join(sweep_dir, "runs"),
             "tracking": tracking and {"uri": tracking.uri, "experiment": tracking.experiment,
                                      "parent_run_id": tracking.parent_run_id}}
    # A trial only drives its TorchTrainer: keep it on the head node, holding no CPU that a
    # training worker needs (Tune refuses an all-zero request, hence the sliver of the head).
    trial_base = base.model_dump()
    if "weight_decay" not in explicit:
        del trial_base["recipe"]["weight_decay"]   # each trial takes its own arch's value
    trainable = rtune.with_resources(
        rtune.with_parameters(trial_fn, base=trial_base, sweep=sweep),
        {"CPU": 0, "node:__internal_head__": 0.01})
    storage_path, filesystem = storage.for_ray(base.run.storage)
    tune_path = join(storage_path, settings.name) if filesystem is None else f"{storage_path}/{settings.name}"

    if resume and rtune.Tuner.can_restore(tune_path, storage_filesystem=filesystem):
        tuner = rtune.Tuner.restore(tune_path, trainable, resume_unfinished=True,
                                    resume_errored=False, storage_filesystem=filesystem)
    else:
        if resume and say_when_new:
            say(f"[tune] nothing to resume at {sweep_dir}: starting the sweep")
        scheduler = make_scheduler(settings, base.recipe.epochs, say)
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
    keep_keys_out_of_trials()
    with _StopOnSignal() as stop:
        results = tuner.fit()
    if stop.received:
        if parent:
            _end_runs(parent, tracking, "KILLED")
        raise Interrupted(stop.received[0])
    out = summarize(results, base, settings, storage, sweep_dir, parent, tracking)
    out.update(search_space=space, fixed=fixed)
    best = next(r for r in out["trials"] if r["id"] == out["best_trial"])
    need = _gate(manifest.num_classes, min_val_top1)
    if out["best_val_top1"] < need:
        out["verdict"] = "at chance"
        storage.write_bytes(join(sweep_dir, RESULT_FILE), json.dumps(out, indent=1, default=str).encode())
        causes = "; ".join(likely_causes({**best, "config": out["best_config"]}, base, train_samples))
        raise UserError(f"sweep {settings.name}: the best trial {out['best_trial']} reached val "
                        f"top-1 {out['best_val_top1']:.4f}, no better than chance "
                        f"({1 / manifest.num_classes:.3f} for {manifest.num_classes} classes; "
                        f"needs {need:.3f}); nothing was registered. Likely: {causes}")
    out["verdict"] = "ok"
    storage.write_bytes(join(sweep_dir, RESULT_FILE), json.dumps(out, indent=1, default=str).encode())
    if settings.register_as:
        from ..registry.promote import register

        if not out["best_checkpoint"]:
            raise UserError(f"sweep {settings.name}: the best trial {out['best_trial']} left no "
                            "checkpoint to register")
        reg = register(out["best_checkpoint"], settings.register_as, storage,
                       tracking.uri if tracking else None, min_val_top1=min_val_top1,
                       extra_tags={"pipeline.sweep": settings.name, "pipeline.trial_id": out["best_trial"]})
        out.update(model_name=reg["model_name"], model_version=reg["model_version"],
                   alias=reg["alias"], promotion=reg)
    return out


def make_scheduler(settings: TuneSettings, epochs: int, say=print):
    """ASHA with every rung before the last epoch (asha.py), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler != "asha":
        return FIFOScheduler()
    max_t = asha_max_t(epochs, settings.grace_period, settings.reduction_factor)
    if max_t is None:
        say(f"[tune] ASHA: grace_period {settings.grace_period} leaves no epoch before the last "
            f"of {epochs} to compare trials at: no trial is stopped early")
        return FIFOScheduler()
    rungs = asha_rungs(max_t, settings.grace_period, settings.reduction_factor)
    say(f"[tune] ASHA compares trials after epoch {', '.join(f'{r:g}' for r in rungs)} of "
        f"{epochs}; below the cut-off a trial is stopped there")
    # stop_last_trials=False: max_t is below the last epoch, and Ray would otherwise stop every
    # trial when it reaches max_t
    return ASHAScheduler(time_attr="epoch", grace_period=settings.grace_period, max_t=max_t,
                         reduction_factor=settings.reduction_factor, stop_last_trials=False)


def _gate(num_classes: int, min_val_top1: float | None) -> float:
    from ..registry.promote import gate

    return gate(num_classes, min_val_top1)


def summarize(results, base, settings, storage, sweep_dir, parent, tracking) -> dict:
    """Per-trial table, the plot, MLflow bookkeeping, the best trial and its checkpoint."""
    from ..training.summary import finished_summary
    from .plot import plot_trials

    # in trial-id order, so a tie always picks the same best (a restored sweep lists its
    # trials in another order)
    pairs = sorted(((trial_row(results[i], base.recipe.epochs), results[i])
                    for i in range(len(results))), key=lambda p: p[0]["id"])
    rows, items = [p[0] for p in pairs], [p[1] for p in pairs]
    done = [row for row in rows if row["status"] != "ERROR" and row["val_top1"] is not None]
    if not done:
        if parent:
            _end_runs(parent, tracking, "FAILED", rows)
        raise UserError(f"sweep {settings.name}: every trial failed; see the trial errors above")
    best = max(done, key=lambda r: (r["epochs_completed"], r["val_top1"]))
    best_summary = finished_summary(storage, join(sweep_dir, "runs", best["id"]))
    best_checkpoint = best_summary and best_summary["checkpoint"]

    with tempfile.TemporaryDirectory() as tmp:
        plot = os.path.join(tmp, "val_top1.png")
        plot_trials(items, rows, plot)
        storage.upload_file(plot, join(sweep_dir, "val_top1.png"))
        if parent:
            parent["client"].log_artifact(parent["run_id"], plot)
    if parent:
        parent["client"].log_metric(parent["run_id"], "best_val_top1", best["val_top1"])
        _end_runs(parent, tracking, "FINISHED", rows)

    return {"name": settings.name, "best_trial": best["id"], "best_config": best["config"],
            "best_val_top1": best["val_top1"], "best_val_top5": best["val_top5"],
            "best_checkpoint": best_checkpoint, "plot": join(sweep_dir, "val_top1.png"),
            "parent_run_id": parent and parent["run_id"],
            "trials": [{k: v for k, v in r.items() if k != "config"} for r in rows]}


def _end_runs(parent: dict, tracking: Tracking, status: str, rows: list[dict] | None = None) -> None:
    """Close the sweep's run and each trial's child run: stopped early by ASHA, errored,
    finished; or all KILLED when the sweep was interrupted."""
    from ..tracking import TRIAL_TAG

    mlflow_client = parent["client"]
    children = mlflow_client.search_runs(
        [mlflow_client.get_run(parent["run_id"]).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")
    by_trial = {row["id"]: row for row in rows or []}
    for run in children:
        row = by_trial.get(run.data.tags.get(TRIAL_TAG))
        child_status = status
        if row is not None:
            mlflow_client.set_tag(run.info.run_id, "pipeline.stopped_early", str(row["stopped_early"]))
            child_status = "FAILED" if row["status"] == "ERROR" else \
                ("KILLED" if row["stopped_early"] else "FINISHED")
        if run.info.status == "RUNNING" or status == "KILLED":
            if status == "KILLED" and run.info.status == "FINISHED":
                continue   # a trial that finished before the interruption stays finished
            mlflow_client.set_terminated(run.info.run_id, status=child_status)
    mlflow_client.set_terminated(parent["run_id"], status=status)
