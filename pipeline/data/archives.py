"""Tar archives read in place by their headers alone: ImageNet's original tars, on disk or S3,
listed without downloading or extracting them.

A tar is a chain of 512-byte headers, each saying how many bytes of data follow it. Listing one
reads the headers only, one small ranged read each (ILSVRC2012_img_train.tar: 1.28 M headers,
0.5 % of its bytes), so that staging, which then reads each image's own bytes, reads the archive
about once in all. The chain is serial inside a tar; a large one is cut into SEGMENT-sized
segments listed in parallel: each segment finds its first header by scanning forward from where
it begins (at most SCAN_LIMIT bytes), and is joined to the one before only where that one's
chain lands exactly on it, so a block inside an image that passes for a header is never taken
for one (the chain is walked again from where it really lands).

Nothing in an archive from elsewhere is trusted. A member named outside the archive or a link is
skipped and recorded; an archive cut short, a header that is not one where the chain says it
must be, or data after the end-of-archive blocks (a class tar whose declared size swallows the
next one) is refused in one line naming the archive.
"""
from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from ..errors import UserError
from ..storage import Storage, is_s3, join

BLOCK = 512
SEGMENT = 64 * 1024 * 1024      # a tar larger than this is listed in parallel segments
SCAN_CHUNK = 64 * 1024          # a segment looks for its first header in reads of this size...
SCAN_LIMIT = 1024 * 1024        # ...up to this far (a member larger than that: the chain decides)
BATCH = 8                       # segments per parallel job, listed by as many threads


@dataclass(frozen=True)
class Segment:
    """Bytes [start, stop) of the tar that lies at [base, base + size) of the file `blob`."""

    blob: str       # file below the source root
    where: str      # the tar's name in messages, e.g. ILSVRC2012_img_train.tar/n01440764.tar
    base: int
    size: int
    start: int
    stop: int


@dataclass
class Walk:
    """What reading one segment's chain of headers found."""

    segment: Segment
    first: int | None               # offset of the first header read (None: none found)
    next: int = 0                   # where the chain goes on after the last member read
    end: str = "more"               # more | eof | bad | short | data-end
    members: list[tuple[str, int, int]] = field(default_factory=list)  # name, offset in blob, size
    skipped: list[dict] = field(default_factory=list)
    last: tuple[str, int] | None = None   # (name, declared size) of the last member read
    bytes_read: int = 0
    gets: int = 0                   # ranged reads made


@dataclass
class Listing:
    """Every regular member of one tar, and the members skipped."""

    where: str
    members: list[tuple[str, int, int]]    # (name, data offset in the blob, size)
    skipped: list[dict]
    bytes_read: int
    gets: int = 0


class _Reading:
    """What tarfile.TarInfo.fromtarfile uses of a TarFile. TarFile.next() would first read the
    byte before each header (one more request per member); this reads the headers alone."""

    encoding = tarfile.ENCODING
    errors = "surrogateescape"

    def __init__(self, fileobj):
        self.fileobj, self.offset, self.pax_headers = fileobj, 0, {}


def segments(blob: str, where: str, base: int, size: int, segment: int = SEGMENT) -> list[Segment]:
    step = max(BLOCK, segment - segment % BLOCK)
    starts = list(range(0, max(size, 1), step))
    return [Segment(blob, where, base, size, s, min(s + step, size)) for s in starts]


def _is_header(block: bytes) -> bool:
    if len(block) != BLOCK or not block.strip(b"\0"):
        return False
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _find_header(f, start: int, stop: int) -> int | None:
    """The first block at or after `start` that reads as a header (scanning at most SCAN_LIMIT
    bytes, and never past `stop`)."""
    pos, limit = start, min(stop, start + SCAN_LIMIT)
    while pos < limit:
        f.seek(pos)
        chunk = f.read(min(SCAN_CHUNK, limit - pos))
        for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
            if _is_header(chunk[i:i + BLOCK]):
                return pos + i
        if len(chunk) < BLOCK:
            return None
        pos += len(chunk) - len(chunk) % BLOCK
    return None


