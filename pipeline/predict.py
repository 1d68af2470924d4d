"""`pipeline predict`: top-5 classes of images from a registered model, preprocessed as recorded."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .registry import download_registered


def preprocess(path: str, prep: dict) -> np.ndarray:
    """As validation sees images: centre square of crop_ratio x the short side, resized to the
    recorded resolution (area interpolation, as FFCV's decoder), normalised; CHW float32."""
    import cv2
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError as exc:
        raise UserError(f"{path}: no such image file") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: cannot read it as an image ({exc})") from exc
    h, w = rgb.shape[:2]
    side = int(prep["crop_ratio"] * min(h, w))
    top, left = (h - side) // 2, (w - side) // 2
    res = prep["resolution"]
    crop = cv2.resize(rgb[top:top + side, left:left + side], (res, res), interpolation=cv2.INTER_AREA)
    x = (crop.astype(np.float32) / 255 - np.array(prep["mean"], np.float32)) / np.array(prep["std"], np.float32)
    return x.transpose(2, 0, 1)


def predict(model_uri: str, images: list[str], tracking: str | None = None, top: int = 5) -> list[dict]:
    import mlflow.pytorch
    import torch

    folder = download_registered(model_uri, tracking)
    extra = folder / "extra_files"
    classes = json.loads((extra / "classes.json").read_text())
    prep = json.loads((extra / "preprocessing.json").read_text())
    model = mlflow.pytorch.load_model(str(folder))
    batch = np.stack([preprocess(p, prep) for p in images])
    # the exported graph keeps a dynamic batch only from 2 up: pad a single image
    padded = np.concatenate([batch, batch[:1]]) if len(batch) == 1 else batch
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(padded)).float(), dim=1)[:len(batch)]
    out = []
    for path, p in zip(images, probs):
        values, indices = p.topk(min(top, len(classes)))
        out.append({"image": str(path), "top": [
            {"index": int(i), "wnid": classes[int(i)]["wnid"], "name": classes[int(i)]["name"],
             "probability": round(float(v), 4)} for v, i in zip(values, indices)]})
    return out
