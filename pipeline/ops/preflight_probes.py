"""What `pipeline preflight` measures on a node: facts and figures, no verdicts (those are the
plain functions of preflight.py). Each probe has its own bound in bytes and seconds. Only the
standard library and torch are imported at the top: `pipeline bench gpu` runs gpu_lines() where
neither Ray nor boto3 is installed."""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

S3_READ_BYTES = 256 << 20      # per node; stops earlier at S3_READ_SECONDS
S3_READ_SECONDS = 5.0
S3_CHUNK = 8 << 20             # one ranged GET, as the node cache fetches in big sequential reads
S3_THREADS = 4                 # node_cache.FETCH_THREADS
DISK_WRITE_BYTES = 512 << 20   # stops earlier at DISK_WRITE_SECONDS
DISK_WRITE_SECONDS = 3.0
METADATA_TIMEOUT = 1.0         # off a cloud VM nothing answers at the link-local address


# -- GPUs and the driver --------------------------------------------------------------------------
def nvidia_smi(timeout: float = 10.0) -> tuple[list[str] | None, str | None, str]:
    """(GPU names, driver version, error): what the NVIDIA driver lists, whatever
    CUDA_VISIBLE_DEVICES says; (None, None, why) without a driver."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None, None, "no nvidia-smi"
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, None, f"nvidia-smi failed: {str(exc).splitlines()[0][:200]}"
    rows = [[v.strip() for v in line.split(",")] for line in out.splitlines() if line.strip()]
    return [r[0] for r in rows], (rows[0][1] if rows and len(rows[0]) > 1 else None), ""


def cuda_driver_version() -> int | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion, e.g. 12040), without
    creating a CUDA context."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        return version.value if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 else None
    except OSError:
        return None


def matmul(device, n: int | None = None, iters: int | None = None) -> dict:
    """bf16 on a GPU (fp32 on the CPU): TFLOP/s, and the product's error against float64 on a
    slice (a faulty GPU or a broken driver computes wrongly, not only slowly)."""
    import torch

    cuda = device.type == "cuda"
    n, iters = n or (8192 if cuda else 512), iters or (20 if cuda else 3)
    dtype = torch.bfloat16 if cuda else torch.float32
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            c = a @ b
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            c = a @ b
        sync(device)
        seconds = time.perf_counter() - start
        ref = a[:64].double() @ b.double()
        err = ((c[:64].double() - ref).norm() / ref.norm()).item()
    except Exception as exc:   # noqa: BLE001 - a CUDA error is the finding
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return {"dtype": str(dtype).removeprefix("torch."),
            "tflops": 2 * n ** 3 * iters / seconds / 1e12, "rel_err": err}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_lines() -> list[str]:
    """The preflight's GPU checks on this machine (for `pipeline bench gpu`)."""
    import torch

    from .preflight import driver_check, gpu_check, matmul_check

    names, driver, why = nvidia_smi()
    gpus = torch.cuda.device_count()
    checks = [gpu_check("here", gpus, names, why),
              driver_check("here", gpus, driver, cuda_driver_version(), torch.version.cuda)]
    for i in range(gpus):
        checks.append(matmul_check(f"cuda:{i}", matmul(torch.device("cuda", i))))
    return [f"{c.name} {c.node}: {c.status}: {c.result}" + (f": {c.fix}" if c.fix else "")
            for c in checks]