def walk(storage: Storage, source_uri: str, seg: Segment, first: int | None = None) -> Walk:
    """Read the chain of headers that starts in `seg` (at `first` when known, else at seg.start
    for the first segment, else at the first header found after seg.start) until it passes the
    segment's end or the archive ends. Records what it finds; judging it is join_walks's work."""
    tally = storage.tally()
    with tally.open_range(join(source_uri, seg.blob), seg.base, seg.size) as f:
        if first is None:
            first = seg.start if seg.start == 0 else _find_header(f, seg.start, seg.stop)
        out = Walk(seg, first)
        if first is not None:
            _walk_from(f, first, seg, out)
    out.bytes_read, out.gets = tally.bytes_read, tally.requests["get"]
    return out


def _walk_from(f, pos: int, seg: Segment, out: Walk) -> None:
    reading = _Reading(f)
    while True:
        out.next = pos
        if pos >= seg.stop and seg.stop < seg.size:
            out.end = "more"
            return
        if pos >= seg.size:
            out.end = "data-end"
            return
        f.seek(pos)
        try:
            m = tarfile.TarInfo.fromtarfile(reading)
        except tarfile.EOFHeaderError:
            out.end = "eof"
            return
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            out.end = "data-end"
            return
        except (tarfile.TarError, ValueError, UnicodeError):   # HeaderError is a TarError
            out.end = "bad"
            return
        out.last = (m.name, m.size)
        if m.offset_data + m.size > seg.size:
            out.end = "short"
            return
        name = posixpath.normpath(m.name)
        path = f"{seg.where}/{m.name}"
        if m.issym() or m.islnk():
            out.skipped.append({"path": path, "reason": f"link member (to {m.linkname}), not an "
                                "image: skipped"})
        elif m.isfile() and (name.startswith("/") or name == ".." or name.startswith("../")):
            out.skipped.append({"path": path, "reason": "member path leads outside the archive: "
                                "skipped"})
        elif m.isfile():
            out.members.append((name, seg.base + m.offset_data, m.size))
        pos = reading.offset


def join_walks(walks: list[Walk], again: Callable[[Segment, int], Walk]) -> Walk:
    """One tar's segments (in order) as one chain from its first byte: a segment's walk counts
    only where the chain before it lands exactly on its first header; elsewhere the chain is
    walked again from where it lands (again(segment, offset)). The result ends in eof, bad,
    short or data-end."""
    seg0 = walks[0].segment
    whole = Walk(Segment(seg0.blob, seg0.where, seg0.base, seg0.size, 0, seg0.size), 0)
    pos = 0
    for w in walks:
        if whole.end != "more" or pos >= w.segment.stop:
            whole.bytes_read += w.bytes_read   # read, though the chain did not need it
            whole.gets += w.gets
            continue
        if w.first != pos:
            whole.bytes_read += w.bytes_read
            whole.gets += w.gets
            w = again(w.segment, pos)
        whole.members += w.members
        whole.skipped += w.skipped
        whole.last = w.last or whole.last
        whole.bytes_read += w.bytes_read
        whole.gets += w.gets
        whole.end, pos = w.end, w.next
    whole.next = pos
    return whole


