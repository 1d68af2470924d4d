"""Local paths and s3://bucket/prefix behind one small interface.

Every stage takes URIs; this module (with s3.py: S3's settings, regions and errors) is the only
place that knows the difference. Writes are
atomic on both sides (local: temp file + rename; S3: objects appear only once complete), so a
reader never sees a half-written file. S3 calls ride out an outage of the endpoint (backing off,
for `outage_seconds`), then fail in words.

Keys are never held by this module: boto3 and pyarrow find them where the process runs (the AWS
variables, ~/.aws, an instance profile or a Kubernetes secret). Settings and Storage objects are
shipped to Ray tasks and pickled by Tune; with no key in them, no key lands in a pickle.
"""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .holds import hold
from .retry import RateLimit, retry
from .s3 import (DEFAULT_OUTAGE_SECONDS, PREFIX_GETS_PER_S, TRANSIENT_CODES,  # noqa: F401
                 S3Settings, bucket_region, describe_s3_error, is_aws_endpoint, is_s3,
                 is_throttled, is_transient, pyarrow_region, s3_code, split_s3)


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return str(Path(uri, *parts))


def absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers run in other folders); URIs unchanged."""
    if not uri or is_s3(uri) or "://" in uri or uri.startswith("models:/"):
        return uri
    return str(Path(uri).resolve())


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


UPLOAD_HOLD_ENV = "PIPELINE_TEST_UPLOAD_HOLD"


class Storage:
    """Read, list and write under local paths and S3 URIs. One boto3 client per instance."""

    def __init__(self, s3: S3Settings | None = None):
        self.s3 = s3 or S3Settings.from_env()
        self._client = None
        self.bytes_read = 0   # every byte this object read (what a stage reports per source)
        self.requests = {"get": 0, "head": 0, "list": 0}   # reads, existence/size checks, pages
        self.gets_per_s: float | None = None   # this process's cap on GET/HEAD (see limited())
        self._limit: RateLimit | None = None
        self._count_lock = threading.Lock()

    def __getstate__(self):
        # Shipped to Ray tasks: the settings travel (without keys), the client is rebuilt there.
        return {"s3": self.s3, "_client": None, "bytes_read": 0, "gets_per_s": self.gets_per_s,
                "requests": {"get": 0, "head": 0, "list": 0}, "_limit": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._count_lock = threading.Lock()
        if self.gets_per_s and self._limit is None:
            self._limit = RateLimit(self.gets_per_s)

    def limited(self, gets_per_s: float) -> "Storage":
        """A tally of this storage whose S3 GETs and HEADs (in this process, and in each process
        it is shipped to) stay under gets_per_s, backing off further on SlowDown."""
        other = self.tally()
        other.gets_per_s, other._limit = gets_per_s, RateLimit(gets_per_s)
        return other

    def _request(self, kind: str, uri: str) -> None:
        with self._count_lock:
            self.requests[kind] += 1
        if self._limit is not None and kind != "list" and is_s3(uri):
            self._limit.wait()

    @property
    def client(self):
        if self._client is None:
            self._client = self.s3.client()
        return self._client

    def tally(self) -> "Storage":
        """The same storage (settings, and the client once there is one), counting its own
        reads in bytes_read from 0: e.g. what one task read from the source."""
        other = copy.copy(self)   # pickles' state: a count of 0, no client (a subclass stays one)
        other._client, other._limit = self._client, self._limit
        return other

    def _count(self, data: bytes) -> bytes:
        with self._count_lock:
            self.bytes_read += len(data)
        return data

    def _s3_call(self, uri, fn, *args, outage: float | None = None, **kwargs):
        """fn(*args), riding out an outage of the endpoint (for `outage` seconds, default the
        settings' outage_seconds); any failure becomes a UserError."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        warned = []

        def say_once(exc, delay):
            if is_throttled(exc):   # not an outage: S3 asks for fewer requests
                if self._limit is not None:
                    self._limit.slow_down()
                if not warned:
                    warned.append(exc)
                    print(f"[s3] {uri}: S3 asks to slow down (SlowDown); backing off",
                          file=sys.stderr, flush=True)
                return
            if not warned:
                warned.append(exc)
                print(f"[s3] warning: {self.s3.endpoint_url or 'S3'} is not answering "
                      f"({type(exc).__name__}); retrying for up to {wait:g} s",
                      file=sys.stderr, flush=True)

        wait = self.s3.outage_seconds if outage is None else outage
        call = lambda: fn(*args, **kwargs)   # noqa: E731
        try:
            try:
                return call()
            except Exception as exc:   # noqa: BLE001 - judged just below
                if not is_transient(exc) or wait <= 0:
                    raise
                say_once(exc, 0)
            # The outage is timed from when this call met it, not from when the call began: an
            # upload that was under way for a minute still rides out the whole outage.
            return retry(call, timeout=wait, transient=is_transient, on_retry=say_once)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise UserError(describe_s3_error(exc, uri, self.s3, wait)) from exc

    # -- checks -------------------------------------------------------------------------------
    def check_bucket(self, uri: str) -> None:
        """Fail early, in words, on a wrong endpoint, wrong keys or a missing bucket. A listing is
        used rather than HEAD because only a request with a body tells why it failed. An endpoint
        that does not answer at the start is more likely a wrong address than an outage: this
        waits 15 s at most."""
        if not is_s3(uri):
            return
        bucket, prefix = split_s3(uri)
        self._s3_call(uri, self.client.list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1,
                      outage=min(15.0, self.s3.outage_seconds))

    # -- reading ------------------------------------------------------------------------------
    def size(self, uri: str) -> int | None:
        """Byte size, or None when the object/file does not exist."""
        found = self.stat(uri)
        return None if found is None else found[0]

    def stat(self, uri: str) -> tuple[int, str] | None:
        """(size, version) in one request: the version as list_detailed gives it (the ETag on
        S3, the mtime locally); None when the file does not exist."""
        if not is_s3(uri):
            self._request("head", uri)
            try:
                st = os.stat(uri)
            except FileNotFoundError:
                return None
            return st.st_size, str(st.st_mtime_ns)
        head = self._head(uri)
        return None if head is None else (head["ContentLength"], head.get("ETag", "").strip('"'))

    def _head(self, uri: str) -> dict | None:
        self._request("head", uri)
        bucket, key = split_s3(uri)
        try:
            return self._s3_call(uri, self.client.head_object, Bucket=bucket, Key=key)
        except UserError as exc:
            if s3_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, uri: str) -> bool:
        return self.size(uri) is not None

    def read_bytes(self, uri: str, offset: int = 0, length: int | None = None) -> bytes:
        if length == 0:
            return b""
        self._request("get", uri)
        if not is_s3(uri):
            with open(uri, "rb") as f:
                f.seek(offset)
                return self._count(f.read() if length is None else f.read(length))
        bucket, key = split_s3(uri)
        kwargs = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            kwargs["Range"] = f"bytes={offset}-{end}"
        return self._count(self._s3_call(uri, lambda: self.client.get_object(
            Bucket=bucket, Key=key, **kwargs)["Body"].read()))

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def stream(self, uri: str, chunk: int = 8 * 1024 * 1024) -> Iterator[bytes]:
        """The whole file, in chunks, in one sequential read."""
        self._request("get", uri)
        if not is_s3(uri):
            with open(uri, "rb") as f:
                while block := f.read(chunk):
                    yield self._count(block)
            return
        bucket, key = split_s3(uri)
        body = self._s3_call(uri, self.client.get_object, Bucket=bucket, Key=key)["Body"]
        for block in body.iter_chunks(chunk):
            yield self._count(block)

    def sha256(self, uri: str) -> str:
        if not is_s3(uri):
            return sha256_file(uri)
        h = hashlib.sha256()
        for block in self.stream(uri):
            h.update(block)
        return h.hexdigest()

    def list(self, uri: str) -> Iterator[tuple[str, int]]:
        """Every file below uri, recursively, as (path relative to uri with '/' separators, size)."""
        for rel, size, _ in self.list_detailed(uri):
            yield rel, size

    def list_detailed(self, uri: str) -> Iterator[tuple[str, int, str]]:
        """As list(), with a version tag per file (its ETag on S3, its mtime locally)."""
        self._request("list", uri)   # a page of up to 1,000 files on S3; a walk locally
        if not is_s3(uri):
            root = Path(uri)
            for dirpath, _, files in os.walk(root):
                for name in files:
                    full = Path(dirpath, name)
                    try:
                        st = full.stat()
                    except FileNotFoundError:
                        # gone since the walk named it (a part file renamed into place by
                        # another process): not in the folder, as S3's listing would not show it
                        continue
                    yield full.relative_to(root).as_posix(), st.st_size, str(st.st_mtime_ns)
            return
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        token = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._s3_call(uri, self.client.list_objects_v2, **kwargs)
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if rel and not rel.endswith("/"):
                    yield rel, obj["Size"], obj.get("ETag", "").strip('"')
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]
            self._request("list", uri)

    def open_range(self, uri: str, start: int = 0, size: int | None = None) -> "RangeReader":
        """Bytes [start, start + size) of uri as a read-only file; size None: to the end."""
        return RangeReader(self, uri, start, size)

    def download_file(self, uri: str, local_path: str | Path) -> None:
        """Copy to a local path atomically (temp file in the same folder, then rename)."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.", suffix=".part")
        os.close(fd)
        try:
            if is_s3(uri):
                bucket, key = split_s3(uri)
                self._s3_call(uri, self.client.download_file, bucket, key, tmp,
                              Config=self._transfer_config())
            else:
                shutil.copyfile(uri, tmp)
            with self._count_lock:
                self.bytes_read += os.path.getsize(tmp)
            os.replace(tmp, local_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- writing ------------------------------------------------------------------------------
    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        threshold = self.s3.multipart_threshold
        return TransferConfig(multipart_threshold=threshold,
                              multipart_chunksize=max(threshold // 2, 5 * 1024 * 1024))

    def upload_file(self, local_path: str | Path, uri: str) -> None:
        """Put a local file at uri; multipart above the settings' multipart_threshold bytes."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self._s3_call(uri, self.client.upload_file, str(local_path), bucket, key,
                          Config=self._transfer_config(), Callback=self._upload_hold(local_path))
            return
        self._write_local(uri, lambda tmp: shutil.copyfile(local_path, tmp))

    def _upload_hold(self, local_path):
        """Test hook: PIPELINE_TEST_UPLOAD_HOLD=FILE holds an upload in parts once its first
        bytes are sent, until FILE exists (FILE.held names the file): a test can kill the
        uploader while its upload is under way, however fast the machine."""
        path = os.environ.get(UPLOAD_HOLD_ENV)
        if not path or os.path.getsize(local_path) <= self.s3.multipart_threshold:
            return None
        once = threading.Lock()   # acquired by the first callback, of whichever part

        def sent(_bytes):
            if once.acquire(blocking=False):
                hold(path, os.path.basename(str(local_path)))
        return sent

    def write_bytes(self, uri: str, data: bytes) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self._s3_call(uri, self.client.put_object, Bucket=bucket, Key=key, Body=data)
            return
        self._write_local(uri, lambda tmp: Path(tmp).write_bytes(data))

    @staticmethod
    def _write_local(uri: str, write) -> None:
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            write(tmp)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # -- conditional writes (data/lease.py) --------------------------------------------------
    def version(self, uri: str) -> str | None:
        """What changes whenever the file is written (ETag on S3); None when it does not exist."""
        if not is_s3(uri):
            try:
                st = os.stat(uri)
            except FileNotFoundError:
                return None
            return f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}"
        head = self._head(uri)
        return None if head is None else head["ETag"]

    def write_if(self, uri: str, data: bytes, version: str | None) -> bool:
        """Write only if the file is still at `version` (None: does not exist yet); False when
        someone else wrote it first. S3 conditional writes (If-None-Match / If-Match); a lock
        file locally."""
        if not is_s3(uri):
            import fcntl

            folder = Path(uri).parent
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY)   # lock the folder: no lock file left behind
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if self.version(uri) != version:
                    return False
                self.write_bytes(uri, data)
                return True
            finally:
                os.close(fd)
        bucket, key = split_s3(uri)
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            self._s3_call(uri, lambda: self.client.put_object(Bucket=bucket, Key=key, Body=data,
                                                              **condition))
        except UserError as exc:
            if s3_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def abort_uploads(self, uri: str) -> int:
        """Abort the unfinished multipart uploads under an S3 prefix (left by a killed run)."""
        if not is_s3(uri):
            return 0
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        found = self._s3_call(uri, self.client.list_multipart_uploads, Bucket=bucket,
                              Prefix=prefix).get("Uploads", [])
        for up in found:
            self._s3_call(uri, self.client.abort_multipart_upload, Bucket=bucket, Key=up["Key"],
                          UploadId=up["UploadId"])
        return len(found)

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self._s3_call(uri, self.client.delete_object, Bucket=bucket, Key=key)
        else:
            Path(uri).unlink(missing_ok=True)

    # -- Ray ----------------------------------------------------------------------------------
    def for_ray(self, uri: str):
        """(storage_path, storage_filesystem) for Ray's RunConfig."""
        if not is_s3(uri):
            return absolute(uri), None
        bucket, prefix = split_s3(uri)
        return f"{bucket}/{prefix}".rstrip("/"), self.s3.pyarrow_filesystem(bucket)


class RangeReader:
    """A read-only, seekable file over bytes [start, start+size) of a local file or S3 object.

    Each read is one ranged read of exactly the bytes asked for, no more: this is what lets
    data/archives.py walk the headers of ILSVRC2012_img_train.tar on S3 (and of each per-class
    tar inside it, as a range of the outer one) reading 512 bytes per member, so that the
    archive is read about once in all when staging then reads each image.
    """

    def __init__(self, storage: Storage, uri: str, start: int = 0, size: int | None = None):
        self.storage, self.uri, self.start = storage, uri, start
        if size is None:   # a size given is trusted: no request to learn it
            total = storage.size(uri)
            if total is None:
                raise UserError(f"{uri}: not found")
            size = total - start
        self.length = size
        self.pos = 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        self.pos = {0: offset, 1: self.pos + offset, 2: self.length + offset}[whence]
        return self.pos

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.length - self.pos
        n = max(0, min(n, self.length - self.pos))
        data = self.storage.read_bytes(self.uri, self.start + self.pos, n)
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
