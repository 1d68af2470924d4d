"""Find the images and labels of an ImageNet copy, in whatever layout the user has it.

Layouts (see ../shared/DESIGN.md):
  folders  train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
  kaggle   ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/*.JPEG} + LOC_val_solution.csv, LOC_synset_mapping.txt
  devkit   train/<wnid>/, flat val/*.JPEG + ILSVRC2012_devkit_t12/data/{..._ground_truth.txt, meta.mat}
  tars     ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar,
           ILSVRC2012_devkit_t12.tar.gz; read in place through byte ranges, never extracted:
           listing reads their headers only (archives.py), staging each image's bytes once.

Everything works the same on a local folder and on s3://bucket/prefix: the listing decides.
"""
from __future__ import annotations

import csv
import io
import re
import tarfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Callable, Iterable

from .. import console
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
    bytes: int = 0         # the source's files, all together
    bytes_read: int = 0    # read from the source to find the images and labels
    listing_seconds: float = 0.0
    gets: int = 0          # reads made to find them (tar headers, label files)
    lists: int = 0         # listing pages (1,000 files each on S3)
    files: dict = field(default_factory=dict)   # archives: path -> [size, ETag or mtime]


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
             splits: Iterable[str] = SPLITS, run_parallel: Callable | None = None,
             progress: bool = False, parallel: int | Callable[[], int] = 1) -> Source:
    """List SRC, recognise its layout and return every image with its label.

    run_parallel(fn, items) yields fn(item) for each item, in any order: the caller's way of
    listing many per-class tars at once (Ray tasks); by default they are listed here. progress:
    say how listing the archives goes (class tars listed, bytes read, rate). parallel: how many
    jobs run_parallel runs at once (they share S3's per-prefix request rate)."""
    started = time.monotonic()
    splits = list(splits)
    for s in splits:
        if s not in SPLITS:
            raise UserError(f"--splits: unknown split '{s}' (choose from {', '.join(SPLITS)})")
    storage.check_bucket(uri)
    if not uri.startswith("s3://"):
        import os
        if not os.path.exists(uri):
            raise UserError(f"source {uri} does not exist")
    pages = storage.tally()
    entries = list(pages.list_detailed(uri))
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

    tally = storage.tally()   # what is read from the source, counted where it is read
    if layout == "tars":
        source = _discover_tars(tally, uri, files, splits, run_parallel, progress, parallel)
        # a handful of archives: a re-run checks them one HEAD each (stage.py)
        source.files = {rel: [size, version] for rel, size, version in entries}
    else:
        source = _discover_files(tally, uri, files, splits, layout)
    source.listing = listing_digest(entries)
    source.bytes = sum(files.values())
    source.bytes_read += tally.bytes_read
    source.gets += tally.requests["get"]
    source.lists = pages.requests["list"]
    source.listing_seconds = time.monotonic() - started
    return source


def _discover_files(storage, uri, files, splits, layout) -> Source:
    root = KAGGLE_ROOT + "/" if layout == "kaggle" else ""
    train = _class_folders(files, root + "train/")
    if not train:
        raise UserError(f"source {uri}: no {root}train/<wnid>/ folders found for layout '{layout}'")
    classes = sorted({img.wnid for img in train})
    names = _names(storage, uri, files)
    source = Source(uri, layout, classes, names, {})
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


def _has_val_labels(files) -> bool:
    return KAGGLE_VAL_CSV in files or DEVKIT_TAR in files or \
        f"{DEVKIT}/{GROUND_TRUTH}" in files