def check_end(storage: Storage, source_uri: str, whole: Walk, hint: str = "") -> None:
    """Refuse a chain that did not end where a sound archive ends; counts in `whole` what it
    read to check that what follows the end-of-archive blocks is zeros (the archive's padding)."""
    seg, pos = whole.segment, whole.next
    if whole.end == "short":
        name, size = whole.last
        raise UserError(f"{seg.where}: the archive ends at byte {seg.size}, inside member {name}, "
                        f"which declares {size} bytes: it is cut short; download it again")
    if whole.end == "bad" or (whole.end == "data-end" and whole.last is None and pos < BLOCK):
        if whole.last is None:
            raise UserError(f"{seg.where}: not a readable tar archive (no tar header at byte "
                            f"{pos} of {seg.size}); is it cut short? Download it again")
        name, size = whole.last
        raise UserError(f"{seg.where}: member {name} declares {size} bytes, but what follows them "
                        f"(byte {pos}) is neither a tar header nor the end of the archive: the "
                        "archive is inconsistent: refused; download it again")
    if whole.end == "eof":
        pos += BLOCK   # the first end-of-archive block, already read as a header
    tally = storage.tally()
    with tally.open_range(join(source_uri, seg.blob), seg.base, seg.size) as f:
        while pos < seg.size:
            f.seek(pos)
            chunk = f.read(min(1024 * 1024, seg.size - pos))
            if not chunk:
                break
            if chunk.strip(b"\0"):
                at = pos + len(chunk) - len(chunk.lstrip(b"\0"))
                raise UserError(f"{seg.where}: data after its end-of-archive blocks (at byte {at} "
                                f"of {seg.size}){hint}: the archive is inconsistent: refused; "
                                "download it again")
            pos += len(chunk)
    whole.bytes_read += tally.bytes_read
    whole.gets += tally.requests["get"]


def list_segments(storage: Storage, source_uri: str, segs: list[Segment]) -> list[Walk]:
    """Walk several segments at once (threads: the time goes in waiting for reads). The body
    of one parallel job."""
    from concurrent.futures import ThreadPoolExecutor

    if is_s3(source_uri):
        storage.client   # one client for all the threads (boto3's clients are thread-safe)
    with ThreadPoolExecutor(min(len(segs), BATCH)) as pool:
        return list(pool.map(lambda s: walk(storage, source_uri, s), segs))


def list_segments_job(args: tuple) -> list[Walk]:
    return list_segments(*args)


def list_tars(storage: Storage, source_uri: str, tars: Iterable[tuple[str, str, int, int]],
              run_parallel: Callable | None = None, on_listed: Callable | None = None,
              hint: Callable[[str], str] = lambda where: "",
              segment: int = SEGMENT, gets_per_s: float | None = None) -> Iterator[Listing]:
    """List tars (blob, where, base, size) in parallel, yielding each one's Listing as soon as
    its segments are in. run_parallel(fn, items) yields fn(item) for every item in any order
    (default: here, one item after another); on_listed(where, bytes_read) is called per tar.
    gets_per_s: each job's cap on its ranged reads of S3 (a share of the prefix's rate)."""
    run_parallel = run_parallel or map
    if gets_per_s and is_s3(source_uri):
        storage = storage.limited(gets_per_s)
    by_tar: dict[str, list[Segment]] = {}
    for blob, where, base, size in tars:
        by_tar[where] = segments(blob, where, base, size, segment)
    units = sorted((s for segs in by_tar.values() for s in segs),
                   key=lambda s: (-s.size, s.where, s.start))   # the largest tars first
    jobs = [(storage, source_uri, units[i:i + BATCH]) for i in range(0, len(units), BATCH)]
    found: dict[str, dict[int, Walk]] = {where: {} for where in by_tar}
    for walks in run_parallel(list_segments_job, jobs):
        for w in walks:
            done = found[w.segment.where]
            done[w.segment.start] = w
            if len(done) < len(by_tar[w.segment.where]):
                continue
            ordered = [done[s.start] for s in by_tar[w.segment.where]]
            whole = join_walks(ordered, lambda s, at: walk(storage, source_uri, s, at))
            check_end(storage, source_uri, whole, hint(w.segment.where))
            if on_listed:
                on_listed(w.segment.where, whole.bytes_read)
            yield Listing(w.segment.where, whole.members, whole.skipped, whole.bytes_read,
                          whole.gets)


def list_tar(storage: Storage, source_uri: str, blob: str, where: str, base: int, size: int,
             hint: str = "") -> Listing:
    """One tar, here (e.g. the outer train archive, whose members are tars themselves: never
    cut into segments, since a segment of it would find the headers of the tars inside)."""
    whole = walk(storage, source_uri, Segment(blob, where, base, size, 0, size))
    check_end(storage, source_uri, whole, hint)
    return Listing(where, whole.members, whole.skipped, whole.bytes_read, whole.gets)
