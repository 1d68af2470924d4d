"""Configuration as plain values with one override path: model defaults < YAML file < flags.

The pydantic models are the single source: the CLI flags, the config-file keys and the README's
configuration reference are all generated from them.
"""
from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class StageConfig(BaseModel):
    """`pipeline stage`: ImageNet (any layout, local or s3://) -> FFCV shards + manifest.json."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field("", description="ImageNet root: folder or s3://bucket/prefix")
    dest: str = Field("", description="staged dataset: folder or s3://bucket/prefix")
    layout: Literal["auto", "folders", "kaggle", "devkit", "tars"] = Field(
        "auto", description="source layout (auto: detected)")
    splits: list[Literal["train", "val"]] = Field(["train", "val"], description="splits to stage")
    max_resolution: int = Field(512, ge=16, le=4096, description="longest side kept (px)")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of stored images")
    compress_probability: float = Field(0.5, ge=0, le=1, description="share of images stored as "
                                        "JPEG, the rest raw (FFCV 'proportion' mode)")
    shard_size: int = Field(1024, ge=1, description="images per shard")
    workers: int = Field(0, ge=0, description="shards staged at once (0: the cluster's CPUs)")


class RegisterConfig(BaseModel):
    """`pipeline run`'s last step: register the best model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("", description="registered model name (empty: do not register)")


