"""Local paths and s3://bucket/prefix behind one small interface.

Every stage takes URIs; this module is the only place that knows the difference. Writes are
atomic on both sides (local: temp file + rename; S3: objects appear only once complete), so a
reader never sees a half-written file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from .errors import UserError

MULTIPART_THRESHOLD = int(os.environ.get("PIPELINE_MULTIPART_THRESHOLD", 64 * 1024 * 1024))


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return str(Path(uri, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{uri}: not an S3 URI (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach S3. Defaults come from the standard AWS variables; the secret never
    appears in repr(), so settings can be logged or shipped to Ray tasks safely."""

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url=None, access_key=None, secret_key=None, region=None) -> "S3Settings":
        env = os.environ
        return cls(
            endpoint_url=endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            access_key=access_key or env.get("AWS_ACCESS_KEY_ID"),
            secret_key=secret_key or env.get("AWS_SECRET_ACCESS_KEY"),
            region=region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION"),
        )

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region or "us-east-1",
            config=Config(retries={"max_attempts": 5, "mode": "standard"},
                          connect_timeout=5, read_timeout=60, max_pool_connections=32),
        )


def describe_s3_error(exc: Exception, uri: str, settings: S3Settings) -> str:
    """Say in words what an S3 failure means and what to do; never include a key."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = settings.endpoint_url or "AWS S3"
    if isinstance(exc, EndpointConnectionError) or type(exc).__name__ in (
            "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
        return (f"{uri}: cannot reach the S3 endpoint {where}: is the server running and "
                "AWS_ENDPOINT_URL (or --s3-endpoint-url) right?")
    if isinstance(exc, NoCredentialsError):
        return (f"{uri}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or use an instance profile)")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0] if is_s3(uri) else uri
        if code == "SignatureDoesNotMatch":
            return (f"{uri}: S3 at {where} rejected the request signature (SignatureDoesNotMatch): "
                    "the secret key does not match the access key; check AWS_SECRET_ACCESS_KEY")
        if code == "InvalidAccessKeyId":
            return (f"{uri}: S3 at {where} does not know this access key (InvalidAccessKeyId): "
                    "check AWS_ACCESS_KEY_ID")
        if code in ("NoSuchBucket",):
            return f"{uri}: bucket '{bucket}' does not exist at {where}; create it first"
        if code in ("AccessDenied", "403", "Forbidden"):
            return (f"{uri}: access denied by S3 at {where} (wrong keys, or these keys may not "
                    "use this bucket)")
        if code in ("404", "NoSuchKey", "NotFound"):
            return f"{uri}: not found"
        return f"{uri}: S3 at {where} answered {code or 'an error'}"
    return f"{uri}: {exc}"


class Storage:
    """Read, list and write under local paths and S3 URIs. One boto3 client per instance."""

    def __init__(self, s3: S3Settings | None = None):
        self.s3 = s3 or S3Settings.from_env()
        self._client = None

    def __getstate__(self):
        # Shipped to Ray tasks: the settings travel, the boto3 client is rebuilt on the other side.
        return {"s3": self.s3, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = self.s3.client()
        return self._client

    def _s3_call(self, uri, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise UserError(describe_s3_error(exc, uri, self.s3)) from exc

    # -- checks -------------------------------------------------------------------------------
    def check_bucket(self, uri: str) -> None:
        """Fail early, in words, on a wrong endpoint, wrong keys or a missing bucket. A listing is
        used rather than HEAD because only a request with a body tells why it failed."""
        if not is_s3(uri):
            return
        bucket, prefix = split_s3(uri)
        self._s3_call(uri, self.client.list_objects_v2, Bucket=bucket, Prefix=prefix, MaxKeys=1)

    # -- reading ------------------------------------------------------------------------------
    def size(self, uri: str) -> int | None:
        """Byte size, or None when the object/file does not exist."""
        if not is_s3(uri):
            try:
                return os.stat(uri).st_size
            except FileNotFoundError:
                return None
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return self.client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise UserError(describe_s3_error(exc, uri, self.s3)) from exc

    def exists(self, uri: str) -> bool:
        return self.size(uri) is not None

    def read_bytes(self, uri: str, offset: int = 0, length: int | None = None) -> bytes:
        if not is_s3(uri):
            with open(uri, "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        bucket, key = split_s3(uri)
        kwargs = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            if length == 0:
                return b""
            kwargs["Range"] = f"bytes={offset}-{end}"
        resp = self._s3_call(uri, self.client.get_object, Bucket=bucket, Key=key, **kwargs)
        return resp["Body"].read()

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def list(self, uri: str) -> Iterator[tuple[str, int]]:
        """Every file below uri, recursively, as (path relative to uri with '/' separators, size)."""
        if not is_s3(uri):
            root = Path(uri)
            for dirpath, _, files in os.walk(root):
                for name in files:
                    full = Path(dirpath, name)
                    yield full.relative_to(root).as_posix(), full.stat().st_size
            return
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if rel and not rel.endswith("/"):
                        yield rel, obj["Size"]
        except (ClientError, BotoCoreError) as exc:
            raise UserError(describe_s3_error(exc, uri, self.s3)) from exc

    def open_range(self, uri: str) -> "RangeReader":
        return RangeReader(self, uri)

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
            os.replace(tmp, local_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- writing ------------------------------------------------------------------------------
    @staticmethod
    def _transfer_config():
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                              multipart_chunksize=max(MULTIPART_THRESHOLD // 2, 5 * 1024 * 1024))

    def upload_file(self, local_path: str | Path, uri: str) -> None:
        """Put a local file at uri; multipart above MULTIPART_THRESHOLD bytes."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self._s3_call(uri, self.client.upload_file, str(local_path), bucket, key,
                          Config=self._transfer_config())
            return
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_bytes(self, uri: str, data: bytes) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self._s3_call(uri, self.client.put_object, Bucket=bucket, Key=key, Body=data)
            return
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self._s3_call(uri, self.client.delete_object, Bucket=bucket, Key=key)
        else:
            Path(uri).unlink(missing_ok=True)


