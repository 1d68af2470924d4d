"""The MLflow model registry: register a checkpoint, and give it @champion only when it deserves it.

A new version becomes champion only when
- its val top-1 is clearly better than chance (at least `min_val_top1`; default twice chance,
  2 / number of classes),
- its score is comparable with the current champion's: the same validation set (same classes,
  same val shards) measured the same way (val resolution, crop ratio, flip averaging): a bigger
  number on another set, or with test-time flips against one without, says nothing, and
- it beats the version @champion names now (ties keep the old one).
Otherwise it is registered without the alias (or as @challenger when it merely lost), and the
decision and its reason are stored on the version. Operators stay in charge: `pipeline promote`
moves the alias by hand, and later registrations compare with whatever it names.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..storage import Storage
from ..tracking import client as tracking_client
from ..tracking import experiment_id, lineage_tags, safe_params, tracking_uri
from ..training import checkpoint
from .packaging import evaluation

SCORE_TAG = "pipeline.val_top1"
VAL_SET_TAG = "pipeline.val_set"
PROTOCOL_TAG = "pipeline.eval_protocol"          # e.g. "val_res=256 crop_ratio=0.875 lr_tta=on"
COMPARABLE_TAG = "pipeline.comparable"           # comparability_key: equal keys, comparable scores
CLASSES_TAG = "pipeline.num_classes"
CONTENDS_TAG = "pipeline.promotion.contends"     # the champion a promoted version set out to beat
ERA_TAG = "pipeline.promotion.era"               # changes whenever an operator moves the alias
CHAMPION, CHALLENGER, NONE = "champion", "challenger", "none"
BARRIER_ENV = "PIPELINE_TEST_PROMOTION_BARRIER"


@dataclass(frozen=True)
class Scored:
    version: str
    score: float | None
    val_set: str | None
    num_classes: int | None
    protocol: str | None = None


def eval_protocol(meta: dict) -> str | None:
    """How a checkpoint's val top-1 was measured: val resolution, centre crop ratio, left-right
    flip averaging, as one canonical string; None when the checkpoint does not say (see
    packaging.evaluation for checkpoints written before meta.json recorded lr_tta)."""
    prep = evaluation(meta)
    if any(prep.get(k) is None for k in ("resolution", "crop_ratio", "lr_tta")):
        return None
    return (f"val_res={int(prep['resolution'])} crop_ratio={round(float(prep['crop_ratio']), 6):g} "
            f"lr_tta={'on' if prep['lr_tta'] else 'off'}")


def comparability_key(val_set: str | None, protocol: str | None) -> str | None:
    """Two val top-1s may be ranked only when their keys are equal: the same validation set
    (classes and val shards, manifest.val_set_digest) measured with the same protocol. None
    when either is unknown: such a score is never compared."""
    if not val_set or not protocol:
        return None
    return hashlib.sha256(f"{val_set}|{protocol}".encode()).hexdigest()


def not_comparable(new: Scored, champion: Scored) -> str | None:
    """Why new's score cannot be ranked against the champion's (None when it can)."""
    key = comparability_key(new.val_set, new.protocol)
    if key is not None and key == comparability_key(champion.val_set, champion.protocol):
        return None
    by_hand = "(move the alias by hand with `pipeline promote` if this model should serve)"
    if champion.val_set is None or champion.val_set != new.val_set:
        return (f"evaluated on another validation set or class list than champion version "
                f"{champion.version}: the scores are not comparable {by_hand}")
    return (f"measured with another evaluation protocol ({new.protocol or 'not recorded'}) than "
            f"champion version {champion.version} ({champion.protocol or 'not recorded'}): the "
            f"scores are not comparable {by_hand}")


def gate(num_classes: int | None, min_val_top1: float | None) -> float:
    """The val top-1 a model needs to count as better than chance."""
    if min_val_top1:
        return min_val_top1
    return 2.0 / num_classes if num_classes else 0.0


def decide(new: Scored, champion: Scored | None, min_val_top1: float | None = None) -> tuple[str, str]:
    """(champion | challenger | none, why) for a new version against the current champion."""
    if new.score is None:
        return NONE, "no val top-1 was recorded for this checkpoint, so it cannot be ranked"
    need = gate(new.num_classes, min_val_top1)
    if new.score < need:
        chance = f"chance is {1 / new.num_classes:.3f} for {new.num_classes} classes; " \
            if new.num_classes else ""
        return NONE, (f"val top-1 {new.score:.4f} is not clearly better than chance ({chance}"
                      f"promotion needs at least {need:.3f}, see --min-val-top1)")
    if champion is None:
        return CHAMPION, "first version to pass the quality gate"
    why = not_comparable(new, champion)
    if why:
        return NONE, why
    if champion.score is None:
        return CHAMPION, f"champion version {champion.version} has no recorded val top-1"
    if new.score > champion.score:
        return CHAMPION, f"val top-1 {new.score:.4f} beats champion version {champion.version} " \
                         f"({champion.score:.4f})"
    return CHALLENGER, (f"val top-1 {new.score:.4f} does not beat champion version "
                        f"{champion.version} ({champion.score:.4f})")


def _scored(v) -> Scored:
    def num(tag, kind):
        try:
            return kind(v.tags[tag])
        except (KeyError, ValueError, TypeError):
            return None

    return Scored(str(v.version), num(SCORE_TAG, float), v.tags.get(VAL_SET_TAG), num(CLASSES_TAG, int),
                  v.tags.get(PROTOCOL_TAG))


def _champion(mlflow_client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _era(mlflow_client, name: str) -> str:
    return mlflow_client.get_registered_model(name).tags.get(ERA_TAG, "0")


def rightful_champion(versions: list, start: str, era: str) -> str:
    """Follow the promotions of one era from `start` (the champion they set out to beat): at
    each step the best version that contended the current one, and beats it, takes over (a tie
    keeps the older). Every registration computes the same answer from the same tags, so racing
    ones agree on one champion, the best of them."""
    score = {str(v.version): _scored(v).score for v in versions}
    current = start
    while True:
        floor = score.get(current)
        contenders = [v for v in versions if v.tags.get(CONTENDS_TAG) == current
                      and v.tags.get(ERA_TAG) == era and _scored(v).score is not None
                      and (floor is None or _scored(v).score > floor)]
        if not contenders:
            return current
        best = max(contenders, key=lambda v: (_scored(v).score, -int(v.version)))
        current = str(best.version)


def hold_at_barrier(version: str, timeout: float = 300) -> None:
    """Fault injection for tests: with PIPELINE_TEST_PROMOTION_BARRIER=DIR, a promotion that has
    read and compared the champion says so (DIR/read-VERSION) and writes nothing until
    DIR/go-VERSION exists, so a test makes registrations race on demand and picks the order of
    their writes."""
    folder = os.environ.get(BARRIER_ENV)
    if not folder:
        return
    Path(folder, f"read-{version}").touch()
    deadline = time.monotonic() + timeout
    while not Path(folder, f"go-{version}").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{BARRIER_ENV}: no go-{version} in {folder} within {timeout:.0f} s")
        time.sleep(0.1)


def promote_if_better(mlflow_client, name: str, version: str,
                      min_val_top1: float | None = None) -> dict:
    """Decide, record the decision on the version, and move the aliases it calls for.

    MLflow has no compare-and-set for aliases. A winning version therefore records which
    champion it beat (and the era), then sets the alias to the rightful champion of that chain
    and re-reads until alias and chain agree: racing registrations converge on the best one."""
    previous = _champion(mlflow_client, name)
    era = _era(mlflow_client, name)
    new = _scored(mlflow_client.get_model_version(name, version))
    decision, reason = decide(new, _scored(previous) if previous else None, min_val_top1)
    hold_at_barrier(version)
    info = {"decision": decision, "reason": reason, "val_top1": new.score,
            "previous_champion_version": previous.version if previous else None,
            "previous_champion_val_top1": _scored(previous).score if previous else None}
    for k, v in info.items():
        mlflow_client.set_model_version_tag(name, version, f"pipeline.promotion.{k}", str(v))
    if decision == CHAMPION:
        start = str(previous.version) if previous else NONE
        mlflow_client.set_model_version_tag(name, version, ERA_TAG, era)
        mlflow_client.set_model_version_tag(name, version, CONTENDS_TAG, start)
        for _ in range(30):
            versions = mlflow_client.search_model_versions(f"name = '{name}'")
            mlflow_client.set_registered_model_alias(name, CHAMPION,
                                                     rightful_champion(versions, start, era))
            time.sleep(0.2 + random.random() * 0.3)
            versions = mlflow_client.search_model_versions(f"name = '{name}'")
            now = _champion(mlflow_client, name)
            if now is not None and str(now.version) == rightful_champion(versions, start, era):
                break
        if now is None or str(now.version) != str(version):
            decision = CHALLENGER
            info.update(decision=decision, reason=f"beat version {start}, but version "
                        f"{now and now.version}, registered at the same time, is better")
            for k in ("decision", "reason"):
                mlflow_client.set_model_version_tag(name, version, f"pipeline.promotion.{k}", info[k])
    if decision == CHALLENGER:
        mlflow_client.set_registered_model_alias(name, CHALLENGER, version)
    return info


def promote(name: str, version: str, reason: str, uri: str | None = None) -> dict:
    """`pipeline promote`: an operator gives @champion to a version (e.g. a rollback); recorded
    on the version with who, when and why. Later registrations compare with it."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    mlflow_client = tracking_client(uri)
    try:
        target = mlflow_client.get_model_version(name, version)
    except MlflowException as exc:
        raise UserError(f"model {name} has no version {version} "
                        f"({str(exc).splitlines()[0][:160]})") from exc
    previous = _champion(mlflow_client, name)
    who, when = getpass.getuser(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    era = f"{when} {who} v{version}"
    mlflow_client.set_registered_model_tag(name, ERA_TAG, era)
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(target.version))
    for key, value in {"promoted_by": who, "promoted_at": when, "promoted_reason": reason or "",
                       "decision": CHAMPION, "reason": f"promoted by hand: {reason or 'no reason given'}"
                       }.items():
        mlflow_client.set_model_version_tag(name, version, f"pipeline.promotion.{key}", value)
    return {"model_name": name, "model_version": str(version), "by": who, "at": when,
            "reason": reason, "previous_champion_version": previous.version if previous else None}


