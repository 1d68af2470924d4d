"""manifest.json: what a staged dataset holds. Written last; no manifest means not staged.

A manifest may come from someone else's bucket: it is checked on every read, before anything is
downloaded (shard paths stay inside their split's folder, counts and sizes add up), so a crafted
one cannot make a node write outside its cache or train on a half-described dataset.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import BaseModel, Field

from ..config import WriterSettings
from ..errors import UserError
from ..storage import Storage, join

FORMAT = "ffcv-shards/1"
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.beton")
SHA256 = re.compile(r"[0-9a-f]{64}")


class ClassInfo(BaseModel):
    index: int
    wnid: str
    name: str = ""


class ShardInfo(BaseModel):
    path: str          # relative to the dataset root
    samples: int
    bytes: int
    sha256: str


class SplitInfo(BaseModel):
    samples: int = 0
    shards: list[ShardInfo] = Field(default_factory=list)


class ShardManifest(BaseModel):
    format: str = FORMAT
    classes: list[ClassInfo]
    splits: dict[str, SplitInfo]
    writer: WriterSettings
    source: dict[str, Any]
    skipped: list[dict[str, str]] = Field(default_factory=list)
    plan: str = ""     # sha256 of the shard plan: same source + settings <=> same plan

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=1, sort_keys=False) + "\n"

    def val_set_digest(self) -> str:
        """What a val top-1 was measured on: the val shards and the class list. Two models are
        compared by their scores only when this and the evaluation protocol are the same
        (registry.promote.comparability_key)."""
        val = self.splits.get("val", SplitInfo())
        ident = json.dumps([[c.wnid for c in self.classes], [s.sha256 for s in val.shards]])
        return hashlib.sha256(ident.encode()).hexdigest()


def problems(manifest: ShardManifest) -> list[str]:
    """What is wrong with a manifest, in words (empty when it is sound)."""
    out = []
    if manifest.format != FORMAT:
        out.append(f"format '{manifest.format}' is not supported (expected {FORMAT})")
    if not manifest.classes:
        out.append("classes: empty")
    for i, c in enumerate(manifest.classes):
        if c.index != i:
            out.append(f"classes[{i}]: index {c.index}, expected {i}")
            break
    wnids = [c.wnid for c in manifest.classes]
    if len(set(wnids)) != len(wnids):
        out.append("classes: the same wnid twice")
    seen = set()
    for split, info in manifest.splits.items():
        if split not in ("train", "val"):
            out.append(f"splits: unknown split '{split}'")
            continue
        for j, shard in enumerate(info.shards):
            where = f"splits.{split}.shards[{j}]"
            folder, _, name = shard.path.partition("/")
            if folder != split or not SHARD_NAME.fullmatch(name):
                out.append(f"{where}.path '{shard.path}': expected {split}/<name>.beton "
                           "(no other folder, no '..', no absolute path)")
            if shard.path in seen:
                out.append(f"{where}.path '{shard.path}': listed twice")
            seen.add(shard.path)
            if shard.samples < 1 or shard.bytes < 1:
                out.append(f"{where}: samples and bytes must be positive")
            if not SHA256.fullmatch(shard.sha256):
                out.append(f"{where}.sha256: not a sha256 hex digest")
        total = sum(s.samples for s in info.shards)
        if total != info.samples:
            out.append(f"splits.{split}.samples is {info.samples} but its shards hold {total}")
    return out


def manifest_sha256(storage: Storage, data_uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(join(data_uri, MANIFEST))).hexdigest()


def read_manifest(storage: Storage, data_uri: str) -> ShardManifest:
    """Load DATA/manifest.json, refusing anything that is not a completely and soundly staged
    dataset."""
    uri = join(data_uri, MANIFEST)
    if storage.size(uri) is None:
        raise UserError(f"{data_uri} is not a staged dataset: {MANIFEST} is missing (staging never "
                        "finished, or the path is wrong); run `pipeline stage` to (re)stage it")
    try:
        manifest = ShardManifest.model_validate_json(storage.read_bytes(uri))
    except ValueError as exc:
        raise UserError(f"{uri}: not a valid manifest ({str(exc).splitlines()[0]})") from exc
    wrong = problems(manifest)
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise UserError(f"{uri}: refused, {wrong[0]}{more}; re-stage the dataset with `pipeline "
                        "stage`, or check where this manifest came from")
    return manifest
