"""Every setting of the pipeline, as plain values with one override path: defaults < YAML file < flags.

The pydantic models below are the single source: the CLI flags, the config-file keys and the
README's configuration reference are all generated from them. A setting's name is unique across
the whole file, so a flag (`--lr`), a flat key in a config file (`lr: 0.5`) and a search-space key
all name it the same way; in a file, the training settings may also be grouped in their sections
(`recipe:`, `loader:`, `resources:`, `run:`), as in ffcv-imagenet's configs.
"""
from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
LAYOUTS = ("folders", "kaggle", "devkit", "tars")
SPLITS = ("train", "val")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- stage ----------------------------------------------------------------------------------------
class WriterSettings(Settings):
    """How images are stored in the shards (recorded in manifest.json)."""

    max_resolution: int = Field(512, ge=16, le=4096, description="longest side kept (px)")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality of stored images")
    compress_probability: float = Field(0.5, ge=0, le=1, description="share of images stored as "
                                        "JPEG, the rest raw (FFCV 'proportion' mode)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoding bound: an image that "
                                  "would decode to more pixels (after reduced-scale JPEG decoding) "
                                  "is skipped as a possible decompression bomb; one image takes at "
                                  "most ~3 bytes per pixel while it is decoded")


class StageConfig(Settings):
    """`pipeline stage`: ImageNet (any layout, local or s3://) -> FFCV shards + manifest.json."""

    source: str = Field("", description="ImageNet root: folder or s3://bucket/prefix")
    dest: str = Field("", description="staged dataset: folder or s3://bucket/prefix")
    layout: Literal["auto", *LAYOUTS] = Field("auto", description="source layout (auto: detected)")
    splits: list[Literal[*SPLITS]] = Field(list(SPLITS), description="splits to stage")
    max_resolution: int = WriterSettings.model_fields["max_resolution"]
    jpeg_quality: int = WriterSettings.model_fields["jpeg_quality"]
    compress_probability: float = WriterSettings.model_fields["compress_probability"]
    max_image_pixels: int = WriterSettings.model_fields["max_image_pixels"]
    shard_size: int = Field(1024, ge=1, description="images per shard")
    workers: int = Field(0, ge=0, description="shards staged at once (0: the cluster's CPUs)")
    replace: bool = Field(False, description="restage a dest that holds a dataset of other images "
                                              "or settings (its manifest is removed first, so "
                                              "nothing reads it half-replaced)")

    @property
    def writer(self) -> WriterSettings:
        return WriterSettings(**{k: getattr(self, k) for k in WriterSettings.model_fields})


# -- train ----------------------------------------------------------------------------------------
class Recipe(Settings):
    """The FFCV ImageNet recipe: model, optimisation, resolution schedule, evaluation."""

    arch: Literal[ARCHS] = Field("resnet50", description="torchvision ResNet")
    blurpool: bool = Field(True, description="blur before strided convolutions (BlurPool)")
    epochs: int = Field(16, ge=1, description="training epochs")
    batch_size: int = Field(512, ge=1, description="images per worker per step")
    lr: float = Field(0.1, gt=0, description="peak learning rate per 256 images; scaled by the "
                                              "global batch (batch_size x workers / 256)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay (never on BatchNorm or "
                                "biases); when not given, the arch's: 1e-4 for resnet50/101/152, "
                                "5e-5 for resnet18/34 (FFCV's rn50 and rn18 configs)")
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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto = bf16 on GPUs that have it, else fp32")
    channels_last: bool = Field(True, description="channels-last memory format on GPU")
    seed: int = Field(0, description="seed for weights and data order")

    @model_validator(mode="after")
    def _arch_weight_decay(self):
        if "weight_decay" not in self.model_fields_set:
            # set without marking it given: a copy with another arch takes that arch's value
            self.__dict__["weight_decay"] = default_weight_decay(self.arch)
        return self


def default_weight_decay(arch: str) -> float:
    """FFCV's recipe: 1e-4 in its ResNet-50 configs, 5e-5 in its ResNet-18 ones; the deeper
    ResNets as ResNet-50, ResNet-34 as ResNet-18."""
    return 1e-4 if arch in ("resnet50", "resnet101", "resnet152") else 5e-5


