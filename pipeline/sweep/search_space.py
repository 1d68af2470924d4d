"""What a sweep searches: the user's space, or a default one that covers only what the user left
open and fits the data and the cluster.

A space maps a training setting (by its own name, e.g. `lr`) to a sampler:
{loguniform|uniform|randint: [lo, hi]} or {choice|grid: [values]}, or to a constant.
"""
from __future__ import annotations

from typing import Any

from ..config import TrainConfig, build, leaf_fields, load_yaml
from ..errors import UserError

DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "lr": {"loguniform": [0.05, 0.5]},          # per 256 images, like --lr
    "weight_decay": {"loguniform": [1e-5, 1e-4]},
    "label_smoothing": {"choice": [0.0, 0.1]},
    "batch_size": {"choice": [256, 512]},
    "arch": {"choice": ["resnet18", "resnet50"]},
}
SAMPLERS = ("loguniform", "uniform", "choice", "randint", "grid")
MIN_STEPS = 20   # fewer steps per epoch than this and a trial learns next to nothing
SETTINGS = {name for name, _, _ in leaf_fields(TrainConfig)}


def load_search_space(spec: str | dict) -> dict[str, Any] | None:
    """The user's space (a YAML file, or a mapping from a config file); None when none given."""
    if not spec:
        return None
    where = spec if isinstance(spec, str) else "search_space"
    space = spec if isinstance(spec, dict) else load_yaml(spec)
    for key, sampler in space.items():
        if key not in SETTINGS or key in ("data", "name", "storage"):
            raise UserError(f"{where}: '{key}' is not a training setting that a sweep can search")
        if isinstance(sampler, dict):
            kind = next(iter(sampler), None)
            args = sampler.get(kind)
            if len(sampler) != 1 or kind not in SAMPLERS or not isinstance(args, list) or not args \
                    or (kind in ("loguniform", "uniform", "randint") and len(args) != 2):
                raise UserError(f"{where}: {key}: expected one of {', '.join(SAMPLERS)} with its "
                                "arguments, e.g. {loguniform: [0.01, 1.0]} or {choice: [16, 32]}")
    return space


def values_of(sampler: Any) -> list | None:
    """The values a choice/grid (or constant) can take; None for a continuous range."""
    if not isinstance(sampler, dict):
        return [sampler]
    kind, args = next(iter(sampler.items()))
    return list(args) if kind in ("choice", "grid") else None


def fitting_batches(samples_per_worker: int, candidates: list[int]) -> tuple[list[int], list[int]]:
    """(batches giving each worker at least MIN_STEPS steps per epoch, the others)."""
    ok = [b for b in candidates if samples_per_worker // b >= MIN_STEPS]
    return ok, [b for b in candidates if b not in ok]


def plan_space(user_space: dict | None, base: TrainConfig, flags: set[str], explicit: set[str],
               train_samples: int) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(space to search, fixed settings, notes to print).

    `flags` were typed on the command line, `explicit` set by a flag or the config file: both
    are constants of the sweep. A user space naming a flag is an error; the default space leaves
    out everything explicit, and batch sizes that would give a worker fewer than MIN_STEPS steps.
    """
    workers = base.workers_range[0]
    per_worker = train_samples // workers
    notes: list[str] = []
    if user_space is not None:
        clash = sorted(set(user_space) & flags)
        if clash:
            flag = "--" + clash[0].replace("_", "-")
            raise UserError(f"--search-space names '{clash[0]}', which {flag} also sets: a setting "
                            "is either fixed or searched; drop one of the two")
        space = dict(user_space)
        for key in sorted(set(space) & (explicit - flags)):
            notes.append(f"{key}: searched as the search space says (the config file's value is "
                         "used only where the space does not reach)")
        batches = values_of(space["batch_size"]) if "batch_size" in space else None
        if batches:
            _, bad = fitting_batches(per_worker, [int(b) for b in batches])
            if bad:
                notes.append(f"warning: batch_size {', '.join(map(str, bad))} gives each of "
                             f"{workers} worker(s) fewer than {MIN_STEPS} steps per epoch on "
                             f"{train_samples} training images: such trials learn little")
    else:
        space = {k: v for k, v in DEFAULT_SEARCH_SPACE.items() if k not in explicit}
        if "batch_size" in space:
            ok, bad = fitting_batches(per_worker, space["batch_size"]["choice"])
            if not ok:   # small data: the largest powers of two that still give MIN_STEPS steps
                top = max(1, per_worker // MIN_STEPS).bit_length()
                ok = sorted({1 << max(0, top - 2), 1 << (top - 1)})
            if bad:
                notes.append(f"batch_size {', '.join(map(str, bad))} left out: each of {workers} "
                             f"worker(s) would get fewer than {MIN_STEPS} steps per epoch from "
                             f"{train_samples} training images; searching {ok}")
            space["batch_size"] = {"choice": ok} if len(ok) > 1 else ok[0]
    if "batch_size" not in space:
        given = base.recipe.batch_size
        if per_worker // given < MIN_STEPS:
            notes.append(f"warning: batch_size {given} gives each of {workers} worker(s) "
                         f"{per_worker // given} steps per epoch on {train_samples} training "
                         f"images (fewer than {MIN_STEPS}): trials may learn little")
    fixed = {k: v for k, v in base.flat().items()
             if k not in space and k in explicit and k not in ("name",)}
    # constants in the space are checked like any setting
    for key, value in space.items():
        if not isinstance(value, dict):
            build(TrainConfig, {**base.flat(), key: value}, "search_space")
    return space, fixed, notes


def describe(space: dict[str, Any]) -> str:
    parts = []
    for key, sampler in space.items():
        if isinstance(sampler, dict):
            kind, args = next(iter(sampler.items()))
            parts.append(f"{key} {kind}{args}")
        else:
            parts.append(f"{key} = {sampler}")
    return ", ".join(parts) or "(nothing: every trial is the same run)"


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
