"""Can this machine's NVIDIA driver run torch's CUDA build? Asked once at each worker's start.

torch's wheels carry their own CUDA runtime (torch.version.cuda, 13.0 for torch 2.14's default
build) and rely on CUDA's minor-version compatibility: any driver of at least the major
release's minimum runs every minor version of it. With an older driver torch does not fail:
torch.cuda.is_available() turns False and the worker would train on its CPU, thousands of times
slower. So the driver's version is read from the driver itself (NVML, /proc, nvidia-smi), never
through torch's CUDA.

Imports only torch and the standard library (`pipeline bench gpu`, `pipeline preflight`).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from ..errors import UserError

# Minimum Linux driver per CUDA major release, for minor-version compatibility (NVIDIA's CUDA
# Toolkit release notes, table 3, and "CUDA Compatibility": 11.x >= 450.80.02, 12.x >= 525.60.13,
# 13.x >= 580, the 13.0 GA driver being 580.65.06).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.strip().split(".") if part.isdigit())


def min_driver(torch_cuda: str) -> str | None:
    """The oldest Linux driver that runs CUDA `torch_cuda` ("13.0"), None if not in the table."""
    major = _version(torch_cuda)[:1]
    return MIN_DRIVER.get(major[0]) if major else None


def driver_supports(torch_cuda: str | None, driver: str | None) -> str | None:
    """None when `driver` runs torch's CUDA build `torch_cuda` (or either is unknown: a CPU
    build, no driver found, a CUDA release newer than the table); else one line naming both
    versions and what to do."""
    if not torch_cuda or not driver:
        return None
    need = min_driver(torch_cuda)
    if need is None or not _version(driver) or _version(driver) >= _version(need):
        return None
    return (f"NVIDIA driver {driver} is too old for torch's CUDA {torch_cuda} build (needs driver "
            f">= {need}): use a GPU image whose driver is >= {need} (cluster.yaml pins one), "
            f"or install a torch build for an older CUDA")


def driver_version() -> str | None:
    """The loaded NVIDIA driver's version ("580.95.05"), None where there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            got = pynvml.nvmlSystemGetDriverVersion()
            return got.decode() if isinstance(got, bytes) else str(got)
        finally:
            pynvml.nvmlShutdown()
    except Exception:   # not installed, or no driver: the next source
        pass
    proc = Path("/proc/driver/nvidia/version")
    if proc.exists():
        version = driver_from_proc(proc.read_text(errors="replace"))
        if version:
            return version
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout.split()
            return out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def driver_from_proc(text: str) -> str | None:
    """The version in /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64 Kernel
    Module  580.95.05  Tue ..."; the open kernel module says "Open Kernel Module for x86_64")."""
    for line in text.splitlines():
        if line.startswith("NVRM version:"):
            for word in line.split():
                if word.count(".") >= 1 and _version(word) and word.replace(".", "").isdigit():
                    return word
    return None


def check_worker_gpu(torch_cuda: str | None, driver: str | None, gpus_assigned: bool) -> None:
    """At a worker's start: a UserError (the run ends, never retried) when the driver is too old
    for torch's CUDA, or when the worker was given GPUs but torch cannot use them."""
    line = driver_supports(torch_cuda, driver) if gpus_assigned else None
    if line:
        raise UserError(line)
    if gpus_assigned and not torch_cuda:
        raise UserError("this worker was given GPUs but torch is a CPU-only build "
                        f"(driver {driver or 'unknown'}): install torch's CUDA build")


def use_device(device) -> None:
    """This thread's current CUDA device (Ray Train sets the worker's; said again before the
    loaders are built, so no CUDA call of this process lands on GPU 0 by default)."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)


def one_gpu_type(names: list[str], accelerator_type: str) -> str | None:
    """None when every rank's device (`names`, rank order) is the same type, or the run allows
    a mix (accelerator_type 'any'); else one line naming the types and what to set. A DDP group
    steps at its slowest GPU's pace, and a batch sized for the largest GPU does not fit the
    smallest."""
    kinds = sorted(set(names))
    if len(kinds) <= 1 or accelerator_type == "any":
        return None
    counts = ", ".join(f"{names.count(k)} x {k}" for k in kinds)
    return (f"the workers got different GPUs ({counts}): one GPU type per run; set "
            "accelerator_type (e.g. --accelerator-type A10G) to place the run on one type, or "
            "--accelerator-type any to allow the mix")


def loader_threads(setting: int, cpus_per_worker: int, node_cpus: int, node_gpus: int,
                   on_gpu: bool) -> int:
    """FFCV decode threads per worker: the setting when given; on a GPU worker the node's CPUs
    per GPU (FFCV's reference: 12 per A100 on a p4d, 96 vCPUs for 8 GPUs; a g5.12xlarge has 48
    for 4), at least cpus_per_worker; on a CPU worker cpus_per_worker (its CPUs also train)."""
    if setting:
        return setting
    if not on_gpu or node_gpus < 1:
        return cpus_per_worker
    return max(cpus_per_worker, node_cpus // node_gpus)