class TrainConfig(BaseModel):
    """`pipeline train`: one ResNet training run with the FFCV ImageNet recipe."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field("", description="staged dataset: folder or s3:// URI holding manifest.json")
    arch: Literal[ARCHS] = Field("resnet50", description="torchvision ResNet")
    epochs: int = Field(16, ge=1, description="training epochs")
    batch_size: int = Field(512, ge=1, description="images per worker per step")
    lr: float = Field(0.1, gt=0, description="peak learning rate per 256 images; scaled by the "
                                              "global batch (batch_size x workers / 256)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-5, ge=0, description="weight decay (never on BatchNorm or biases)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing")
    lr_schedule: Literal["triangular", "step", "cosine"] = Field(
        "triangular", description="triangular: linear up to lr_peak_epoch, then down to 0")
    lr_peak_epoch: float = Field(2, ge=0, description="epoch of the triangular/warm-up peak")
    lr_step_length: int = Field(30, ge=1, description="step schedule: epochs per step")
    lr_step_ratio: float = Field(0.1, gt=0, description="step schedule: lr factor per step")
    min_res: int = Field(160, ge=16, description="training resolution at the start (px)")
    max_res: int = Field(192, ge=16, description="training resolution after the ramp (px)")
    start_ramp: int = Field(11, ge=0, description="epoch where progressive resizing starts")
    end_ramp: int = Field(13, ge=0, description="epoch where progressive resizing ends")
    val_res: int = Field(256, ge=16, description="validation resolution: centre crop of 224/256")
    val_batch_size: int = Field(256, ge=1, description="validation images per worker per step")
    lr_tta: bool = Field(True, description="average left-right flips at validation")
    blurpool: bool = Field(True, description="blur before strided convolutions (BlurPool)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto = bf16 on GPUs that have it, else fp32")
    channels_last: bool = Field(True, description="channels-last memory format on GPU")
    num_workers: str = Field("1", description="training workers: N, or MIN-MAX for elastic "
                                              "training that grows as nodes join")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker (0: train on CPU)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per worker (also its loader threads)")
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="extra custom Ray resources per worker, e.g. "
                                          "trainer=1 (flag: NAME=AMOUNT[,NAME=AMOUNT])")
    elastic_resize_seconds: float = Field(60, gt=0, description="elastic runs: how often to check "
                                                                 "whether more workers fit")
    storage: str = Field("runs", description="where runs and checkpoints go (Ray storage_path): "
                                             "folder or s3:// URI")
    name: str = Field("", description="run name; re-running with the same name resumes it "
                                      "(default: a new name per run)")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts allowed (-1: no limit)")
    checkpoint_every: int = Field(1, ge=1, description="checkpoint every N epochs (and the last)")
    resource_wait_minutes: float = Field(
        10, gt=0, description="give up when the workers cannot be placed for this long")
    autoscaling: bool = Field(False, description="the cluster adds nodes on demand (cluster.yaml, "
                                                 "KubeRay autoscaler): wait for room instead of "
                                                 "refusing workers the current nodes cannot hold")
    init_from: str = Field("", description="fine-tune from a checkpoint URI or models:/NAME@ALIAS "
                                           "(the head is replaced when the class count differs)")
    seed: int = Field(0, description="seed for weights and data order")
    cache_dir: str = Field("", description="node-local shard cache (default: "
                                           "$PIPELINE_CACHE_DIR or /tmp/pipeline-cache)")
    max_steps_per_epoch: int = Field(0, ge=0, description="cap steps per epoch (0: no cap); "
                                                          "for smoke tests and benchmarks")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers_text(cls, v):
        v = str(v).strip()
        if not re.fullmatch(r"\d+(-\d+)?", v):
            raise ValueError("expected N or MIN-MAX, e.g. 4 or 2-8")
        lo, _, hi = v.partition("-")
        if int(lo) < 1 or (hi and int(hi) < int(lo)):
            raise ValueError("needs 1 <= MIN <= MAX")
        return v

    @property
    def workers_range(self) -> tuple[int, int]:
        lo, _, hi = self.num_workers.partition("-")
        return int(lo), int(hi or lo)


def parse_resources(text: str) -> dict[str, float]:
    """'trainer=1,GPU=0.5' -> {'trainer': 1.0, 'GPU': 0.5}"""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, got '{item}'") from None
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT, got '{item}'")
    return out


def _flag_type(annotation):
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return str, list(typing.get_args(annotation))
    if origin is list:
        return _flag_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType) and str in typing.get_args(annotation):
        return str, None   # e.g. a file name, or a mapping given in the config file
    if annotation in (int, float, str):
        return annotation, None
    if annotation == dict[str, float]:
        return parse_resources, None
    return None, None


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel],
                    skip: tuple[str, ...] = ()) -> None:
    """One flag per field (--batch-size for batch_size), defaulting to 'not given' so that only
    flags the user typed override the config file."""
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} (default: {info.get_default(call_default_factory=True)!r})"
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        typ, choices = _flag_type(info.annotation)
        if typ is None:  # nested structures: config file only
            continue
        nargs = "+" if typing.get_origin(info.annotation) is list else None
        parser.add_argument(flag, dest=name, type=typ, choices=choices, nargs=nargs,
                            default=argparse.SUPPRESS, help=help_text)


def load_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"--config {path}: cannot read it ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of settings at the top level")
    return data


def build(model: type[BaseModel], values: dict[str, Any], source: str = "config"):
    """Validate into the model; a bad value is a UserError naming the field."""
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            raise UserError(f"{source}: unknown setting '{where}' (see --help for the settings)") from exc
        raise UserError(f"{source}: {where}: {err['msg']} (got {err.get('input')!r})") from exc


SECTIONS = ("stage", "train", "tune", "register")


def from_args(model: type[BaseModel], args: argparse.Namespace, section: str,
              skip: tuple[str, ...] = ()) -> BaseModel:
    """Defaults < --config FILE < explicit flags. The file holds either the settings of this
    command at its top level, or sections (stage:, train:, tune:, register:) as for `pipeline run`."""
    path = getattr(args, "config", None)
    values = load_yaml(path)
    if any(k in SECTIONS for k in values):
        values = values.get(section) or {}
    elif section != "train":
        values = {}
    values = {k: v for k, v in values.items() if k not in skip}
    given = {k: v for k, v in vars(args).items() if k in model.model_fields and k not in skip}
    return build(model, {**values, **given}, source=path or "flags")


def reference_markdown(model: type[BaseModel]) -> str:
    """The configuration reference table for README.md, generated from a model."""
    rows = ["| key | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True)
        flag = "--" + name.replace("_", "-")
        if info.annotation is not bool and _flag_type(info.annotation)[0] is None:
            flag = "(file only)"
        text = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{flag}` | `{default!r}` | {text} |")
    return "\n".join(rows)
