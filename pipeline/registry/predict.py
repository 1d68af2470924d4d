"""`pipeline predict`: top classes of images from a registered model, measured as it was scored.

The model is rebuilt from its recorded architecture and its weights (loaded as tensors only),
so nothing in the registry can run code here. Images go through the functions the served model
runs (serving.py), on the evaluation protocol its val top-1 was measured with (resolution, crop
ratio, flip averaging: preprocessing.json). Each image is decoded within the same bound as
staging; one that cannot be read is reported in one line and the others are still predicted.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..data.images import BadImage
from ..errors import UserError
from ..tracking import registered_files
from ..training import checkpoint
from .serving import TOP, classify


def load_registered(model_uri: str, tracking: str | None = None):
    """(model, classes, preprocessing) of a registered model."""
    from .promote import build_eval_model

    files = registered_files(model_uri, tracking)
    try:
        classes = json.loads((files / "classes.json").read_text())
        prep = json.loads((files / "preprocessing.json").read_text())
        weights = checkpoint.load_state((files / checkpoint.CHECKPOINT_FILE).read_bytes(), model_uri)
        arch = json.loads((files / "model.json").read_text()) if (files / "model.json").exists() \
            else weights["meta"]
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{model_uri}: was not registered by `pipeline register` "
                        f"({type(exc).__name__}: {exc})") from exc
    return build_eval_model(arch, weights["model"]), classes, prep


def read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise BadImage("no such image file") from exc
    except OSError as exc:
        raise BadImage(f"cannot read it ({exc.strerror})") from exc


def predict(model_uri: str, images: list[str], tracking: str | None = None, top: int = TOP) -> list[dict]:
    """One entry per image: {"image", "top": [...]} or {"image", "error": why}."""
    model, classes, prep = load_registered(model_uri, tracking)
    out: list[dict] = [{"image": str(path)} for path in images]
    readable: list[tuple[dict, bytes]] = []
    for entry in out:
        try:
            readable.append((entry, read_image(entry["image"])))
        except BadImage as exc:
            entry["error"] = str(exc)
    results = classify(model, [data for _, data in readable], classes, prep, top)
    for (entry, _), result in zip(readable, results):
        if "error" in result:
            entry["error"] = result["error"]
            continue
        entry["top"] = [{**t, "probability": round(t["probability"], 4)} for t in result["top"]]
    return out