class LoaderSettings(Settings):
    """How each node caches its shards and how workers read them."""

    placement: Literal["auto", "global", "node"] = Field(
        "auto", description="global: every node holds every shard and each epoch is one shuffle "
                            "of the whole split; node: each node reads its exact share of each "
                            "split (whole shards and at most two cut ones) and shuffles it; "
                            "auto: global when the dataset "
                            "fits in memory_fraction of every node's memory, else node")
    read_mode: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: FFCV reads the node file through the page cache in fully "
                            "random order (needs the node's share in RAM, else it thrashes); "
                            "stream: FFCV's process cache reads whole pages in a shuffled order, "
                            "samples shuffled within windows of 2048 (needs only a few pages per "
                            "worker); auto: stream when the share is over memory_fraction of RAM")
    memory_fraction: float = Field(0.5, gt=0, le=1, description="how much of a node's memory the "
                                   "data may count on (for placement and read_mode auto)")
    cache_dir: str = Field("", description="node-local shard cache (default: $PIPELINE_CACHE_DIR, "
                                           "else a private folder of this user under /tmp)")
    max_steps_per_epoch: int = Field(0, ge=0, description="cap steps per epoch (0: no cap); "
                                                          "for smoke tests and benchmarks")


class Resources(Settings):
    """Where the workers run and how many there are."""

    num_workers: str = Field("1", description="training workers: N, or MIN-MAX for elastic "
                                              "training that grows as nodes join")
    gpus_per_worker: int = Field(0, description="GPUs per worker: 1, or 0 to train on CPU (one "
                                                "GPU per worker: for more GPUs, more workers)")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per worker (Ray's reservation; also "
                                                      "its loader threads on CPU workers)")
    loader_threads: int = Field(0, ge=0, description="FFCV decode threads per worker (0: on GPU "
                                "workers the node's CPUs per GPU, e.g. 12 on a p4d or g5.12xlarge; "
                                "on CPU workers cpus_per_worker)")
    accelerator_type: str = Field("", description="GPU type every worker must have, as Ray names "
                                  "it (A10G, A100, H100, L4...): the run is placed only on such "
                                  "nodes; 'any' lets one run mix GPU types; empty: one type, "
                                  "whichever the workers get (a mix ends the run at start)")
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="extra custom Ray resources per worker, e.g. "
                                          "trainer=1 (flag: NAME=AMOUNT[,NAME=AMOUNT])")
    elastic_resize_seconds: float = Field(60, gt=0, description="elastic runs: how often to check "
                                                                 "whether more workers fit")
    resource_wait_minutes: float = Field(
        10, gt=0, description="give up when the workers cannot be placed for this long")
    autoscaling: bool = Field(False, description="the cluster adds nodes on demand (cluster.yaml, "
                                                 "KubeRay autoscaler): wait for room instead of "
                                                 "refusing workers the current nodes cannot hold")

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

    @field_validator("gpus_per_worker", mode="before")
    @classmethod
    def _one_gpu_per_worker(cls, v):
        """A worker drives one GPU (one DDP rank): 2 would bill a GPU that idles, a fraction
        would put two ranks on one GPU."""
        try:
            ok = float(v) in (0, 1)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError("a worker uses one GPU: set 1 (or 0 for CPU) and raise num_workers "
                             "to use more GPUs, e.g. num_workers 8 for 8 GPUs")
        return int(float(v))

    @property
    def workers_range(self) -> tuple[int, int]:
        lo, _, hi = self.num_workers.partition("-")
        return int(lo), int(hi or lo)


