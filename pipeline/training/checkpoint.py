"""The checkpoint format, and the only code that reads or writes it.

A checkpoint is a folder: `checkpoint.pt` (tensors and plain values only: weights, optimizer and
scaler state, epoch, the world size that wrote it), `meta.json` (what a reader needs without
torch: arch, classes, preprocessing, metrics, lineage) and one `rng-RANK.pt` per rank, written by
that rank (its RNG state: nothing of it travels between ranks, and checkpoint.pt is the same size
on 8 ranks and on 2,048). It is loaded with `torch.load(weights_only=True)`,
so a file that holds pickled objects (anyone who can write the runs bucket could plant one) is
refused in words instead of running code on every node and in `predict`.
"""
from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..data.loaders import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from ..storage import Storage, join

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"


def rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


# -- RNG state as plain values ---------------------------------------------------------------------
def rng_state() -> dict:
    """This process's random state (torch CPU and CUDA, numpy, Python) as tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": {"version": int(version), "internal": list(internal),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# -- reading and writing -----------------------------------------------------------------------------
def load_state(data: bytes | str | Path, where: str) -> dict:
    """A checkpoint.pt's contents, refusing anything but tensors and plain values."""
    import pickle

    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{where}: refused: it holds pickled Python objects, not just tensors and "
                        "plain values (a checkpoint this pipeline writes never does); loading it "
                        "could run code. Use a checkpoint written by `pipeline train`") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{where}: not a readable checkpoint ({str(exc).splitlines()[0][:160]})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{where}: not a checkpoint of this pipeline (no model weights in it)")
    return state


def save(folder: str | Path, *, model: dict, optimizer: dict, scaler: dict, epoch: int,
         meta: dict, cursor: dict | None = None, epoch_samples: list[dict] | None = None,
         world_size: int = 0, rng: list[dict] | None = None) -> None:
    """Write a checkpoint folder: `epoch` epochs are complete; `cursor` (placement.Cursor as a
    dict) says where the epoch in progress stands when the checkpoint is taken inside it;
    `epoch_samples` what each completed epoch read (count and digest); `world_size` the ranks
    that each write their RNG state beside it (save_rng). `rng` (every rank's state in one list,
    as checkpoints before per-rank files held them) only for a caller without ranks."""
    weights = os.path.join(folder, CHECKPOINT_FILE)
    torch.save({"model": model, "optimizer": optimizer, "scaler": scaler, "epoch": epoch,
                "world_size": world_size, **({"rng": rng} if rng else {}),
                "cursor": json.dumps(cursor) if cursor else "",
                "epoch_samples": json.dumps(epoch_samples or [])}, weights)
    # the weights file's size: a copy cut short (Ray copies straight to the final name on a
    # local or NFS path; a node killed mid-copy) is then told from a complete one (complete)
    meta = {**meta, "checkpoint_bytes": os.path.getsize(weights)}
    Path(folder, META_FILE).write_text(json.dumps(meta, indent=1))


def save_rng(folder: str | Path, rank: int, state: dict) -> None:
    """This rank's RNG state, in its own file of the checkpoint folder."""
    torch.save(state, os.path.join(folder, rng_file(rank)))


def load_rng(storage: Storage, uri: str, state: dict, rank: int, world: int) -> dict | None:
    """This rank's RNG state from the checkpoint at `uri` (whose checkpoint.pt is `state`), or
    None where it has none for it: written by another world size (a resized run re-seeds each
    rank), or its file is missing. Older checkpoints held every rank's in checkpoint.pt."""
    every = state.get("rng") or []
    if every:
        return every[rank] if len(every) == world else None
    if int(state.get("world_size") or 0) != world:
        return None
    path = join(uri, rng_file(rank))
    if storage.size(path) is None:
        return None
    try:
        return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu",
                          weights_only=True)
    except Exception:   # a damaged RNG file costs the rank its exact random stream, no more
        return None


def read_meta(storage: Storage, uri: str) -> dict:
    try:
        return json.loads(storage.read_bytes(join(uri, META_FILE)))
    except ValueError as exc:
        raise UserError(f"{join(uri, META_FILE)}: not valid JSON ({exc})") from exc


