"""The S3 side of storage: where S3 is (S3Settings: endpoint, region, outage budget, multipart
threshold; never a key in a pickle), the region a bucket is in, and what an S3 error means (an
outage worth waiting for, a throttle, or a mistake to say in words). storage.Storage calls it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import urlparse

from .errors import UserError

DEFAULT_OUTAGE_SECONDS = 180.0


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{uri}: not an S3 URI (expected s3://bucket/prefix)")
    return parsed.netloc, parsed.path.lstrip("/")


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is. Endpoint and region default to the standard AWS variables. Keys given here
    explicitly (tests, one-off scripts) stay in this process: they are dropped when the settings
    are pickled, and the other side uses the keys of its own environment."""

    endpoint_url: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None
    outage_seconds: float = DEFAULT_OUTAGE_SECONDS
    multipart_threshold: int = 64 * 1024 * 1024   # files above it are uploaded in parts

    def __getstate__(self):
        return {"endpoint_url": self.endpoint_url, "region": self.region,
                "outage_seconds": self.outage_seconds,
                "multipart_threshold": self.multipart_threshold,
                "access_key": None, "secret_key": None}

    def __setstate__(self, state):
        for key, value in state.items():
            object.__setattr__(self, key, value)

    @classmethod
    def from_env(cls, endpoint_url=None, region=None, outage_seconds=None) -> "S3Settings":
        env = os.environ
        return cls(
            endpoint_url=endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION"),
            outage_seconds=DEFAULT_OUTAGE_SECONDS if outage_seconds is None else outage_seconds,
            multipart_threshold=int(env.get("PIPELINE_MULTIPART_THRESHOLD", 64 * 1024 * 1024)))

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region or "us-east-1",
            config=Config(retries={"max_attempts": 3, "mode": "standard"},
                          connect_timeout=5, read_timeout=60, max_pool_connections=32))

    def pyarrow_filesystem(self, bucket: str | None = None, resolve=None):
        """For Ray's storage_filesystem, writing into `bucket`. pyarrow ignores AWS_ENDPOINT_URL,
        so the endpoint is handed over; keys are not: pyarrow reads them from the environment
        where it runs. The region is the bucket's own (see pyarrow_region)."""
        import pyarrow.fs

        kwargs = {"region": pyarrow_region(self.region, self.endpoint_url, bucket,
                                           resolve or bucket_region)}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        return pyarrow.fs.S3FileSystem(**kwargs)


def is_aws_endpoint(endpoint_url: str | None) -> bool:
    """No endpoint (boto3's default), or one of AWS's own (s3.us-west-2.amazonaws.com, ...)."""
    if not endpoint_url:
        return True
    host = urlparse(endpoint_url if "://" in endpoint_url else f"//{endpoint_url}").hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn")) or host == "amazonaws.com"


def pyarrow_region(region: str | None, endpoint_url: str | None, bucket: str | None,
                   resolve) -> str:
    """The region pyarrow must address `bucket` in. pyarrow does not follow S3's redirects to a
    bucket's region (boto3 does: its calls work whatever the region), so on AWS, with no region
    given, it is asked of S3 (resolve(bucket): pyarrow.fs.resolve_s3_region); a region given is
    used as given. A custom endpoint (SeaweedFS, MinIO) takes the region given, else us-east-1,
    and is never asked: resolving talks to AWS."""
    if region or not is_aws_endpoint(endpoint_url) or not bucket:
        return region or "us-east-1"
    try:
        return resolve(bucket)
    except (OSError, ValueError) as exc:
        print(f"[s3] warning: the region of bucket {bucket} could not be found ({exc}); using "
              "us-east-1: set AWS_DEFAULT_REGION (or --s3-region) to the bucket's region",
              file=sys.stderr, flush=True)
        return "us-east-1"


@lru_cache(maxsize=64)
def bucket_region(bucket: str) -> str:
    import pyarrow.fs

    return pyarrow.fs.resolve_s3_region(bucket)


TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown",
                   "RequestTimeout", "RequestTimeTooSkewed"}


def is_transient(exc: BaseException) -> bool:
    """An outage (endpoint down, timeouts, 5xx): worth waiting for. Wrong keys are not."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError

    while exc is not None:   # boto3's transfers wrap the client's error in their own
        if isinstance(exc, (BotoConnectionError, ConnectionError, TimeoutError)):
            return True   # refused, closed, timed out
        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code", "")) in TRANSIENT_CODES
        exc = exc.__cause__ or exc.__context__
    return False


def s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind a UserError that a failed call became."""
    from botocore.exceptions import ClientError

    cause = exc.__cause__
    return str(cause.response.get("Error", {}).get("Code")) if isinstance(cause, ClientError) else None


def describe_s3_error(exc: Exception, uri: str, settings: S3Settings, waited: float = 0) -> str:
    """Say in words what an S3 failure means and what to do; never include a key."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    inner = exc   # boto3's transfers wrap the client's error in their own
    while inner is not None and not isinstance(inner, (ClientError, BotoCoreError)):
        inner = inner.__cause__ or inner.__context__
    exc = inner or exc
    where = settings.endpoint_url or "AWS S3"
    if is_transient(exc) and not isinstance(exc, ClientError):
        return (f"{uri}: cannot reach the S3 endpoint {where} (waited {waited:.0f} s): is the "
                "server running and AWS_ENDPOINT_URL (or --s3-endpoint-url) right?")
    if isinstance(exc, NoCredentialsError):
        return (f"{uri}: no S3 credentials here: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "where this runs (on a cluster: in the environment of its nodes, an instance "
                "profile or a Kubernetes secret)")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0] if is_s3(uri) else uri
        if code == "SignatureDoesNotMatch":
            return (f"{uri}: S3 at {where} rejected the request signature (SignatureDoesNotMatch): "
                    "the secret key does not match the access key; check AWS_SECRET_ACCESS_KEY")
        if code == "InvalidAccessKeyId":
            return (f"{uri}: S3 at {where} does not know this access key (InvalidAccessKeyId): "
                    "check AWS_ACCESS_KEY_ID")
        if code == "NoSuchBucket":
            return f"{uri}: bucket '{bucket}' does not exist at {where}; create it first"
        if code in ("AccessDenied", "403", "Forbidden"):
            return (f"{uri}: access denied by S3 at {where} (wrong keys, or these keys may not "
                    "use this bucket)")
        if code in ("404", "NoSuchKey", "NotFound"):
            return f"{uri}: not found"
        if code in TRANSIENT_CODES:
            return f"{uri}: S3 at {where} kept answering {code} for {waited:.0f} s; try again later"
        return f"{uri}: S3 at {where} answered {code or 'an error'}"
    return f"{uri}: {exc}"


# S3 serves about this many GET/HEAD requests per second under one prefix before it answers
# 503 SlowDown (AWS's published figure is 5,500): listing stays under it, shared by its jobs
PREFIX_GETS_PER_S = 5500


def is_throttled(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in (
        "SlowDown", "503", "Throttling", "ThrottlingException", "RequestLimitExceeded")
