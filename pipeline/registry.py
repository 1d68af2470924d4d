"""The MLflow model registry: register a checkpoint, promote it only when it beats the champion,
load a registered model back (for `predict` and for fine-tuning)."""
from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path

from .errors import UserError
from .storage import Storage, join
from .tracking import client as tracking_client
from .tracking import experiment_id, lineage_tags, safe_params, tracking_uri
from .trainer import CHECKPOINT_FILE, META_FILE

SCORE_TAG = "pipeline.val_top1"
CHAMPION, CHALLENGER = "champion", "challenger"


def load_checkpoint(storage: Storage, uri: str) -> tuple[dict, dict]:
    """(meta, model state dict) of a checkpoint folder (local or S3)."""
    import torch

    if storage.size(join(uri, META_FILE)) is None or storage.size(join(uri, CHECKPOINT_FILE)) is None:
        raise UserError(f"--checkpoint {uri}: not a checkpoint folder ({META_FILE} and "
                        f"{CHECKPOINT_FILE} expected there)")
    meta = json.loads(storage.read_bytes(join(uri, META_FILE)))
    state = torch.load(io.BytesIO(storage.read_bytes(join(uri, CHECKPOINT_FILE))),
                       map_location="cpu", weights_only=False)
    return meta, state["model"]


def build_eval_model(meta: dict, state: dict):
    from .model import build_model

    model = build_model(meta["arch"], meta["num_classes"], meta.get("blurpool", True))
    model.load_state_dict(state)
    return model.eval()


def _score(version) -> float | None:
    try:
        return float(version.tags[SCORE_TAG])
    except (KeyError, ValueError):
        return None


def best_version(mlflow_client, name: str):
    """The version that should hold @champion: highest val top-1; on a tie the older one stays."""
    versions = [v for v in mlflow_client.search_model_versions(f"name = '{name}'")
                if _score(v) is not None]
    if not versions:
        return None
    return max(versions, key=lambda v: (_score(v), -int(v.version)))


def promote_if_better(mlflow_client, name: str, version: str) -> dict:
    """Give @champion to the new version only if its val top-1 beats the current champion's.

    MLflow has no compare-and-set for aliases, so two registrations racing could each move the
    alias. Each one therefore sets the alias to the best scored version and re-reads until the
    alias and the best agree: whoever writes last writes the same answer, and an alias names
    exactly one version, so there is never more than one champion, nor none.
    """
    from mlflow.exceptions import MlflowException

    try:
        previous = mlflow_client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        previous = None
    new = mlflow_client.get_model_version(name, version)
    decision = CHAMPION if previous is None or _score(new) > (_score(previous) or float("-inf")) \
        else CHALLENGER
    for _ in range(20):
        best = best_version(mlflow_client, name)
        mlflow_client.set_registered_model_alias(name, CHAMPION, best.version)
        time.sleep(0.2)
        if mlflow_client.get_model_version_by_alias(name, CHAMPION).version == \
                best_version(mlflow_client, name).version:
            break
    if decision == CHALLENGER:
        mlflow_client.set_registered_model_alias(name, CHALLENGER, version)
    info = {"decision": decision, "val_top1": _score(new),
            "previous_champion_version": previous.version if previous else None,
            "previous_champion_val_top1": _score(previous) if previous else None}
    for k, v in info.items():
        mlflow_client.set_model_version_tag(name, version, f"pipeline.promotion.{k}", str(v))
    return info


def register(checkpoint: str, model_name: str, storage: Storage | None = None,
             uri: str | None = None, experiment: str = "pipeline-registry",
             extra_tags: dict | None = None) -> dict:
    """Log the checkpoint's model to MLflow, register a new version of model_name, promote."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    storage = storage or Storage()
    uri = tracking_uri(uri)
    mlflow_client = tracking_client(uri)
    meta, state = load_checkpoint(storage, checkpoint)
    model = build_eval_model(meta, state)
    res = meta["preprocessing"]["resolution"]
    # A batch of 2: torch.export then keeps the batch dimension dynamic (a batch of 1 pins it).
    example = np.random.default_rng(0).standard_normal((2, 3, res, res)).astype(np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    data_sha = meta.get("manifest_sha256", "")
    tags = {**lineage_tags(meta.get("data", ""), data_sha, meta.get("trial_id")),
            "pipeline.checkpoint": checkpoint, **(extra_tags or {})}

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp_id = experiment_id(mlflow_client, experiment, uri)
    with tempfile.TemporaryDirectory() as tmp:
        classes, prep = Path(tmp, "classes.json"), Path(tmp, "preprocessing.json")
        classes.write_text(json.dumps(meta["classes"], indent=1))
        prep.write_text(json.dumps(meta["preprocessing"], indent=1))
        torch.save({"model": state, "meta": meta}, Path(tmp, CHECKPOINT_FILE))
        with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{model_name}", tags=tags):
            mlflow.log_params(safe_params({"arch": meta["arch"], "epoch": meta["epoch"],
                                           "num_classes": meta["num_classes"]}))
            mlflow.log_metrics({k: v for k, v in meta.get("metrics", {}).items()
                                if isinstance(v, (int, float)) and v is not None})
            info = mlflow.pytorch.log_model(
                model, name="model", signature=signature, input_example=example,
                extra_files=[str(classes), str(prep), str(Path(tmp, CHECKPOINT_FILE))])
    version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    score = meta.get("metrics", {}).get("val_top1")
    mlflow_client.set_model_version_tag(model_name, version.version, SCORE_TAG, str(score))
    promotion = promote_if_better(mlflow_client, model_name, version.version)
    return {"model_name": model_name, "model_version": str(version.version),
            "alias": promotion["decision"], "model_uri": f"models:/{model_name}/{version.version}",
            **promotion}


def download_registered(model_uri: str, uri: str | None = None) -> Path:
    """Download a registered model (models:/NAME@ALIAS or models:/NAME/VERSION) to a local dir."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    tracking_client(uri)   # reachable?
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not model_uri.startswith("models:/"):
        raise UserError(f"{model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except MlflowException as exc:
        raise UserError(f"{model_uri}: no such registered model, version or alias "
                        f"({str(exc).splitlines()[0][:200]})") from exc


def load_registered_state(model_uri: str, uri: str | None = None) -> dict:
    """The weights of a registered model, for --init-from models:/NAME@ALIAS."""
    import torch

    folder = download_registered(model_uri, uri)
    path = folder / "extra_files" / CHECKPOINT_FILE
    if not path.exists():
        raise UserError(f"{model_uri}: was not registered by `pipeline register` (no weights file)")
    return torch.load(path, map_location="cpu", weights_only=False)["model"]
