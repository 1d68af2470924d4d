"""`pipeline sample-data`: a small, learnable ImageNet look-alike in the real on-disk layouts.

Each class has its own colour and stripe orientation (learnable by a tiny ResNet in a couple of
epochs at 32-64 px); sizes are ImageNet-like (160-500 px sides, varied aspect). WordNet ids and
names are real ones. `bad_files` adds what real ImageNet contains: a PNG named .JPEG, a CMYK JPEG,
a greyscale JPEG, plus a truncated JPEG and an empty file that staging must skip and record.
"""
from __future__ import annotations

import colorsys
import csv
import gzip
import io
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UserError
from .source import (DEVKIT, DEVKIT_TAR, GROUND_TRUTH, KAGGLE_ROOT, KAGGLE_SYNSETS,
                              KAGGLE_VAL_CSV, LAYOUTS, META_MAT, TRAIN_TAR, VAL_TAR,
                              known_class_names)
from ..storage import Storage, is_s3, join

# The bad files and whether staging keeps them (converted to RGB) or skips them.
BAD_FILES = {"png": True, "cmyk": True, "grey": True, "truncated": False, "empty": False}


def pick_classes(n: int) -> list[str]:
    """n real wnids spread over the 1,000 (so names vary), in sorted order."""
    wnids = sorted(known_class_names())
    if not 1 <= n <= len(wnids):
        raise UserError(f"--classes must be between 1 and {len(wnids)}")
    return [wnids[(i * len(wnids)) // n] for i in range(n)]


def class_image(rng: np.random.Generator, index: int, n_classes: int,
                max_side: int = 500) -> np.ndarray:
    """An RGB uint8 image whose colour and stripe angle say its class; sides from 160 px (or
    max_side / 3 when smaller) to max_side."""
    h, w = (int(x) for x in rng.integers(min(160, max(1, max_side // 3)), max_side + 1, size=2))
    r, g, b = colorsys.hsv_to_rgb(index / n_classes, 0.85, 0.95)
    base = np.array([r, g, b], dtype=np.float32) * 255
    angle = np.pi * ((index * 7) % n_classes) / n_classes
    period = 10 + (index % 3) * 8
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + phase)
    img = base * (0.55 + 0.45 * stripes)[..., None]
    img += rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    img *= rng.uniform(0.8, 1.15)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(img: np.ndarray, mode: str = "RGB", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def bad_file_bytes(kind: str, img: np.ndarray) -> bytes:
    if kind == "png":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue()
    if kind == "cmyk":
        return jpeg_bytes(img, "CMYK")
    if kind == "grey":
        return jpeg_bytes(img, "L")
    if kind == "truncated":
        data = jpeg_bytes(img)
        return data[: len(data) // 2]
    if kind == "empty":
        return b""
    raise ValueError(kind)


def meta_mat_bytes(wnids: list[str], ids: dict[str, int], names: dict[str, str]) -> bytes:
    """A devkit meta.mat: leaf synsets get ILSVRC2012_IDs that are not in wnid order (as in the
    real devkit), and one inner WordNet node with children is included as well."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    rows = [(ids[w], w, names.get(w, w), "", 0, np.zeros(0), 0, 0) for w in wnids]
    rows.append((len(wnids) + 1, "n00001740", "entity", "", len(wnids),
                 np.array([ids[w] for w in wnids], dtype=float), 1, 0))
    synsets = np.zeros((len(rows),), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i] = row
    buf = io.BytesIO()
    savemat(buf, {"synsets": synsets})
    # the 116-byte text header says when it was written; fixed, so a seed gives the same bytes
    return b"MATLAB 5.0 MAT-file, written by pipeline sample-data".ljust(116) + buf.getvalue()[116:]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_340_000_000  # fixed: the same options give the same archive bytes
    tar.addfile(info, io.BytesIO(data))


def generate(out: str, layout: str = "folders", classes: int = 10, train_per_class: int = 20,
             val_per_class: int = 5, seed: int = 0, bad_files: bool = False,
             storage: Storage | None = None, max_side: int = 500) -> dict:
    """Write the sample set to OUT (a folder, or s3://bucket/prefix via a temporary folder).
    A small max_side makes small images: e.g. 1,000 classes shaped like ImageNet's archives
    (1,000 class tars) at a fraction of their bytes."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout: unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")
    if train_per_class < 1 or val_per_class < 0:
        raise UserError("--train-per-class must be >= 1 and --val-per-class >= 0")
    if is_s3(out):
        storage = storage or Storage()
        storage.check_bucket(out)
        with tempfile.TemporaryDirectory() as tmp:
            summary = generate(tmp, layout, classes, train_per_class, val_per_class, seed, bad_files,
                               max_side=max_side)
            for rel, _ in Storage().list(tmp):
                storage.upload_file(os.path.join(tmp, rel), join(out, rel))
        return {**summary, "out": out}

    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new folder")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wnids = pick_classes(classes)
    names = known_class_names()

    train: dict[str, list[tuple[str, bytes]]] = {w: [] for w in wnids}
    for c, wnid in enumerate(wnids):
        numbers = sorted(rng.choice(np.arange(1, 20000), size=train_per_class, replace=False))
        for n in numbers:
            image = class_image(rng, c, classes, max_side)
            train[wnid].append((f"{wnid}_{n}.JPEG", jpeg_bytes(image)))
    if bad_files:
        for i, kind in enumerate(BAD_FILES):
            c = i % classes
            wnid = wnids[c]
            train[wnid].append((f"{wnid}_9{i:04d}{kind}.JPEG",
                                bad_file_bytes(kind, class_image(rng, c, classes, max_side))))

    val = [(wnid, c) for c, wnid in enumerate(wnids) for _ in range(val_per_class)]
    order = rng.permutation(len(val))
    val_files = []  # (number, wnid, bytes): numbered like the real flat val set
    for number, k in enumerate(order, start=1):
        wnid, c = val[k]
        val_files.append((number, wnid, jpeg_bytes(class_image(rng, c, classes, max_side))))
    val_name = "ILSVRC2012_val_{:08d}.JPEG".format

    def write(rel: str, data: bytes):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    if layout in ("folders", "devkit", "kaggle"):
        base = f"{KAGGLE_ROOT}/" if layout == "kaggle" else ""
        for wnid, files in train.items():
            for name, data in files:
                write(f"{base}train/{wnid}/{name}", data)
        for number, wnid, data in val_files:
            sub = f"{wnid}/" if layout == "folders" else ""
            write(f"{base}val/{sub}{val_name(number)}", data)
    if layout == "kaggle":
        with open(root / KAGGLE_VAL_CSV, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            for number, wnid, _ in val_files:
                w.writerow([val_name(number)[:-5], f"{wnid} 0 0 100 100"])
        (root / KAGGLE_SYNSETS).write_text("".join(f"{w} {names[w]}\n" for w in wnids))

    if layout in ("devkit", "tars"):
        ids = {w: i + 1 for i, w in enumerate(rng.permutation(wnids))}
        meta = meta_mat_bytes(wnids, ids, names)
        gt = "".join(f"{ids[wnid]}\n" for _, wnid, _ in val_files)
        if layout == "devkit":
            write(f"{DEVKIT}/{GROUND_TRUTH}", gt.encode())
            write(f"{DEVKIT}/{META_MAT}", meta)
        else:
            buf = io.BytesIO()
            # gzip stamps the current time into its header unless told otherwise
            with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
                    tarfile.open(fileobj=gz, mode="w") as tar:
                _add_bytes(tar, f"{DEVKIT}/{GROUND_TRUTH}", gt.encode())
                _add_bytes(tar, f"{DEVKIT}/{META_MAT}", meta)
            write(DEVKIT_TAR, buf.getvalue())

    if layout == "tars":
        with tarfile.open(root / TRAIN_TAR, "w") as outer:
            for wnid, files in train.items():
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w") as t:
                    for name, data in files:
                        _add_bytes(t, name, data)
                _add_bytes(outer, f"{wnid}.tar", inner.getvalue())
        with tarfile.open(root / VAL_TAR, "w") as t:
            for number, _, data in val_files:
                _add_bytes(t, val_name(number), data)

    return {"out": out, "layout": layout, "classes": wnids,
            "train_images": classes * train_per_class + (len(BAD_FILES) if bad_files else 0),
            "val_images": len(val_files),
            "bad_files": sorted(BAD_FILES) if bad_files else []}
