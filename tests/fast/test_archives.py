"""The original tars, from elsewhere: odd members skipped and recorded, broken archives refused."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
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


class RecordingStorage(Storage):
    """Storage that notes every byte range read (and still counts them as Storage does)."""

    def __init__(self, s3=None, reads=None):
        super().__init__(s3)
        self.reads = [] if reads is None else reads

    def __getstate__(self):
        return {**super().__getstate__(), "reads": self.reads}

    def read_bytes(self, uri, offset=0, length=None):
        data = super().read_bytes(uri, offset, length)
        self.reads.append((Path(uri).name, offset, len(data)))
        return data


def test_listing_reads_headers_never_an_image(tars):
    """Listing the tars reads headers and padding only; staging then reads each image once, so
    the two together read the archives at most once (here exactly: every byte a range of its own
    read at most once)."""
    storage = RecordingStorage()
    found = discover(storage, str(tars))
    images = [im for split in found.splits.values() for im in split]
    assert len(images) == 3 * 3 + 3
    for blob, offset, length in storage.reads:
        if blob.endswith(".tar"):
            assert not any(im.blob == blob and offset < im.offset + im.size
                           and im.offset < offset + length for im in images), (blob, offset, length)
    assert found.bytes_read == sum(length for _, _, length in storage.reads)   # counted at Storage
    archives = sum(p.stat().st_size for p in tars.iterdir())
    assert found.bytes == archives
    assert found.bytes_read + sum(im.size for im in images) <= archives
    ranges = sorted((b, o, o + n) for b, o, n in storage.reads if b.endswith(".tar"))
    for (b1, _, end), (b2, start, _) in zip(ranges, ranges[1:]):
        assert b1 != b2 or end <= start, "a byte of the archive was read twice"


def test_listing_says_how_far_it_is(tars, monkeypatch):
    import io as _io

    from pipeline import console

    err, out = _io.StringIO(), _io.StringIO()
    monkeypatch.setattr(console._Terminal, "err", err)
    monkeypatch.setattr(console._Terminal, "out", out)
    discover(Storage(), str(tars), progress=True)
    assert "[stage] listing" in out.getvalue() and TRAIN_TAR in out.getvalue()
    last = err.getvalue().splitlines()[-1]
    assert last.startswith("[stage] listing: 3/3 class tars, 1/1 val tar (") and "KB read" in last
    assert "class tars/s" in last


def flat_tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_segments_listed_apart_join_into_the_same_listing(tmp_path):
    """A large tar is listed in segments at once; a block inside an image that reads as a tar
    header (here: a real header, of a member 'fake.JPEG') is never taken for one."""
    from pipeline.data.archives import list_tar, list_tars

    rng = np.random.default_rng(0)
    fake = tarfile.TarInfo("fake.JPEG").tobuf(tarfile.GNU_FORMAT)
    assert len(fake) == 512
    members = []
    for i in range(12):
        data = bytearray(rng.bytes(int(rng.integers(3000, 9000))))
        if i % 3 == 1:
            data[1024:1536] = fake   # 512-aligned inside the archive: members' data are
        members.append((f"ILSVRC2012_val_{i + 1:08d}.JPEG", bytes(data)))
    (tmp_path / "val.tar").write_bytes(flat_tar(members))
    size = (tmp_path / "val.tar").stat().st_size
    whole = list_tar(Storage(), str(tmp_path), "val.tar", "val.tar", 0, size)
    assert [m[0] for m in whole.members] == [name for name, _ in members]
    for segment in (1024, 2048, 4096, 6144, 10240):
        storage = RecordingStorage()
        [apart] = list_tars(storage, str(tmp_path), [("val.tar", "val.tar", 0, size)],
                            segment=segment)
        assert apart.members == whole.members, segment
        assert apart.bytes_read == sum(n for _, _, n in storage.reads)


def swallow_next(outer: bytes, first: str) -> bytes:
    """The outer archive with member `first` declaring a size that covers the member after it
    exactly, so that the outer chain of headers stays consistent."""
    data = bytearray(outer)
    with tarfile.open(fileobj=io.BytesIO(outer)) as t:
        members = [m for m in t if m.isfile()]
    a = next(i for i, m in enumerate(members) if m.name == first)
    head, nxt = members[a], members[a + 1]
    size = nxt.offset_data + -(-nxt.size // 512) * 512 - head.offset_data
    at = head.offset
    data[at + 124:at + 136] = f"{size:011o}\0".encode()
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = f"{sum(data[at:at + 512]):06o}\0 ".encode()
    return bytes(data)


def test_a_class_tar_that_swallows_the_next_is_refused_naming_it(tars, tmp_path):
    """Before: exit 0, and the swallowed class silently absent from the classes and the skips."""
    src = copy_source(tars, tmp_path / "src")
    first = sorted(class_tars(src / TRAIN_TAR))[0]
    (src / TRAIN_TAR).write_bytes(swallow_next((src / TRAIN_TAR).read_bytes(), first))
    with tarfile.open(src / TRAIN_TAR) as t:   # what tarfile itself makes of it: one class less
        assert len([m for m in t if m.isfile()]) == 2
    for splits in (["train"], ["train", "val"]):
        with pytest.raises(UserError, match=rf"{TRAIN_TAR}/{first}: data after its end-of-archive "
                                            r"blocks .*swallow"):
            discover(Storage(), str(src), splits=splits)


def test_data_after_a_class_tars_end_is_refused_naming_it(tars, tmp_path):
    src = copy_source(tars, tmp_path / "src")
    inner = class_tars(src / TRAIN_TAR)
    victim = sorted(inner)[1]
    inner[victim] = inner[victim] + b"hidden".ljust(512, b"\0")
    write_tar(src / TRAIN_TAR, inner)
    with pytest.raises(UserError, match=rf"{TRAIN_TAR}/{victim}: data after its end-of-archive"):
        discover(Storage(), str(src), splits=["train"])


def test_data_after_the_val_tars_end_is_refused(tars, tmp_path):
    src = copy_source(tars, tmp_path / "src")
    with open(src / "ILSVRC2012_img_val.tar", "ab") as f:
        f.write(flat_tar([("ILSVRC2012_val_00000099.JPEG", b"x" * 700)]))
    with pytest.raises(UserError, match=r"ILSVRC2012_img_val.tar: data after its end-of-archive"):
        discover(Storage(), str(src))


def test_a_class_the_devkit_knows_but_the_train_archive_lacks_is_refused(tars, tmp_path):
    src = copy_source(tars, tmp_path / "src")
    inner = class_tars(src / TRAIN_TAR)
    gone = sorted(inner)[2]
    del inner[gone]
    write_tar(src / TRAIN_TAR, inner)
    for splits in (["train"], ["train", "val"]):   # the devkit is there: checked either way
        with pytest.raises(UserError, match=rf"{TRAIN_TAR} lacks 1 class tar.*\({gone}\)"):
            discover(Storage(), str(src), splits=splits)