class RangeReader:
    """A read-only, seekable file object over a local file or an S3 object, fetching S3 in blocks.

    This is what lets `tarfile` walk ILSVRC2012_img_train.tar on S3 without downloading it: the
    tar headers are read through block-sized range requests and the member data is skipped.
    """

    BLOCK = 1024 * 1024

    def __init__(self, storage: Storage, uri: str):
        self.storage, self.uri = storage, uri
        self.length = storage.size(uri)
        if self.length is None:
            raise UserError(f"{uri}: not found")
        self.pos = 0
        self._block_start, self._block = -1, b""
        self._local = None if is_s3(uri) else open(uri, "rb")

    def seekable(self):
        return True

    def readable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        if whence == 0:
            self.pos = offset
        elif whence == 1:
            self.pos += offset
        else:
            self.pos = self.length + offset
        return self.pos

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.length - self.pos
        n = max(0, min(n, self.length - self.pos))
        if self._local is not None:
            self._local.seek(self.pos)
            data = self._local.read(n)
        elif n > self.BLOCK:
            data = self.storage.read_bytes(self.uri, self.pos, n)
        else:
            out = bytearray()
            pos = self.pos
            while len(out) < n:
                if not (self._block_start <= pos < self._block_start + len(self._block)):
                    self._block_start = pos - pos % self.BLOCK
                    self._block = self.storage.read_bytes(
                        self.uri, self._block_start, min(self.BLOCK, self.length - self._block_start))
                start = pos - self._block_start
                chunk = self._block[start:start + n - len(out)]
                out += chunk
                pos += len(chunk)
            data = bytes(out)
        self.pos += len(data)
        return data

    def close(self):
        if self._local is not None:
            self._local.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
