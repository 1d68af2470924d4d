"""`pipeline predict`: top classes of images from a registered model, preprocessed as recorded.

The model is rebuilt from its recorded architecture and its weights (loaded as tensors only),
so nothing in the registry can run code here. Each image is decoded within the same bound as
staging; one that cannot be read is reported in one line and the others are still predicted.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.images import DEFAULT_MAX_PIXELS, BadImage, open_rgb
from ..errors import UserError
from ..tracking import download_model
from ..training import checkpoint

MIN_SIDE = 8   # below this a centre crop holds no picture to classify


def preprocess(path: str, prep: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """As validation sees images: centre square of crop_ratio x the short side, resized to the
    recorded resolution (area interpolation, as FFCV's decoder), normalised; CHW float32."""
    import cv2

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise BadImage("no such image file") from exc
    except OSError as exc:
        raise BadImage(f"cannot read it ({exc.strerror})") from exc
    rgb = np.asarray(open_rgb(data, max_pixels))
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise BadImage(f"{w}x{h} pixels is too small to classify (needs at least {MIN_SIDE} px "
                       "on the short side)")
    side = max(1, int(prep["crop_ratio"] * min(h, w)))
    top, left = (h - side) // 2, (w - side) // 2
    res = prep["resolution"]
    crop = cv2.resize(rgb[top:top + side, left:left + side], (res, res), interpolation=cv2.INTER_AREA)
    x = (crop.astype(np.float32) / 255 - np.array(prep["mean"], np.float32)) / np.array(prep["std"], np.float32)
    return x.transpose(2, 0, 1)


def load_registered(model_uri: str, tracking: str | None = None):
    """(model, classes, preprocessing) of a registered model."""
    from .promote import build_eval_model

    extra = download_model(model_uri, tracking) / "extra_files"
    try:
        classes = json.loads((extra / "classes.json").read_text())
        prep = json.loads((extra / "preprocessing.json").read_text())
        weights = checkpoint.load_state((extra / checkpoint.CHECKPOINT_FILE).read_bytes(), model_uri)
        arch = json.loads((extra / "model.json").read_text()) if (extra / "model.json").exists() \
            else weights["meta"]
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{model_uri}: was not registered by `pipeline register` "
                        f"({type(exc).__name__}: {exc})") from exc
    return build_eval_model(arch, weights["model"]), classes, prep


def predict(model_uri: str, images: list[str], tracking: str | None = None, top: int = 5) -> list[dict]:
    """One entry per image: {"image", "top": [...]} or {"image", "error": why}."""
    import torch

    model, classes, prep = load_registered(model_uri, tracking)
    out: list[dict] = []
    inputs = []
    for path in images:
        try:
            inputs.append(preprocess(path, prep))
            out.append({"image": str(path)})
        except BadImage as exc:
            out.append({"image": str(path), "error": str(exc)})
    if inputs:
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(np.stack(inputs))).float(), dim=1)
        ok = (entry for entry in out if "error" not in entry)
        for entry, p in zip(ok, probs):
            values, indices = p.topk(min(top, len(classes)))
            entry["top"] = [{"index": int(i), "wnid": classes[int(i)]["wnid"],
                             "name": classes[int(i)]["name"], "probability": round(float(v), 4)}
                            for v, i in zip(values, indices)]
    return out
