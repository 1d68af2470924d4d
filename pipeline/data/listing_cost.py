"""What listing an ImageNet-shaped source costs in requests, and what a re-stage of it costs: the
real listing code (source._discover_tars, archives.py) and the real re-stage check
(stage.already_staged) run against made-up archives that count every request (for `bench`)."""
from __future__ import annotations

import tarfile

from ..storage import PREFIX_GETS_PER_S, S3Settings, Storage
from .source import KAGGLE_VAL_CSV, TRAIN_TAR, VAL_TAR, _discover_tars

BLOCK, RECORD = 512, 10240


def _round(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class SyntheticTars(Storage):
    """ILSVRC2012_img_train.tar (a tar of `classes` class tars of `per_class` images of
    `image_bytes` each) and ILSVRC2012_img_val.tar (`val_images` images), made up on the fly:
    tar headers where a real archive has them, zeros elsewhere. Nothing is stored."""

    def __init__(self, classes: int, per_class: int, image_bytes: int, val_images: int):
        super().__init__(S3Settings())
        self.shape = (classes, per_class, image_bytes, val_images)
        self._sizes()

    def _sizes(self):
        classes, per_class, image_bytes, val_images = self.shape
        self.stride = BLOCK + _round(image_bytes, BLOCK)
        self.class_size = _round(per_class * self.stride + 2 * BLOCK, RECORD)
        self.outer_stride = BLOCK + self.class_size
        self.sizes = {TRAIN_TAR: _round(classes * self.outer_stride + 2 * BLOCK, RECORD),
                      VAL_TAR: _round(val_images * self.stride + 2 * BLOCK, RECORD)}

    def __getstate__(self):
        return {**super().__getstate__(), "shape": self.shape}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._sizes()

    @staticmethod
    def _header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        return info.tobuf(tarfile.USTAR_FORMAT)

    def _block(self, blob: str, at: int) -> bytes | None:
        """The header at byte `at` of `blob`, if one starts there."""
        classes, per_class, image_bytes, val_images = self.shape
        if blob == VAL_TAR:
            k, rest = divmod(at, self.stride)
            return self._header(f"ILSVRC2012_val_{k + 1:08d}.JPEG", image_bytes) \
                if rest == 0 and k < val_images else None
        c, rest = divmod(at, self.outer_stride)
        if c >= classes:
            return None
        if rest == 0:
            return self._header(f"n{c:08d}.tar", self.class_size)
        k, inner = divmod(rest - BLOCK, self.stride)
        return self._header(f"n{c:08d}_{k}.JPEG", image_bytes) \
            if inner == 0 and k < per_class else None

    def read_bytes(self, uri: str, offset: int = 0, length: int | None = None) -> bytes:
        blob = uri.rsplit("/", 1)[-1]
        if blob == KAGGLE_VAL_CSV:
            return self._count(b"ImageId,PredictionString\n")
        self._request("get", uri)
        end = self.sizes[blob] if length is None else min(offset + length, self.sizes[blob])
        out = bytearray(max(0, end - offset))
        first = offset - offset % BLOCK
        for at in range(first, end, BLOCK):
            header = self._block(blob, at)
            if header is not None:
                lo, hi = max(at, offset), min(at + BLOCK, end)
                out[lo - offset:hi - offset] = header[lo - at:hi - at]
        return self._count(bytes(out))


def listing_requests(classes: int = 1000, per_class: int = 1300, image_bytes: int = 110_000,
                     val_images: int = 50_000) -> dict:
    """The reads `pipeline stage` makes to list an ILSVRC2012-shaped pair of archives (the real
    listing plan: the outer tar's headers, each class tar in segments, the val tar), and the
    seconds they take at the per-prefix rate listing keeps under."""
    storage = SyntheticTars(classes, per_class, image_bytes, val_images)
    files = {**storage.sizes, KAGGLE_VAL_CSV: 1}
    source = _discover_tars(storage, "/synthetic", files, ["train", "val"], None, False)
    gets = source.gets + storage.requests["get"]
    return {"classes": classes, "images": classes * per_class + val_images,
            "listing_gets": gets, "listing_bytes_read": source.bytes_read,
            "seconds_at_prefix_rate": round(gets / PREFIX_GETS_PER_S, 1)}


class _Staged(Storage):
    """A staged dataset and its source as answers to HEAD and GET, counting them."""

    def __init__(self, files: dict):
        super().__init__(S3Settings())
        self.files = files   # uri -> (size, version, bytes or None)

    def __getstate__(self):
        return {**super().__getstate__(), "files": self.files}

    def stat(self, uri: str):
        self._request("head", uri)
        found = self.files.get(uri)
        return None if found is None else found[:2]

    def size(self, uri: str):
        found = self.stat(uri)
        return None if found is None else found[0]

    def read_bytes(self, uri: str, offset: int = 0, length: int | None = None) -> bytes:
        self._request("get", uri)
        return self._count(self.files[uri][2])


def restage_requests(train_shards: int = 1252, val_shards: int = 49) -> dict:
    """The requests a re-run of `pipeline stage` over an unchanged, staged ILSVRC2012 archive
    source makes (stage.already_staged, counted through Storage): on the source, and on dest
    (the manifest and one HEAD per shard)."""
    from ..config import StageConfig
    from .manifest import MANIFEST, ClassInfo, ShardInfo, ShardManifest, SplitInfo
    from .source import DEVKIT_TAR
    from .stage import already_staged

    src, dest = "s3://source/imagenet", "s3://staged/imagenet"
    cfg = StageConfig(source=src, dest=dest)
    archives = {TRAIN_TAR: 147_897_477_120, VAL_TAR: 6_744_924_160, DEVKIT_TAR: 2_568_145}
    files = {f"{src}/{name}": (size, f"etag-{name}", None) for name, size in archives.items()}
    splits = {}
    for split, count in (("train", train_shards), ("val", val_shards)):
        shards = [ShardInfo(path=f"{split}/shard-{i:05d}.beton", samples=1, bytes=400_000_000,
                            sha256="0" * 64) for i in range(count)]
        splits[split] = SplitInfo(samples=count, shards=shards)
        files.update({f"{dest}/{s.path}": (s.bytes, "e", None) for s in shards})
    manifest = ShardManifest(
        classes=[ClassInfo(index=0, wnid="n0")], splits=splits, writer=cfg.writer, plan="p",
        source={"uri": src, "layout": "tars", "shard_size": cfg.shard_size,
                "files": {name: [size, f"etag-{name}"] for name, size in archives.items()}})
    text = manifest.to_json().encode()
    files[f"{dest}/{MANIFEST}"] = (len(text), "m", text)
    storage = _Staged(files)
    result = already_staged(storage, cfg, src, dest)
    assert result is not None, "the re-stage check did not find the dataset staged"
    return {"source_heads": result.source_heads, "source_gets": result.source_gets,
            "source_lists": result.source_lists, "dest_heads": storage.requests["head"],
            "dest_gets": storage.requests["get"]}
