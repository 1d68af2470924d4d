"""`pipeline run --config FILE.yaml`: stage -> tune (or one training run) -> register.

Every step is resumable on its own, so re-running the same command after a crash goes on where it
stopped: staging is skipped when DEST already holds a complete manifest for the same source and
settings (and otherwise redoes only missing shards), a sweep is restored, a training run of the
same name resumes from its checkpoint, and a model already registered from the same checkpoint is
not registered again.
"""
from __future__ import annotations

import json

from ..config import PipelineConfig, StageConfig, TrainConfig, build, load_yaml
from ..data.manifest import MANIFEST, read_manifest
from ..errors import UserError
from ..storage import Storage, absolute, join
from ..tracking import Tracking

STEPS = ("stage", "train", "tune", "register")


def load_pipeline_config(path: str) -> PipelineConfig:
    values = load_yaml(path)
    if not values:
        raise UserError(f"--config {path}: empty; expected stage:, train:, tune: and register: sections")
    return build(PipelineConfig, values, path)


def why_stage(storage: Storage, cfg: StageConfig) -> str | None:
    """None when DEST already holds exactly what staging cfg.source with cfg would give (same
    settings, and the source's files unchanged: names, sizes, ETags or mtimes); else why not."""
    from ..data.source import source_listing

    if not storage.exists(join(cfg.dest, MANIFEST)):
        return "not staged yet"
    manifest = read_manifest(storage, cfg.dest)
    src = manifest.source
    if src.get("uri") != cfg.source:
        return f"it holds a dataset staged from {src.get('uri')}"
    if manifest.writer != cfg.writer or sorted(manifest.splits) != sorted(cfg.splits) or \
            src.get("shard_size") != cfg.shard_size or cfg.layout not in ("auto", src.get("layout")):
        return "it was staged with other settings"
    if src.get("listing_sha256") != source_listing(storage, cfg.source):
        return f"{cfg.source} changed since it was staged"
    return None


def register_once(storage: Storage, record_dir: str, checkpoint: str, model: str,
                  tracking: Tracking | None, min_val_top1: float | None = None) -> dict:
    """Register checkpoint as a version of model unless this very checkpoint already was."""
    from ..registry.promote import register

    record = join(record_dir, f"registered-{model}.json")
    if storage.exists(record):
        done = json.loads(storage.read_bytes(record))
        if done.get("checkpoint") == checkpoint:
            return {**done, "skipped": True}
    out = register(checkpoint, model, storage, tracking.uri if tracking else None,
                   min_val_top1=min_val_top1)
    out["checkpoint"] = checkpoint
    storage.write_bytes(record, json.dumps(out).encode())
    return out


def run(cfg: PipelineConfig, steps: tuple[str, ...] = STEPS, storage: Storage | None = None,
        ray_address: str | None = None, tracking: Tracking | None = None, say=print) -> dict:
    from ..data.stage import stage
    from ..sweep.tune import tune
    from ..training.launch import train

    storage = storage or Storage()
    landed: dict = {}
    train_cfg = cfg.train
    explicit = train_cfg.explicit()
    if cfg.stage is not None:
        stage_cfg = cfg.stage.model_copy(update={"source": absolute(cfg.stage.source),
                                                 "dest": absolute(cfg.stage.dest)})
        if not train_cfg.data:
            train_cfg = train_cfg.model_copy(update={"data": stage_cfg.dest})
        if "stage" in steps:
            why = why_stage(storage, stage_cfg)
            if why is None:
                say(f"[stage] skipped: {stage_cfg.dest} already holds what staging "
                    f"{stage_cfg.source} with these settings gives (same files)")
            else:
                say(f"[stage] staging {stage_cfg.dest}: {why}")
                result = stage(stage_cfg.model_copy(update={"replace": True}), storage,
                               ray_address, say=say)
                say(f"[stage] {result.summary()['splits']} -> {stage_cfg.dest}")
            landed["dataset"] = stage_cfg.dest

    min_top1 = cfg.register_.min_val_top1 if cfg.register_ else None
    best = None
    if cfg.tune is not None and "tune" in steps:
        out = tune(train_cfg, cfg.tune, storage, ray_address, tracking, resume=True,
                   explicit=explicit, min_val_top1=min_top1, say=say, say_when_new=False)
        best = {"checkpoint": out["best_checkpoint"], "val_top1": out["best_val_top1"],
                "record_dir": join(absolute(train_cfg.run.storage), cfg.tune.name)}
        say(f"[tune] sweep {out['name']}: best {out['best_trial']} val top-1 "
            f"{out['best_val_top1']:.4f}; plot {out['plot']}")
        landed.update(sweep=best["record_dir"], plot=out["plot"], trials=out["trials"],
                      best_config=out["best_config"])
    elif "train" in steps and (cfg.tune is None or "tune" not in steps):
        name = train_cfg.run.name or "run"
        out = train(train_cfg.replace(name=name), storage, ray_address, tracking=tracking, say=say)
        best = {"checkpoint": out["checkpoint"], "val_top1": out["val_top1"],
                "record_dir": out["run_dir"]}
        say(f"[train] {name}: val top-1 {out['val_top1']:.4f}; checkpoint {out['checkpoint']}")
        landed.update(run=out["run_dir"])
    if best:
        landed.update(checkpoint=best["checkpoint"], val_top1=best["val_top1"])

    if cfg.register_ and cfg.register_.model and "register" in steps:
        if best is None:
            best = _previous_result(storage, cfg, train_cfg)
        reg = register_once(storage, best["record_dir"], best["checkpoint"], cfg.register_.model,
                            tracking, min_top1)
        verb = "already registered as" if reg.get("skipped") else "registered as"
        alias = f"@{reg['alias']}" if reg.get("alias") else "without an alias"
        say(f"[register] {best['checkpoint']} {verb} {reg['model_name']} version "
            f"{reg['model_version']} ({alias}: {reg.get('reason', '')})")
        landed.update(model_name=reg["model_name"], model_version=reg["model_version"],
                      alias=reg.get("alias"))
    if tracking is not None:
        landed["tracking_uri"] = tracking.uri
    return landed


def _previous_result(storage: Storage, cfg: PipelineConfig, train_cfg: TrainConfig) -> dict:
    """For `--only register`: the best checkpoint of the sweep (or run) that already finished."""
    from ..sweep.tune import RESULT_FILE
    from ..training.summary import SUMMARY_FILE

    base = absolute(train_cfg.run.storage)
    if cfg.tune is not None:
        folder = join(base, cfg.tune.name)
        path = join(folder, RESULT_FILE)
        key = "best_checkpoint"
    else:
        folder = join(base, train_cfg.run.name or "run")
        path = join(folder, SUMMARY_FILE)
        key = "checkpoint"
    if not storage.exists(path):
        raise UserError(f"nothing to register yet: {path} is missing (run the tune/train step first)")
    result = json.loads(storage.read_bytes(path))
    if result.get("verdict") == "at chance":
        raise UserError(f"nothing to register: sweep {cfg.tune.name}'s best trial is no better "
                        f"than chance (val top-1 {result.get('best_val_top1')})")
    return {"checkpoint": result[key], "val_top1": result.get("best_val_top1", result.get("val_top1")),
            "record_dir": folder}
