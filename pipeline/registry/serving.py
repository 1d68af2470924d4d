"""The registered model as it serves: encoded images in, top-5 classes out, measured as it was scored.

MLflow loads this file from the registered model's own folder (a model from code), where this
package may not be installed: it needs numpy, Pillow, OpenCV, torch, pandas and mlflow, and the
image decoder logged beside it (code/pipeline_images.py, a copy of pipeline/data/images.py). The
network is the model's torch.export program (model.pt2), so nothing of this package rebuilds it.
`pipeline predict` runs the same functions on the same protocol, so a served answer and a
predicted one agree.

The protocol is the one the model's val top-1 was measured with (preprocessing.json): the centre
square of crop_ratio x the short side, resized to `resolution` with area interpolation (as FFCV's
CenterCropRGBImageDecoder in validation), normalised, and with lr_tta the logits of the image
and its left-right mirror averaged.
"""
from __future__ import annotations

import json

import numpy as np

if __package__:   # imported as pipeline.registry.serving (predict, register)
    from ..data.images import DEFAULT_MAX_PIXELS, BadImage, open_rgb
else:             # loaded by MLflow from the model's folder: the decoder logged with it (code/)
    try:
        from pipeline_images import DEFAULT_MAX_PIXELS, BadImage, open_rgb
    except ImportError:   # MLflow runs this file once while saving, before code/ is on the path
        from pipeline.data.images import DEFAULT_MAX_PIXELS, BadImage, open_rgb

MIN_SIDE = 8          # below this a centre crop holds no picture to classify
TOP = 5
BATCH = 32            # images per forward pass: bounds a request's memory
COLUMNS = ("wnids", "names", "probabilities", "error")


def preprocess(data: bytes, prep: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes as validation saw them: CHW float32 (BadImage when they cannot be)."""
    import cv2

    rgb = np.asarray(open_rgb(bytes(data), max_pixels))
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise BadImage(f"{w}x{h} pixels is too small to classify (needs at least {MIN_SIDE} px "
                       "on the short side)")
    side = max(1, int(prep["crop_ratio"] * min(h, w)))
    top, left = (h - side) // 2, (w - side) // 2
    res = prep["resolution"]
    crop = cv2.resize(rgb[top:top + side, left:left + side], (res, res), interpolation=cv2.INTER_AREA)
    x = (crop.astype(np.float32) / 255 - np.array(prep["mean"], np.float32)) / np.array(prep["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def probabilities(model, batch: np.ndarray, lr_tta: bool):
    """Softmax over the classes; with lr_tta over the mean logits of the batch and its mirror
    (what the validation loop scored)."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(batch)
        logits = model(x)
        if lr_tta:
            logits = (logits + model(torch.flip(x, dims=[3]))) / 2
        return torch.softmax(logits.float(), dim=1)


def top_classes(probs, classes: list[dict], top: int = TOP) -> list[dict]:
    """The top classes of one image's probabilities, most likely first."""
    values, indices = probs.topk(min(top, len(classes)))
    return [{"index": int(i), "wnid": classes[int(i)]["wnid"], "name": classes[int(i)].get("name", ""),
             "probability": float(v)} for v, i in zip(values, indices)]


def classify(model, images: list[bytes], classes: list[dict], prep: dict, top: int = TOP) -> list[dict]:
    """Per image {"top": [...]} or {"error": why}; a bad image never fails the others."""
    out: list[dict] = []
    ready: list[tuple[int, np.ndarray]] = []
    for data in images:
        try:
            ready.append((len(out), preprocess(data, prep)))
            out.append({})
        except BadImage as exc:
            out.append({"error": str(exc)})
    for start in range(0, len(ready), BATCH):
        chunk = ready[start:start + BATCH]
        probs = probabilities(model, np.stack([x for _, x in chunk]), bool(prep.get("lr_tta")))
        for (i, _), p in zip(chunk, probs):
            out[i]["top"] = top_classes(p, classes, top)
    return out


class ImageClassifier:
    """The pyfunc: a DataFrame with a column `image` of encoded JPEG/PNG bytes in; per image
    the top-5 wnids (top-1 first), their names and probabilities, and an error ('' when none)."""

    def load_context(self, context):
        import torch

        with open(context.artifacts["classes"]) as f:
            self.classes = json.load(f)
        with open(context.artifacts["preprocessing"]) as f:
            self.prep = json.load(f)
        self.model = torch.export.load(context.artifacts["program"]).module()

    def predict(self, context, model_input, params=None):
        import pandas as pd

        if "image" not in getattr(model_input, "columns", ()):
            raise ValueError("expected a column 'image' of encoded JPEG or PNG bytes")
        rows = []
        for r in classify(self.model, list(model_input["image"]), self.classes, self.prep):
            top = r.get("top", [])
            rows.append({"wnids": [t["wnid"] for t in top], "names": [t["name"] for t in top],
                         "probabilities": [t["probability"] for t in top], "error": r.get("error", "")})
        return pd.DataFrame(rows, columns=list(COLUMNS))


if not __package__:
    import mlflow

    class ServedImageClassifier(ImageClassifier, mlflow.pyfunc.PythonModel):
        """What MLflow loads (predict imports this module without the pyfunc class)."""

    mlflow.models.set_model(ServedImageClassifier())
