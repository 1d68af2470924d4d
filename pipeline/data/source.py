"""Find the images and labels of an ImageNet copy, in whatever layout the user has it.

Layouts (see ../shared/DESIGN.md):
  folders  train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
  kaggle   ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/*.JPEG} + LOC_val_solution.csv, LOC_synset_mapping.txt
  devkit   train/<wnid>/, flat val/*.JPEG + ILSVRC2012_devkit_t12/data/{..._ground_truth.txt, meta.mat}
  tars     ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar,
           ILSVRC2012_devkit_t12.tar.gz; read in place through byte ranges, never extracted.

Everything works the same on a local folder and on s3://bucket/prefix: the listing decides.
"""
from __future__ import annotations

import csv
import io
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Callable, Iterable

from ..config import LAYOUTS, SPLITS
from ..errors import UserError
from ..storage import Storage, join
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_TAR = DEVKIT + ".tar.gz"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META_MAT = "data/meta.mat"
KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC"
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")


@dataclass(frozen=True)
class SourceImage:
    """One image: where it shows in the source (path), its class, and the byte range holding it."""

    path: str      # relative to the source root; a tar member reads 'X.tar/inner.tar/name'
    wnid: str
    blob: str      # file below the source root that holds the bytes
    offset: int
    size: int


@dataclass
class Source:
    uri: str
    layout: str
    classes: list[str]                       # wnids; the index in this list is the label
    names: dict[str, str]
    splits: dict[str, list[SourceImage]]
    skipped: list[dict] = field(default_factory=list)
    listing: str = ""      # fingerprint of the source's files: names, sizes, ETags or mtimes


def listing_digest(entries) -> str:
    """What a source looked like: (path, size, version) of every file, in order."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def source_listing(storage: Storage, uri: str) -> str:
    return listing_digest(storage.list_detailed(uri))


@lru_cache(maxsize=1)
def known_class_names() -> dict[str, str]:
    """The 1,000 ILSVRC2012 WordNet ids and their names, as in Kaggle's LOC_synset_mapping.txt."""
    text = resources.files("pipeline.data").joinpath("imagenet_classes.txt").read_text()
    return parse_synset_mapping(text)