def _discover_tars(storage, uri, files, splits, run_parallel, progress, parallel=1) -> Source:
    from ..progress import Progress
    from ..storage import PREFIX_GETS_PER_S
    from .archives import list_tar, list_tars

    if TRAIN_TAR not in files:
        raise UserError(f"source {uri}: {TRAIN_TAR} is missing (the class list comes from it)")
    if "val" in splits and VAL_TAR not in files:
        raise UserError(f"source {uri}: {VAL_TAR} is missing (or stage with --splits train)")
    started = time.monotonic()
    if progress:
        console.say(f"[stage] listing {uri}: the headers of {TRAIN_TAR} "
                    f"({_size(files[TRAIN_TAR])}), then of its class tars")
    outer = list_tar(storage, uri, TRAIN_TAR, TRAIN_TAR, 0, files[TRAIN_TAR])
    class_tars = [(name, off, n) for name, off, n in outer.members if name.endswith(".tar")]
    if not class_tars:
        raise UserError(f"source {uri}: {TRAIN_TAR} holds no per-class .tar files")
    classes = sorted(name[:-4].rsplit("/", 1)[-1] for name, _, _ in class_tars)
    source = Source(uri, "tars", classes, _names(storage, uri, files), {}, list(outer.skipped),
                    bytes_read=outer.bytes_read, gets=outer.gets)

    tars = []
    if "train" in splits:
        tars += [(TRAIN_TAR, f"{TRAIN_TAR}/{name}", off, n) for name, off, n in class_tars]
    if "val" in splits:
        tars.append((VAL_TAR, VAL_TAR, 0, files[VAL_TAR]))
    totals = {"class tars": len(class_tars) if "train" in splits else 0,
              "val tar": 1 if "val" in splits else 0}
    bar = Progress("stage", {k: v for k, v in totals.items() if v}, title="listing",
                   detail=lambda: _rate(source.bytes_read, time.monotonic() - started,
                                        bar.done.get("class tars", 0))) if progress else None

    def listed(where, n):
        source.bytes_read += n
        if bar:
            bar.update(**{"val tar" if where == VAL_TAR else "class tars": 1})

    listings = {}
    jobs = parallel() if callable(parallel) else parallel
    try:
        for got in list_tars(storage, uri, tars, run_parallel, listed, hint=_swallow_hint,
                             gets_per_s=PREFIX_GETS_PER_S / max(1, jobs)):
            listings[got.where] = got
            source.gets += got.gets
    finally:
        if bar:
            bar.close()

    train = []
    for name, _, _ in class_tars if "train" in splits else ():
        got = listings[f"{TRAIN_TAR}/{name}"]
        wnid = name[:-len(".tar")].rsplit("/", 1)[-1]
        source.skipped.extend(got.skipped)
        train += [SourceImage(f"{got.where}/{member}", wnid, TRAIN_TAR, off, n)
                  for member, off, n in got.members if _is_image_name(member)]
    if "train" in splits:
        source.splits["train"] = sorted(train, key=lambda i: i.path)

    labels = None
    if "val" in splits or _has_val_labels(files):
        labels, names = _val_labels(storage, uri, files)
        source.names.update(names)
        # every class the devkit or the val labels know must be in the train archive: one
        # missing is a damaged download (or a class tar swallowed by the one before it)
        missing = sorted((set(labels.values()) | set(names)) - set(classes))
        if missing:
            shown = ", ".join(f"{w}.tar" for w in missing[:5]) + (", ..." * (len(missing) > 5))
            raise UserError(f"source {uri}: {TRAIN_TAR} lacks {len(missing)} class tar(s) that "
                            f"the devkit and val labels know ({shown}): the archive is incomplete "
                            "or damaged; download it again")
    if "val" in splits:
        got = listings[VAL_TAR]
        source.skipped.extend(got.skipped)
        val = []
        for name, off, n in sorted(got.members):
            path = f"{VAL_TAR}/{name}"
            m = VAL_NAME.search(name)
            wnid = labels.get(int(m.group(1))) if m else None
            if wnid is None:
                source.skipped.append({"path": path, "reason": "no label for this validation image"})
            else:
                val.append(SourceImage(path, wnid, VAL_TAR, off, n))
        source.splits["val"] = _known_classes(val, classes, source)
    return source


def _swallow_hint(where: str) -> str:
    if where.startswith(TRAIN_TAR + "/"):
        return (f"; {TRAIN_TAR} declares it larger than the tar it holds: does it swallow the "
                "class tar after it?")
    return ""


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def _rate(bytes_read: int, seconds: float, class_tars: int) -> str:
    seconds = max(seconds, 1e-6)
    return (f"{_size(bytes_read)} read, {_size(bytes_read / seconds)}/s, "
            f"{class_tars / seconds:.1f} class tars/s")