# -- storage, disk, cloud -------------------------------------------------------------------------
def read_dataset(storage, data: str, seconds: float = S3_READ_SECONDS,
                 max_bytes: int = S3_READ_BYTES) -> dict:
    """The manifest, then ranged reads over the largest shards from S3_THREADS threads."""
    from ..data.manifest import read_manifest
    from ..storage import is_s3, join, split_s3

    try:
        manifest = read_manifest(storage, data)
        region = None
        if is_s3(data):
            head = storage.client.head_bucket(Bucket=split_s3(data)[0])
            region = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
                "x-amz-bucket-region") or head.get("BucketRegion")
    except Exception as exc:   # noqa: BLE001 - the finding, in words
        return {"error": error_words(exc, data, storage)}
    shards = sorted((s for split in manifest.splits.values() for s in split.shards),
                    key=lambda s: -s.bytes)
    ranges, total = [], [0]
    for shard in shards:
        for off in range(0, shard.bytes, S3_CHUNK):
            if max_bytes > 0:
                ranges.append((join(data, shard.path), off, min(S3_CHUNK, shard.bytes - off)))
                max_bytes -= ranges[-1][2]
    lock, errors, stop = threading.Lock(), [], time.monotonic() + seconds

    def reader():
        while time.monotonic() < stop:
            with lock:
                if not ranges:
                    return
                uri, off, size = ranges.pop(0)
            try:
                got = len(storage.read_bytes(uri, off, size))
            except Exception as exc:   # noqa: BLE001
                errors.append(error_words(exc, uri, storage))
                return
            with lock:
                total[0] += got

    start = time.monotonic()
    threads = [threading.Thread(target=reader, daemon=True) for _ in range(S3_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    if errors:
        return {"error": errors[0]}
    return {"bytes": total[0], "seconds": time.monotonic() - start, "bucket_region": region,
            "shards": [s.bytes for s in shards]}


def error_words(exc: Exception, uri: str, storage) -> str:
    from ..errors import UserError
    from ..storage import describe_s3_error

    if isinstance(exc, UserError):
        return str(exc)
    return describe_s3_error(exc, uri, storage.s3)


def write_cache_disk(cache_dir: str, seconds: float = DISK_WRITE_SECONDS,
                     max_bytes: int = DISK_WRITE_BYTES) -> dict:
    """Free space, and sequential writes to the node cache folder flushed to the disk (fsync), as
    the cache's shard fetch writes; the file is removed again."""
    from ..data.node_cache import cache_root

    try:
        folder = cache_root(cache_dir)
        free = shutil.disk_usage(folder).free
        path = folder / f".preflight-{os.getpid()}"
        block, written = os.urandom(4 << 20), 0
        start = time.monotonic()
        try:
            with open(path, "wb") as f:
                while written < max_bytes and time.monotonic() - start < seconds:
                    written += f.write(block)
                f.flush()
                os.fsync(f.fileno())
            took = time.monotonic() - start
        finally:
            path.unlink(missing_ok=True)
    except Exception as exc:   # noqa: BLE001 - UserError, OSError (read-only, full): the finding
        return {"error": str(exc).splitlines()[0][:300]}
    return {"folder": str(folder), "free": free, "bytes": written, "seconds": took}


def instance_facts(endpoint: str | None) -> dict:
    """{market: 'spot' | 'on-demand' | None, region}: from the cloud's instance metadata (AWS
    IMDSv2, GCP); both None off a cloud VM."""
    from .spot_agent import DEFAULT_ENDPOINT, Metadata, MetadataUnavailable

    md = Metadata(endpoint or DEFAULT_ENDPOINT, METADATA_TIMEOUT)
    try:
        status, _, token = md.request("PUT", "/latest/api/token",
                                      {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        if status == 200 and token.strip():
            auth = {"X-aws-ec2-metadata-token": token.strip()}
            s1, _, life = md.request("GET", "/latest/meta-data/instance-life-cycle", auth)
            s2, _, region = md.request("GET", "/latest/meta-data/placement/region", auth)
            return {"market": life.strip() if s1 == 200 else None,
                    "region": region.strip() if s2 == 200 else None}
        flavor = {"Metadata-Flavor": "Google"}
        status, _, body = md.request("GET", "/computeMetadata/v1/instance/scheduling/preemptible",
                                     flavor)
        if status == 200:
            return {"market": "spot" if body.strip().upper() == "TRUE" else "on-demand",
                    "region": None}
    except MetadataUnavailable:
        pass
    return {"market": None, "region": None}


def spot_agent_pid(folder: str | None = None) -> int | None:
    """The PID of a live `pipeline spot-agent` on this machine: the one its lock file names
    (spot_agent.hold_lock), if that process still is a spot agent. Read only: taking the lock to
    test it could make an agent starting at that moment leave."""
    folder = folder or tempfile.gettempdir()
    for path in glob.glob(os.path.join(folder, "pipeline-spot-agent*.lock")):
        try:
            pid = int(open(path).read(32).strip() or 0)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if pid and b"spot-agent" in f.read():
                    return pid
        except (OSError, ValueError):
            continue
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
