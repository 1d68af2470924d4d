"""manifest.json: what a staged dataset holds. Written last; no manifest means not staged."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field

from .errors import UserError
from .storage import Storage, join

FORMAT = "ffcv-shards/1"
MANIFEST = "manifest.json"


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


class WriterSettings(BaseModel):
    max_resolution: int = 512
    jpeg_quality: int = 90
    compress_probability: float = 0.5


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


def sha256_file(path, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_sha256(storage: Storage, data_uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(join(data_uri, MANIFEST))).hexdigest()


def read_manifest(storage: Storage, data_uri: str) -> ShardManifest:
    """Load DATA/manifest.json, refusing anything that is not a completely staged dataset."""
    uri = join(data_uri, MANIFEST)
    if storage.size(uri) is None:
        raise UserError(f"{data_uri} is not a staged dataset: {MANIFEST} is missing (staging never "
                        "finished, or the path is wrong); run `pipeline stage` to (re)stage it")
    try:
        manifest = ShardManifest.model_validate_json(storage.read_bytes(uri))
    except ValueError as exc:
        raise UserError(f"{uri}: not a valid manifest ({str(exc).splitlines()[0]})") from exc
    if manifest.format != FORMAT:
        raise UserError(f"{uri}: format '{manifest.format}' is not supported (expected {FORMAT})")
    return manifest