def register(checkpoint_uri: str | None, model_name: str, storage: Storage | None = None,
             uri: str | None = None, experiment: str = "pipeline-registry",
             extra_tags: dict | None = None, min_val_top1: float | None = None) -> dict:
    """Log the checkpoint's model to MLflow, register a new version of model_name, promote."""
    import mlflow

    from .packaging import log_model

    if not checkpoint_uri:
        raise UserError(f"nothing to register as {model_name}: the run has no checkpoint (it "
                        "ended before its first checkpoint was written)")
    storage = storage or Storage()
    uri = tracking_uri(uri)
    mlflow_client = tracking_client(uri)
    meta, state = checkpoint.load(storage, checkpoint_uri)
    model = build_eval_model(meta, state["model"])
    tags = {**lineage_tags(meta.get("data", ""), meta.get("manifest_sha256", ""), meta.get("trial_id")),
            "pipeline.checkpoint": checkpoint_uri, **(extra_tags or {})}

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp_id = experiment_id(mlflow_client, experiment, uri)
    with tempfile.TemporaryDirectory() as tmp, \
            mlflow.start_run(experiment_id=exp_id, run_name=f"register-{model_name}", tags=tags):
        mlflow.log_params(safe_params({"arch": meta["arch"], "epoch": meta["epoch"],
                                       "num_classes": meta["num_classes"]}))
        mlflow.log_metrics({k: v for k, v in meta.get("metrics", {}).items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        info = log_model(meta, state["model"], model, Path(tmp))
    score = meta.get("metrics", {}).get("val_top1")
    version_tags = {**tags, CLASSES_TAG: str(meta["num_classes"])}
    if score is not None:
        version_tags[SCORE_TAG] = str(score)
    if meta.get("val_set"):
        version_tags[VAL_SET_TAG] = meta["val_set"]
    protocol = eval_protocol(meta)
    if protocol:
        version_tags[PROTOCOL_TAG] = protocol
    key = comparability_key(meta.get("val_set"), protocol)
    if key:
        version_tags[COMPARABLE_TAG] = key
    version = mlflow.register_model(info.model_uri, model_name, tags=version_tags)
    promotion = promote_if_better(mlflow_client, model_name, str(version.version), min_val_top1)
    alias = promotion["decision"] if promotion["decision"] != NONE else None
    return {"model_name": model_name, "model_version": str(version.version), "alias": alias,
            "model_uri": f"models:/{model_name}/{version.version}", **promotion}


def build_eval_model(meta: dict, state: dict):
    from ..training.model import build_model

    model = build_model(meta["arch"], meta["num_classes"], meta.get("blurpool", True))
    model.load_state_dict(state)
    return model.eval()
