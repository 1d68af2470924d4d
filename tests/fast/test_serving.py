"""The served model and `predict`: the evaluation protocol the score was measured with (resolution,
centre crop ratio, flip averaging), encoded images in, top-5 classes out."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.registry import packaging, serving

PREP = {"resolution": 16, "crop_ratio": 0.5, "lr_tta": False, "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0]}


def encoded(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def framed(h=60, w=100) -> np.ndarray:
    """Blue, with a red square of side h/2 in the centre."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 2] = 255
    rgb[h // 4:h // 4 + h // 2, w // 2 - h // 4:w // 2 + h // 4] = (255, 0, 0)
    return rgb


def test_the_centre_crop_and_resolution_are_the_recorded_ones():
    x = serving.preprocess(encoded(framed()), PREP)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    assert np.allclose(x[0], 1.0) and np.allclose(x[2], 0.0)      # crop 0.5: only the red square
    wide = serving.preprocess(encoded(framed()), {**PREP, "crop_ratio": 1.0, "resolution": 24})
    assert wide.shape == (3, 24, 24) and wide[2].max() == 1.0     # the whole short side: blue too
    norm = serving.preprocess(encoded(framed()), {**PREP, "mean": [0.5] * 3, "std": [0.25] * 3})
    assert np.allclose(norm[0], 2.0)


class LeftRight(torch.nn.Module):
    """Logits: the mean brightness of each image's left half, and of its right half."""

    def forward(self, x):
        half = x.shape[3] // 2
        return torch.stack([x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))], dim=1) * 10


def left_bright() -> bytes:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = 255
    return encoded(rgb)


CLASSES = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(7)]


def test_flip_averaging_is_applied_when_the_score_was_measured_with_it():
    plain = serving.classify(LeftRight(), [left_bright()], CLASSES[:2], {**PREP, "crop_ratio": 1.0})
    assert plain[0]["top"][0]["wnid"] == "n00000000" and plain[0]["top"][0]["probability"] > 0.99
    tta = serving.classify(LeftRight(), [left_bright()], CLASSES[:2],
                           {**PREP, "crop_ratio": 1.0, "lr_tta": True})
    assert [t["probability"] for t in tta[0]["top"]] == pytest.approx([0.5, 0.5])


def test_a_bad_image_is_answered_in_words_and_the_others_still_are():
    images = [left_bright(), b"not an image", encoded(np.zeros((4, 40, 3))), left_bright()] * 20
    out = serving.classify(LeftRight(), images, CLASSES[:2], {**PREP, "crop_ratio": 1.0})
    assert len(out) == 80   # more than one forward batch (serving.BATCH)
    assert all("top" in r for r in out[0::4]) and all("top" in r for r in out[3::4])
    assert all("not an image" in r["error"] for r in out[1::4])
    assert all("too small to classify" in r["error"] for r in out[2::4])


class Seven(torch.nn.Module):
    def forward(self, x):
        return x.mean((1, 2, 3))[:, None] * torch.arange(7.0)[None]


def test_the_pyfunc_answers_a_column_of_encoded_images_with_the_top_5(tmp_path):
    import json

    program = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(Seven(), (torch.ones(2, 3, 16, 16),),
                                          dynamic_shapes=({0: batch},)), str(program))
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    (tmp_path / "prep.json").write_text(json.dumps({**PREP, "lr_tta": True}))
    model = serving.ImageClassifier()
    model.load_context(SimpleNamespace(artifacts={
        "program": str(program), "classes": str(tmp_path / "classes.json"),
        "preprocessing": str(tmp_path / "prep.json")}))
    bright = encoded(np.full((20, 20, 3), 200), "JPEG")
    out = model.predict(None, pd.DataFrame({"image": [bright, b"junk"]}))
    assert list(out.columns) == ["wnids", "names", "probabilities", "error"]
    first = out.iloc[0]
    assert first["wnids"] == [f"n{i:08d}" for i in (6, 5, 4, 3, 2)]   # top-1 first, five of seven
    assert first["names"][0] == "class 6" and first["error"] == ""
    assert first["probabilities"] == sorted(first["probabilities"], reverse=True)
    assert out.iloc[1]["wnids"] == [] and "not an image" in out.iloc[1]["error"]
    with pytest.raises(ValueError, match="column 'image'"):
        model.predict(None, pd.DataFrame({"img": [bright]}))


def test_the_model_code_loads_where_this_package_is_not_installed(tmp_path):
    """As MLflow loads a model from code: serving.py run as a module of its own, the decoder's
    copy (code/pipeline_images.py) on the path, and a `pipeline` that refuses to import."""
    import os
    import shutil
    import subprocess
    import sys

    from pipeline.data import images

    code = tmp_path / "code"
    code.mkdir()
    shutil.copyfile(images.__file__, code / "pipeline_images.py")
    shadow = tmp_path / "shadow" / "pipeline"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the served model must not need pipeline')\n")
    script = ("import importlib.util, sys\n"
              "spec = importlib.util.spec_from_file_location('code_model_x', sys.argv[1])\n"
              "module = importlib.util.module_from_spec(spec)\n"
              "spec.loader.exec_module(module)\n"
              "import mlflow\n"
              "print(type(mlflow.models.model.__mlflow_model__).__name__)\n")
    out = subprocess.run([sys.executable, "-c", script, serving.__file__], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": f"{shadow.parent}:{code}"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ServedImageClassifier"


def test_the_signature_and_example_say_images_in_classes_out():
    sig = packaging.signature()
    assert [(c.name, str(c.type)) for c in sig.inputs.inputs] == [("image", "DataType.binary")]
    assert [c.name for c in sig.outputs.inputs] == ["wnids", "names", "probabilities", "error"]
    assert Image.open(io.BytesIO(packaging.example_image())).format == "JPEG"
    names = [r.split("==")[0] for r in packaging.requirements()]
    assert {"torch", "numpy", "pandas", "pillow", "mlflow"} <= set(names)
    assert any(n.startswith("opencv") for n in names)


def test_the_protocol_of_older_checkpoints_comes_from_their_config():
    meta = {"preprocessing": {"resolution": 32, "crop_ratio": 0.875},
            "config": {"recipe": {"lr_tta": True}}}
    assert packaging.evaluation(meta)["lr_tta"] is True
    assert "lr_tta" not in packaging.evaluation({"preprocessing": {"resolution": 32}})
    recorded = {"preprocessing": {"resolution": 32, "lr_tta": False}, "config": {"recipe": {"lr_tta": True}}}
    assert packaging.evaluation(recorded)["lr_tta"] is False