def load(storage: Storage, uri: str) -> tuple[dict, dict]:
    """(meta, state) of a checkpoint folder, local or S3."""
    if storage.size(join(uri, META_FILE)) is None or storage.size(join(uri, CHECKPOINT_FILE)) is None:
        raise UserError(f"{uri}: not a checkpoint folder ({META_FILE} and {CHECKPOINT_FILE} "
                        "expected there)")
    meta = read_meta(storage, uri)
    if not complete(meta, storage.size(join(uri, CHECKPOINT_FILE))):
        raise UserError(f"{join(uri, CHECKPOINT_FILE)}: {storage.size(join(uri, CHECKPOINT_FILE))} "
                        f"bytes where its {META_FILE} says {meta['checkpoint_bytes']}: a copy cut "
                        "short; use another checkpoint of the run")
    state = load_state(storage.read_bytes(join(uri, CHECKPOINT_FILE)), join(uri, CHECKPOINT_FILE))
    return meta, state


def complete(meta: dict, weights_bytes: int | None) -> bool:
    """Whether a checkpoint's weights file has the size its meta recorded (checkpoints written
    before that was recorded are taken as they are)."""
    want = meta.get("checkpoint_bytes")
    return bool(weights_bytes) and (want is None or int(want) == weights_bytes)


def position(meta: dict) -> tuple[int, int]:
    """Where a checkpoint stands: (epochs done, steps into the next)."""
    return int(meta.get("epoch", 0)), int((meta.get("cursor") or {}).get("steps", 0))


def furthest(storage: Storage, run_dir: str, given: str | None) -> str | None:
    """The checkpoint folder of this run to resume from: the furthest complete one (its meta
    and its weights file there, of the size the meta recorded) among `given` (the latest Ray recorded) and those on storage.
    A checkpoint is on storage once its report returned, but Ray records it only when its
    controller next hears from every worker: a node that dies in between would otherwise cost
    the steps since the checkpoint before."""
    folders: dict[str, dict[str, int]] = {}
    for rel, size in storage.list(run_dir):
        folder, _, name = rel.rpartition("/")
        if size and name in (META_FILE, CHECKPOINT_FILE) and "/" not in folder:
            folders.setdefault(folder, {})[name] = size
    best, where = None, None
    for folder, sizes in folders.items():
        if set(sizes) != {META_FILE, CHECKPOINT_FILE}:
            continue
        uri = join(run_dir, folder)
        try:
            meta = read_meta(storage, uri)
        except (UserError, OSError):
            continue
        if not complete(meta, sizes[CHECKPOINT_FILE]):   # torn: the one before it is kept
            continue
        if best is None or position(meta) > best:
            best, where = position(meta), uri
    if given is not None:
        try:
            meta = read_meta(storage, given)
            if complete(meta, storage.size(join(given, CHECKPOINT_FILE))) and \
                    (best is None or position(meta) >= best):
                return given
        except (UserError, OSError):
            pass
    return where


def init_weights(storage: Storage, uri: str, tracking_uri: str | None = None) -> dict:
    """Weights to fine-tune from: a checkpoint folder or checkpoint.pt (local or S3), or a
    registered model (models:/NAME@ALIAS), which carries its weights (tracking.registered_files)."""
    if uri.startswith("models:/"):
        from ..tracking import registered_files

        path = registered_files(uri, tracking_uri) / CHECKPOINT_FILE
        if not path.exists():
            raise UserError(f"{uri}: was not registered by `pipeline register` (no weights file)")
        return load_state(path.read_bytes(), uri)["model"]
    path = uri if uri.endswith(".pt") else join(uri, CHECKPOINT_FILE)
    if storage.size(path) is None:
        raise UserError(f"--init-from {uri}: no {CHECKPOINT_FILE} there")
    return load_state(storage.read_bytes(path), path)["model"]


def meta(cfg, classes: list[dict], epoch: int, metrics: dict, lineage: dict | None = None) -> dict:
    """What a checkpoint says about itself: enough to rebuild, serve and trace the model."""
    r = cfg.recipe
    return {"arch": r.arch, "blurpool": r.blurpool, "num_classes": len(classes),
            "classes": classes, "epoch": epoch, "metrics": metrics,
            # the evaluation protocol its val top-1 was measured with (predict and serving apply
            # it; only scores measured alike are compared for @champion)
            "preprocessing": {"resolution": r.val_res, "crop_ratio": CROP_RATIO, "lr_tta": r.lr_tta,
                              "mean": (IMAGENET_MEAN / 255).tolist(),
                              "std": (IMAGENET_STD / 255).tolist()},
            "data": cfg.data, "config": cfg.model_dump(), **(lineage or {})}