class RunSettings(Settings):
    """Where the run keeps its checkpoints, under which name, and how it survives failures."""

    storage: str = Field("runs", description="where runs and checkpoints go (Ray storage_path): "
                                             "folder or s3:// URI")
    name: str = Field("", description="run name; re-running with the same name resumes it "
                                      "(default: a new name per run)")
    max_failures: int = Field(3, ge=-1, description="worker-group restarts allowed (-1: no limit)")
    checkpoint_every: str = Field("1", description="checkpoint every N epochs (N), or also inside "
                                  "epochs: 'N steps' or 'N min' (always at the end of the run); "
                                  "each checkpoint holds the exact data position")
    progress_seconds: float = Field(60, gt=0, description="a progress line inside long epochs "
                                                          "every this many seconds")
    log_every_steps: int = Field(50, ge=1, description="log train loss, img/s and data wait to "
                                                       "MLflow every N steps inside epochs")
    init_from: str = Field("", description="fine-tune from a checkpoint URI or models:/NAME@ALIAS "
                                           "(the head is replaced when the class count differs)")
    restart: bool = Field(False, description="discard what an earlier run (or sweep) of this name "
                                             "left and start over; without it, a name used "
                                             "again resumes only when data and recipe match")

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _interval_text(cls, v):
        checkpoint_interval(str(v))   # raises ValueError in words
        return str(v).strip()


CHECKPOINT_UNITS = {"": "epochs", "epoch": "epochs", "epochs": "epochs", "step": "steps",
                    "steps": "steps", "min": "minutes", "mins": "minutes", "minute": "minutes",
                    "minutes": "minutes", "m": "minutes"}


def checkpoint_interval(text: str) -> tuple[float, str]:
    """'2' or '2 epochs' -> (2, 'epochs'); '500 steps' -> (500, 'steps'); '10 min' -> (10, 'minutes')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in CHECKPOINT_UNITS or float(m.group(1)) <= 0:
        raise ValueError("expected N (epochs), 'N steps' or 'N min', e.g. 1, '500 steps', '10 min'")
    amount, unit = float(m.group(1)), CHECKPOINT_UNITS[m.group(2)]
    if unit != "minutes" and amount != int(amount):
        raise ValueError(f"a whole number of {unit} expected")
    return amount, unit


TRAIN_SECTIONS: dict[str, type[Settings]] = {
    "recipe": Recipe, "loader": LoaderSettings, "resources": Resources, "run": RunSettings}


class TrainConfig(Settings):
    """`pipeline train`: one ResNet training run with the FFCV ImageNet recipe."""

    data: str = Field("", description="staged dataset: folder or s3:// URI holding manifest.json")
    recipe: Recipe = Field(default_factory=Recipe)
    loader: LoaderSettings = Field(default_factory=LoaderSettings)
    resources: Resources = Field(default_factory=Resources)
    run: RunSettings = Field(default_factory=RunSettings)

    @model_validator(mode="before")
    @classmethod
    def _route_flat_keys(cls, values: Any) -> Any:
        """Accept `lr: 0.5` as well as `recipe: {lr: 0.5}`: each flat key goes to its section."""
        return nest(values) if isinstance(values, dict) else values

    def flat(self) -> dict[str, Any]:
        """Every setting by its own name (what MLflow params and search spaces use)."""
        out = {"data": self.data}
        for section in TRAIN_SECTIONS:
            out.update(getattr(self, section).model_dump())
        return out

    def explicit(self) -> set[str]:
        """The settings someone gave (file or flag), as opposed to defaults."""
        given = {"data"} & self.model_fields_set
        for section in TRAIN_SECTIONS:
            given |= getattr(self, section).model_fields_set
        return given

    def replace(self, **values: Any) -> "TrainConfig":
        """A copy with some settings changed, by their own names; validated."""
        current = self.flat()
        if "weight_decay" not in self.explicit():
            del current["weight_decay"]   # the arch's, and `values` may change the arch
        return build(TrainConfig, {**current, **values}, "settings")

    @property
    def workers_range(self) -> tuple[int, int]:
        return self.resources.workers_range

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, a constant of the run (the lr schedule depends on it):
        batch_size x the most workers it may have. With fewer workers (an elastic run before
        its nodes join, or after a node was preempted) each worker takes a larger part of it,
        in equal micro-batches of half to 1.5 x batch_size (training.trainer.micro_batches)."""
        return self.recipe.batch_size * self.workers_range[1]


SECTION_OF = {name: section for section, model in TRAIN_SECTIONS.items()
              for name in model.model_fields}


