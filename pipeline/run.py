"""`pipeline run --config FILE.yaml`: stage -> tune (or one training run) -> register.

Every step is resumable on its own, so re-running the same command after a crash goes on where it
stopped: staging is skipped when DEST already holds a complete manifest for the same source and
settings (and otherwise redoes only missing shards), a sweep is restored, a training run of the
same name resumes from its checkpoint, and a model already registered from the same checkpoint is
not registered again.
"""
from __future__ import annotations

import json
from pydantic import BaseModel, ConfigDict, Field

from .config import RegisterConfig, StageConfig, TrainConfig, build, load_yaml
from .errors import UserError
from .manifest import MANIFEST, WriterSettings, read_manifest
from .storage import Storage, join
from .tracking import Tracking
from .tune import TuneSettings

STEPS = ("stage", "train", "tune", "register")


class PipelineConfig(BaseModel):
    """One file for the whole chain; each section is what its own command takes."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    stage: StageConfig | None = None
    train: TrainConfig = TrainConfig()
    tune: TuneSettings | None = None
    # `register` is also a BaseModel attribute: the field is register_, the YAML key register
    register_: RegisterConfig | None = Field(None, alias="register")


def load_pipeline_config(path: str) -> PipelineConfig:
    values = load_yaml(path)
    if not values:
        raise UserError(f"--config {path}: empty; expected stage:, train:, tune: and register: sections")
    return build(PipelineConfig, values, path)


def already_staged(storage: Storage, cfg: StageConfig) -> bool:
    """DEST holds a complete manifest for the same source and writer settings."""
    if not storage.exists(join(cfg.dest, MANIFEST)):
        return False
    manifest = read_manifest(storage, cfg.dest)
    writer = WriterSettings(max_resolution=cfg.max_resolution, jpeg_quality=cfg.jpeg_quality,
                            compress_probability=cfg.compress_probability)
    return (manifest.source.get("uri") == cfg.source and manifest.writer == writer
            and sorted(manifest.splits) == sorted(cfg.splits))


def register_once(storage: Storage, record_dir: str, checkpoint: str, model: str,
                  tracking: Tracking | None) -> dict:
    """Register checkpoint as a version of model unless this very checkpoint already was."""
    from .registry import register

    record = join(record_dir, f"registered-{model}.json")
    if storage.exists(record):
        done = json.loads(storage.read_bytes(record))
        if done.get("checkpoint") == checkpoint:
            return {**done, "skipped": True}
    out = register(checkpoint, model, storage, tracking.uri if tracking else None)
    out["checkpoint"] = checkpoint
    storage.write_bytes(record, json.dumps(out).encode())
    return out


def run(cfg: PipelineConfig, steps: tuple[str, ...] = STEPS, storage: Storage | None = None,
        ray_address: str | None = None, tracking: Tracking | None = None, say=print) -> dict:
    from .stage import stage_from_config
    from .train import absolute, train
    from .tune import tune

    storage = storage or Storage()
    landed: dict = {}
    train_cfg = cfg.train
    if cfg.stage is not None:
        stage_cfg = cfg.stage.model_copy(update={"source": absolute(cfg.stage.source),
                                                 "dest": absolute(cfg.stage.dest)})
        if not train_cfg.data:
            train_cfg = train_cfg.model_copy(update={"data": stage_cfg.dest})
        if "stage" in steps:
            if already_staged(storage, stage_cfg):
                say(f"[stage] skipped: {stage_cfg.dest} already holds a complete dataset from "
                    f"{stage_cfg.source} with these settings")
            else:
                result = stage_from_config(stage_cfg, storage, ray_address)
                say(f"[stage] {result.summary()['splits']} -> {stage_cfg.dest}")
            landed["dataset"] = stage_cfg.dest

    best = None
    if cfg.tune is not None and "tune" in steps:
        out = tune(train_cfg, cfg.tune, storage, ray_address, tracking, resume=True)
        best = {"checkpoint": out["best_checkpoint"], "val_top1": out["best_val_top1"],
                "record_dir": join(absolute(train_cfg.storage), cfg.tune.name)}
        say(f"[tune] sweep {out['name']}: best {out['best_trial']} val top-1 "
            f"{out['best_val_top1']:.4f}; plot {out['plot']}")
        landed.update(sweep=best["record_dir"], plot=out["plot"], trials=out["trials"],
                      best_config=out["best_config"])
    elif "train" in steps and (cfg.tune is None or "tune" not in steps):
        name = train_cfg.name or "run"
        out = train(train_cfg.model_copy(update={"name": name}), storage, ray_address,
                    tracking=tracking)
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
                            tracking)
        verb = "already registered as" if reg.get("skipped") else "registered as"
        say(f"[register] {best['checkpoint']} {verb} {reg['model_name']} version "
            f"{reg['model_version']} (@{reg['decision']})")
        landed.update(model_name=reg["model_name"], model_version=reg["model_version"],
                      alias=reg["decision"])
    if tracking is not None:
        landed["tracking_uri"] = tracking.uri
    return landed


def _previous_result(storage: Storage, cfg: PipelineConfig, train_cfg: TrainConfig) -> dict:
    """For `--only register`: the best checkpoint of the sweep (or run) that already finished."""
    from .train import SUMMARY_FILE, absolute

    base = absolute(train_cfg.storage)
    if cfg.tune is not None:
        folder = join(base, cfg.tune.name)
        path = join(folder, "result.json")
        key = "best_checkpoint"
    else:
        folder = join(base, train_cfg.name or "run")
        path = join(folder, SUMMARY_FILE)
        key = "checkpoint"
    if not storage.exists(path):
        raise UserError(f"nothing to register yet: {path} is missing (run the tune/train step first)")
    result = json.loads(storage.read_bytes(path))
    return {"checkpoint": result[key], "val_top1": result.get("best_val_top1", result.get("val_top1")),
            "record_dir": folder}