def parse_synset_mapping(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            out[wnid] = name.strip()
    return out


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return bool(base) and not base.startswith(".")


def detect_layout(files: Iterable[str]) -> str | None:
    names = set(files)
    if TRAIN_TAR in names or VAL_TAR in names:
        return "tars"
    if any(n.startswith(KAGGLE_ROOT + "/") for n in names):
        return "kaggle"
    has_devkit = any(n.startswith(DEVKIT + "/") for n in names) or DEVKIT_TAR in names
    flat_val = any(n.startswith("val/") and n.count("/") == 1 for n in names)
    if any(n.startswith("train/") and n.count("/") == 2 for n in names) or any(
            n.startswith("val/") for n in names):
        return "devkit" if (has_devkit and flat_val) else "folders"
    return None


def discover(storage: Storage, uri: str, layout: str | None = None,
             splits: Iterable[str] = SPLITS, parallel_map: Callable = map) -> Source:
    """List SRC, recognise its layout and return every image with its label.

    parallel_map(fn, items) lets the caller list many per-class tars at once (Ray tasks)."""
    splits = list(splits)
    for s in splits:
        if s not in SPLITS:
            raise UserError(f"--splits: unknown split '{s}' (choose from {', '.join(SPLITS)})")
    storage.check_bucket(uri)
    if not uri.startswith("s3://"):
        import os
        if not os.path.exists(uri):
            raise UserError(f"source {uri} does not exist")
    entries = list(storage.list_detailed(uri))
    files = {rel: size for rel, size, _ in entries}
    if not files:
        raise UserError(f"source {uri} is empty: expected ImageNet in one of the layouts "
                        f"{', '.join(LAYOUTS)}")
    found = detect_layout(files)
    layout = layout or found
    if layout is None:
        sample = ", ".join(sorted(files)[:3])
        raise UserError(f"source {uri}: layout not recognised (found {sample}, ...); expected "
                        f"train/<wnid>/ folders, Kaggle's ILSVRC/Data/CLS-LOC, or the "
                        f"ILSVRC2012_img_*.tar archives (or name it with --layout {'|'.join(LAYOUTS)})")
    if layout not in LAYOUTS:
        raise UserError(f"--layout: unknown layout '{layout}' (choose from {', '.join(LAYOUTS)})")

    listing = listing_digest(entries)
    if layout == "tars":
        source = _discover_tars(storage, uri, files, splits, parallel_map)
        source.listing = listing
        return source
    root = KAGGLE_ROOT + "/" if layout == "kaggle" else ""
    train = _class_folders(files, root + "train/")
    if not train:
        raise UserError(f"source {uri}: no {root}train/<wnid>/ folders found for layout '{layout}'")
    classes = sorted({img.wnid for img in train})
    names = _names(storage, uri, files)
    source = Source(uri, layout, classes, names, {}, listing=listing)
    if "train" in splits:
        source.splits["train"] = train
    if "val" in splits:
        source.splits["val"] = _val_images(storage, uri, files, root + "val/", classes, source)
    return source


def _class_folders(files: dict[str, int], prefix: str) -> list[SourceImage]:
    out = []
    for path, size in files.items():
        if path.startswith(prefix) and path.count("/") == prefix.count("/") + 1 and _is_image_name(path):
            wnid = path[len(prefix):].split("/", 1)[0]
            out.append(SourceImage(path, wnid, path, 0, size))
    return sorted(out, key=lambda i: i.path)


def _names(storage: Storage, uri: str, files: dict[str, int]) -> dict[str, str]:
    names = dict(known_class_names())
    if KAGGLE_SYNSETS in files:
        names.update(parse_synset_mapping(storage.read_text(join(uri, KAGGLE_SYNSETS))))
    return names


def _val_images(storage, uri, files, prefix, classes, source) -> list[SourceImage]:
    sorted_val = _class_folders(files, prefix)
    flat = [p for p in files if p.startswith(prefix) and p.count("/") == prefix.count("/")
            and _is_image_name(p)]
    if sorted_val and not flat:
        return _known_classes(sorted_val, classes, source)
    if not flat:
        raise UserError(f"source {uri}: no validation images under {prefix} (stage only the "
                        "training set with --splits train)")
    labels, names = _val_labels(storage, uri, files)
    source.names.update(names)
    images = []
    for path in sorted(flat):
        m = VAL_NAME.search(path)
        wnid = labels.get(int(m.group(1))) if m else None
        if wnid is None:
            source.skipped.append({"path": path, "reason": "no label for this validation image"})
            continue
        images.append(SourceImage(path, wnid, path, 0, files[path]))
    return _known_classes(images, classes, source)


def _known_classes(images, classes, source) -> list[SourceImage]:
    known = set(classes)
    for img in images:
        if img.wnid not in known:
            source.skipped.append({"path": img.path,
                                   "reason": f"class {img.wnid} has no training folder"})
    return [img for img in images if img.wnid in known]


def _val_labels(storage, uri, files) -> tuple[dict[int, str], dict[str, str]]:
    """Validation labels by image number (1-based), from Kaggle's CSV or the devkit."""
    if KAGGLE_VAL_CSV in files:
        return parse_kaggle_val(storage.read_text(join(uri, KAGGLE_VAL_CSV))), {}
    gt, meta = f"{DEVKIT}/{GROUND_TRUTH}", f"{DEVKIT}/{META_MAT}"
    if gt in files and meta in files:
        return parse_devkit(storage.read_text(join(uri, gt)), storage.read_bytes(join(uri, meta)))
    if DEVKIT_TAR in files:
        return _devkit_from_tar(storage.read_bytes(join(uri, DEVKIT_TAR)), uri)
    raise UserError(
        f"source {uri}: val labels missing: val/ holds flat ILSVRC2012_val_*.JPEG files but neither "
        f"{KAGGLE_VAL_CSV} nor {DEVKIT}/{GROUND_TRUTH} + {META_MAT} (nor {DEVKIT_TAR}) is there; "
        "add one, or stage only the training set with --splits train")


def parse_kaggle_val(text: str) -> dict[int, str]:
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
        m = VAL_NAME.search(row["ImageId"] + ".JPEG")
        if m and row.get("PredictionString"):
            out[int(m.group(1))] = row["PredictionString"].split()[0]
    return out


def parse_devkit(ground_truth: str, meta_mat: bytes) -> tuple[dict[int, str], dict[str, str]]:
    """ILSVRC2012_IDs in the ground truth index meta.mat's synsets, which are NOT in wnid order."""
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    by_id, names = {}, {}
    for s in synsets:
        if int(s["num_children"]) == 0:
            by_id[int(s["ILSVRC2012_ID"])] = str(s["WNID"])
            names[str(s["WNID"])] = str(s["words"])
    ids = [int(x) for x in ground_truth.split()]
    return {n: by_id[i] for n, i in enumerate(ids, start=1) if i in by_id}, names


def _devkit_from_tar(data: bytes, uri: str) -> tuple[dict[int, str], dict[str, str]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            if GROUND_TRUTH not in members or META_MAT not in members:
                raise UserError(f"source {uri}: {DEVKIT_TAR} lacks {GROUND_TRUTH} or {META_MAT}")
            return parse_devkit(tar.extractfile(members[GROUND_TRUTH]).read().decode(),
                                tar.extractfile(members[META_MAT]).read())
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"source {uri}: {DEVKIT_TAR} is not a readable archive ({exc}); "
                        "download it again") from exc


BLOCK = 512


def tar_members(f, where: str, start: int = 0) -> tuple[list[tuple[str, int, int]], list[dict]]:
    """((name, data offset, size) of every regular file, [skipped members]) of a tar, reading
    headers only; offsets are shifted by `start` (where the tar begins, for a tar in a tar).

    An archive from elsewhere is not trusted: a member named outside the archive (`../x`,
    `/abs/x`) or a link is skipped and recorded; a cut-short archive, or one whose members'
    declared sizes do not match where the next header is, is refused in one line naming the
    member, instead of silently losing (or shifting) what follows it."""
    members, skipped = [], []
    total = f.seek(0, 2)
    f.seek(0)
    last = None
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:   # tarfile finds each header from the declared size of the one before
                last = m
                name = posixpath.normpath(m.name)
                if m.issym() or m.islnk():
                    skipped.append({"path": f"{where}/{m.name}", "reason": "link member "
                                    f"(to {m.linkname}), not an image: skipped"})
                elif m.isfile() and (name.startswith("/") or name == ".." or name.startswith("../")):
                    skipped.append({"path": f"{where}/{m.name}", "reason": "member path leads "
                                    "outside the archive: skipped"})
                elif m.isfile():
                    members.append((name, start + m.offset_data, m.size))
    except (tarfile.ReadError, tarfile.HeaderError, EOFError) as exc:
        raise UserError(f"{where}: not a readable tar archive past byte {f.tell()} of {total} "
                        f"({exc}); is it cut short? Download it again") from exc
    if last is not None:
        end = last.offset_data + -(-last.size // BLOCK) * BLOCK
        if end > total:
            raise UserError(f"{where}: the archive ends at byte {total}, inside member {last.name}, "
                            f"which declares {last.size} bytes: it is cut short; download it again")
        f.seek(end)
        rest = f.read(2 * BLOCK)
        # tarfile stops quietly at a header it cannot parse: had a declared size been wrong, what
        # follows the last member it read would not be the end-of-archive zeros
        if rest.strip(b"\0"):
            raise UserError(f"{where}: member {last.name} declares {last.size} bytes, but a header "
                            "or data follows before that: the archive is inconsistent: refused")
    return members, skipped


def list_class_tar(storage: Storage, uri: str, outer: str, inner: str, start: int, size: int):
    """Members of one per-class tar inside ILSVRC2012_img_train.tar (runs as a Ray task)."""
    where = f"{outer}/{inner}"
    with storage.open_range(join(uri, outer), start, size) as f:
        members, skipped = tar_members(f, where, start)
    return [(f"{where}/{name}", off, n) for name, off, n in members], skipped


def list_class_tar_job(args: tuple):
    return list_class_tar(*args)


def _discover_tars(storage, uri, files, splits, parallel_map) -> Source:
    if TRAIN_TAR not in files:
        raise UserError(f"source {uri}: {TRAIN_TAR} is missing (the class list comes from it)")
    with storage.open_range(join(uri, TRAIN_TAR)) as f:
        outer, skipped = tar_members(f, TRAIN_TAR)
    class_tars = [(name, off, n) for name, off, n in outer if name.endswith(".tar")]
    if not class_tars:
        raise UserError(f"source {uri}: {TRAIN_TAR} holds no per-class .tar files")
    classes = sorted(name[:-4].rsplit("/", 1)[-1] for name, _, _ in class_tars)
    source = Source(uri, "tars", classes, _names(storage, uri, files), {}, skipped)
    if "train" in splits:
        jobs = [(storage, uri, TRAIN_TAR, name, off, n) for name, off, n in class_tars]
        train = []
        for (class_tar, _, _), (members, inner_skipped) in zip(class_tars, parallel_map(list_class_tar_job, jobs)):
            wnid = class_tar[:-len(".tar")].rsplit("/", 1)[-1]
            source.skipped.extend(inner_skipped)
            for path, off, n in members:
                if _is_image_name(path):
                    train.append(SourceImage(path, wnid, TRAIN_TAR, off, n))
        source.splits["train"] = sorted(train, key=lambda i: i.path)
    if "val" in splits:
        if VAL_TAR not in files:
            raise UserError(f"source {uri}: {VAL_TAR} is missing (or stage with --splits train)")
        labels, names = _val_labels(storage, uri, files)
        source.names.update(names)
        with storage.open_range(join(uri, VAL_TAR)) as f:
            members, val_skipped = tar_members(f, VAL_TAR)
        source.skipped.extend(val_skipped)
        val = []
        for name, off, n in sorted(members):
            path = f"{VAL_TAR}/{name}"
            m = VAL_NAME.search(name)
            wnid = labels.get(int(m.group(1))) if m else None
            if wnid is None:
                source.skipped.append({"path": path, "reason": "no label for this validation image"})
            else:
                val.append(SourceImage(path, wnid, VAL_TAR, off, n))
        source.splits["val"] = _known_classes(val, classes, source)
    return source
