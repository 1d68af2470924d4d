"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

import colorsys
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.storage import Storage

PIPELINE = str(Path(sys.executable).parent / "pipeline")


def upload_tree(storage: Storage, local: str, uri: str) -> None:
    for rel, _ in Storage().list(local):
        storage.upload_file(os.path.join(local, rel), f"{uri.rstrip('/')}/{rel}")


def run_cli(*args, env: dict | None = None, timeout: float = 600, check: bool = True):
    """Run the installed `pipeline` command; return the CompletedProcess."""
    full_env = dict(os.environ, TQDM_DISABLE="1", **(env or {}))
    proc = subprocess.run([PIPELINE, *map(str, args)], env=full_env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def read_shard(path: str, res: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of one .beton through an FFCV Loader: (N x res x res x 3 uint8, N labels)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(path, batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((res, res), ratio=224 / 256),
                                         ToTensor()],
                               "label": [IntDecoder(), ToTensor()]})
    images, labels = [], []
    for x, y in loader:
        images.append(x.numpy().copy())   # FFCV reuses batch memory: copy what is kept
        labels.append(y.numpy().reshape(-1).copy())
    return np.concatenate(images), np.concatenate(labels)


def class_from_colour(image: np.ndarray, n_classes: int) -> int:
    """Sample-data images carry their class as hue (see pipeline.sample_data.class_image)."""
    r, g, b = image.reshape(-1, 3).mean(0) / 255
    h, _, _ = colorsys.rgb_to_hsv(r, g, b)
    return int(round(h * n_classes)) % n_classes


def mlflow_client(uri: str):
    """A client for exactly this store: without registry_uri, MlflowClient falls back to the
    process-wide registry URI, which in-process registrations in other tests may have set."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)