def nest(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        section = SECTION_OF.get(key)
        if section is None:
            if key in TRAIN_SECTIONS and isinstance(value, dict):
                out.setdefault(key, {}).update(value)
            else:
                out[key] = value
        else:
            out.setdefault(section, {})
            if isinstance(out[section], dict):
                out[section][key] = value
    return out


# -- tune / register / run ------------------------------------------------------------------------
class TuneSettings(Settings):
    """`pipeline tune`: the sweep around the training settings."""

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


class RegisterConfig(Settings):
    """`pipeline run`'s last step: register the best model."""

    model: str = Field("", description="registered model name (empty: do not register)")
    min_val_top1: float = Field(0, ge=0, le=1, description="quality gate: the val top-1 a model "
                                "needs to become @champion (0: twice chance, 2 / classes); a "
                                "sweep whose best trial is below it fails")


class PipelineConfig(Settings):
    """`pipeline run`: one file for the whole chain; each section is what its own command takes."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    stage: StageConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneSettings | None = None
    # `register` is also a BaseModel attribute: the field is register_, the YAML key register
    register_: RegisterConfig | None = Field(None, alias="register")


# -- flags, files, errors -------------------------------------------------------------------------
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


def leaf_fields(model: type[BaseModel]) -> Iterator[tuple[str, Any, str | None]]:
    """(name, field info, section or None) of every setting, sections opened."""
    for name, info in model.model_fields.items():
        if model is TrainConfig and name in TRAIN_SECTIONS:
            for sub, sub_info in TRAIN_SECTIONS[name].model_fields.items():
                yield sub, sub_info, name
        else:
            yield name, info, None


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel],
                    skip: tuple[str, ...] = ()) -> None:
    """One flag per setting (--batch-size for batch_size), defaulting to 'not given' so that only
    flags the user typed override the config file."""
    for name, info, _ in leaf_fields(model):
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


def from_args(args: argparse.Namespace, models: dict[str, type[BaseModel]],
              skip: dict[str, tuple[str, ...]] | None = None) -> dict[str, BaseModel]:
    """Settings for a command that takes the models named by section, e.g. {"train": TrainConfig}:
    defaults < --config FILE < flags the user typed.

    The file holds either sections (stage:, train:, tune:, register:, as for `pipeline run`) or
    this command's settings at its top level; there each key goes to the model that has it."""
    skip = skip or {}
    path = getattr(args, "config", None)
    source = path or "flags"
    values = load_yaml(path)
    if any(k in SECTIONS for k in values):
        per_model = {s: dict(values.get(s) or {}) for s in models}
    else:
        per_model = {s: {} for s in models}
        for key, value in values.items():
            owners = [s for s, m in models.items() if key not in skip.get(s, ())
                      and (key in m.model_fields or (m is TrainConfig and key in SECTION_OF))]
            if not owners:
                raise UserError(f"{source}: unknown setting '{key}' (see --help for the settings)")
            per_model[owners[0]][key] = value
    out = {}
    for section, model in models.items():
        names = {name for name, _, _ in leaf_fields(model)} - set(skip.get(section, ()))
        given = {k: v for k, v in vars(args).items() if k in names}
        file_values = {k: v for k, v in per_model[section].items() if k not in skip.get(section, ())}
        if model is TrainConfig:
            file_values = nest(file_values)
            for key, value in nest(given).items():
                if isinstance(value, dict):
                    file_values.setdefault(key, {})
                    if isinstance(file_values[key], dict):
                        file_values[key] = {**file_values[key], **value}
                        continue
                file_values[key] = value
            out[section] = build(model, file_values, source)
        else:
            out[section] = build(model, {**file_values, **given}, source)
    return out


def reference_markdown(model: type[BaseModel]) -> str:
    """The configuration reference table for README.md, generated from a model."""
    rows = ["| key | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info, section in leaf_fields(model):
        default = info.get_default(call_default_factory=True)
        flag = "--" + name.replace("_", "-")
        if info.annotation is not bool and _flag_type(info.annotation)[0] is None:
            flag = "(file only)"
        key = f"{section}.{name}" if section else name
        text = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | `{flag}` | `{default!r}` | {text} |")
    return "\n".join(rows)
