"""What a registered version holds, and how it is logged: an MLflow pyfunc that serves itself.

The model folder holds, under artifacts/:
- model.pt2: the network as a torch.export program (batch dimension dynamic), what serving runs;
- classes.json, preprocessing.json (the evaluation protocol the val top-1 was measured with);
- model.json and checkpoint.pt (architecture and weights as tensors only): what `predict` and
  `train --init-from` rebuild the network from, so that they never run code from the registry;
and code/pipeline_images.py, the image decoder serving.py (the model's code) imports. Versions
registered before the model served itself hold the same JSON files and weights in extra_files/.
"""
from __future__ import annotations

import io
import json
import shutil
from importlib import metadata
from pathlib import Path

from ..data import images
from ..training import checkpoint
from . import serving

PROGRAM = "model.pt2"
# what the pyfunc needs where it is served; the distribution names as pip knows them
SERVING_DISTRIBUTIONS = ("torch", "numpy", "pandas", "pillow", "mlflow",
                         ("opencv-python-headless", "opencv-python", "opencv-contrib-python"))


def evaluation(meta: dict) -> dict:
    """The preprocessing a checkpoint's val top-1 was measured with, lr_tta included. A checkpoint
    written before meta.json recorded lr_tta takes it from its config (what its validation ran
    with); without either it is left out, and the model is served without flip averaging."""
    prep = dict(meta.get("preprocessing") or {})
    if "lr_tta" not in prep:
        lr_tta = ((meta.get("config") or {}).get("recipe") or {}).get("lr_tta")
        if lr_tta is not None:
            prep["lr_tta"] = bool(lr_tta)
    return prep


def example_image() -> bytes:
    """A small JPEG: the input example MLflow stores and checks the model against."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        outputs=Schema([ColSpec(Array(DataType.string), "wnids"),
                        ColSpec(Array(DataType.string), "names"),
                        ColSpec(Array(DataType.double), "probabilities"),
                        ColSpec(DataType.string, "error")]))


def requirements() -> list[str]:
    """Pinned to what is installed here, where the model was exported and checked."""
    out = []
    for names in SERVING_DISTRIBUTIONS:
        for name in (names,) if isinstance(names, str) else names:
            try:
                out.append(f"{name}=={metadata.version(name).split('+')[0]}")
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def export_program(model, resolution: int, path: Path) -> None:
    import torch

    example = torch.zeros(2, 3, resolution, resolution)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def log_model(meta: dict, state: dict, model, folder: Path):
    """Log the served model into the active MLflow run; returns MLflow's ModelInfo."""
    import mlflow
    import pandas as pd
    import torch

    folder = Path(folder)
    files = {"classes": folder / "classes.json", "preprocessing": folder / "preprocessing.json",
             "arch": folder / "model.json", "weights": folder / checkpoint.CHECKPOINT_FILE,
             "program": folder / PROGRAM}
    files["classes"].write_text(json.dumps(meta["classes"], indent=1))
    files["preprocessing"].write_text(json.dumps(evaluation(meta), indent=1))
    files["arch"].write_text(json.dumps({k: meta[k] for k in ("arch", "num_classes", "blurpool")}))
    torch.save({"model": state}, files["weights"])
    export_program(model, meta["preprocessing"]["resolution"], files["program"])
    decoder = folder / "pipeline_images.py"
    shutil.copyfile(images.__file__, decoder)
    return mlflow.pyfunc.log_model(
        name="model", python_model=serving.__file__, artifacts={k: str(v) for k, v in files.items()},
        code_paths=[str(decoder)], signature=signature(),
        input_example=pd.DataFrame({"image": [example_image()]}), pip_requirements=requirements())
