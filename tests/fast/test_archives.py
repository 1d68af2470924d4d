"""The original tars, from elsewhere: odd members skipped and recorded, broken archives refused."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from pipeline.data.sample_data import generate
from pipeline.data.source import TRAIN_TAR, detect_layout, discover
from pipeline.errors import UserError
from pipeline.storage import Storage


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tars")
    generate(str(root), "tars", classes=3, train_per_class=3, val_per_class=1, seed=2)
    return root


def copy_source(tars: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(tars, to)
    return to


def class_tars(train_tar: Path) -> dict[str, bytes]:
    with tarfile.open(train_tar) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}


def write_tar(path: Path, members: dict[str, bytes], extra=()) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra:
            t.addfile(info)


def test_layout_detection():
    assert detect_layout(["ILSVRC2012_img_train.tar"]) == "tars"
    assert detect_layout(["ILSVRC/Data/CLS-LOC/train/n1/a.JPEG"]) == "kaggle"
    assert detect_layout(["train/n1/a.JPEG", "val/n1/b.JPEG"]) == "folders"
    assert detect_layout(["train/n1/a.JPEG", "val/ILSVRC2012_val_00000001.JPEG",
                          "ILSVRC2012_devkit_t12.tar.gz"]) == "devkit"
    assert detect_layout(["photos/cat.jpg"]) is None


def test_class_tars_named_dot_slash_are_accepted(tars, tmp_path):
    src = copy_source(tars, tmp_path / "src")
    inner = class_tars(src / TRAIN_TAR)
    write_tar(src / TRAIN_TAR, {f"./{name}": data for name, data in inner.items()})
    found = discover(Storage(), str(src), splits=["train"])
    assert len(found.classes) == 3 and all(c.startswith("n") for c in found.classes)
    assert len(found.splits["train"]) == 9


def test_unsafe_and_link_members_are_skipped_and_recorded(tars, tmp_path):
    src = copy_source(tars, tmp_path / "src")
    inner = class_tars(src / TRAIN_TAR)
    first = sorted(inner)[0]
    with tarfile.open(fileobj=io.BytesIO(inner[first])) as t:
        images = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
    some = next(iter(images.values()))
    link = tarfile.TarInfo("link.JPEG")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("hard.JPEG")
    hard.type, hard.linkname = tarfile.LNKTYPE, next(iter(images))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in {**images, "../up.JPEG": some, "/abs/x.JPEG": some}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        t.addfile(link)
        t.addfile(hard)
    inner[first] = buf.getvalue()
    write_tar(src / TRAIN_TAR, inner)
    found = discover(Storage(), str(src), splits=["train"])
    assert len(found.splits["train"]) == 9   # the real images only
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in found.skipped}
    assert "outside the archive" in reasons["up.JPEG"] and "outside the archive" in reasons["x.JPEG"]
    assert "link member" in reasons["link.JPEG"] and "link member" in reasons["hard.JPEG"]


def test_a_cut_short_archive_is_refused_naming_it(tars, tmp_path):
    src = copy_source(tars, tmp_path / "src")
    data = (src / TRAIN_TAR).read_bytes()
    (src / TRAIN_TAR).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{TRAIN_TAR}.*(cut short|not a readable tar)"):
        discover(Storage(), str(src), splits=["train"])


def test_a_member_whose_size_runs_over_the_next_is_refused(tars, tmp_path):
    """Today such an archive silently lost a whole class and shifted the labels."""
    src = copy_source(tars, tmp_path / "src")
    data = bytearray((src / TRAIN_TAR).read_bytes())
    with tarfile.open(src / TRAIN_TAR) as t:
        first = next(m for m in t if m.isfile())
    header = first.offset
    size_field = bytes(data[header + 124:header + 136])
    bigger = first.size + 2048
    data[header + 124:header + 136] = f"{bigger:011o}\0".encode()
    # a valid header checksum, so that tarfile believes the lie
    data[header + 148:header + 156] = b" " * 8
    checksum = sum(data[header:header + 512])
    data[header + 148:header + 156] = f"{checksum:06o}\0 ".encode()
    assert size_field != bytes(data[header + 124:header + 136])
    (src / TRAIN_TAR).write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"member {first.name} declares {bigger} bytes.*inconsistent"):
        discover(Storage(), str(src), splits=["train"])
