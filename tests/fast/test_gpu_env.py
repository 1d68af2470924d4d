"""The driver check at each worker's start: torch's CUDA build against the NVIDIA driver."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.training import gpu_env
from pipeline.training.gpu_env import (check_worker_gpu, driver_from_proc, driver_supports,
                                       min_driver, use_device)


@pytest.mark.parametrize("cuda,driver,ok", [
    ("13.0", "580.65.06", True), ("13.0", "580.95.05", True), ("13.0", "590.1", True),
    ("13.0", "575.57.08", False), ("13.0", "470.256.02", False),   # DLAMI Ubuntu 18.04 V71: 11.2
    ("13.2", "580.65.06", True),   # minor-version compatibility within 13.x
    ("12.8", "525.60.13", True), ("12.8", "525.60.12", False), ("12.1", "535.183.01", True),
    ("11.8", "450.80.02", True), ("11.8", "450.36.06", False),
    ("13.0", "", True), ("13.0", None, True),   # no driver found: nothing to say
    (None, "470.1", True), ("", "470.1", True),   # CPU build of torch
    ("14.0", "400.1", True),   # newer than the table: not refused on a guess
])
def test_driver_supports(cuda, driver, ok):
    line = driver_supports(cuda, driver)
    if ok:
        assert line is None
    else:
        assert line is not None and "\n" not in line
        assert f"driver {driver}" in line and f"CUDA {cuda}" in line and min_driver(cuda) in line


def test_min_driver_table():
    assert min_driver("13.0") == "580.65.06" and min_driver("12.4") == "525.60.13"
    assert min_driver("11.2") == "450.80.02" and min_driver("10.2") is None
    # numeric, not textual comparison: 1000 > 999, 580.100 > 580.65
    assert driver_supports("13.0", "1000.1") is None and driver_supports("13.0", "580.100.1") is None
    assert driver_supports("12.0", "99.99") is not None


def test_the_worker_check_ends_the_run_in_one_line():
    with pytest.raises(UserError, match=r"driver 535\.183\.01 is too old for torch's CUDA 13\.0"):
        check_worker_gpu("13.0", "535.183.01", gpus_assigned=True)
    check_worker_gpu("13.0", "535.183.01", gpus_assigned=False)   # a CPU worker: no GPU to run
    check_worker_gpu("13.0", "580.95.05", gpus_assigned=True)
    with pytest.raises(UserError, match="CPU-only build"):
        check_worker_gpu(None, "580.95.05", gpus_assigned=True)


def test_driver_version_from_proc():
    closed = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May  2 14:37:44 UTC 2024\n"
              "GCC version:  gcc version 7.5.0")
    opened = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs-builder@U22)\n"
    assert driver_from_proc(closed) == "470.256.02"
    assert driver_from_proc(opened) == "580.95.05"
    assert driver_from_proc("") is None


def test_driver_version_here_is_none_or_a_version():
    got = gpu_env.driver_version()
    assert got is None or driver_from_proc(f"NVRM version: X  {got}  y") == got


def test_use_device_leaves_a_non_cuda_device_alone():
    use_device(torch.device("cpu"))
    use_device(torch.device("meta"))


def test_the_cluster_definitions_agree_on_the_ray_image_torch_and_the_driver():
    """Every node type names its AMI (else Ray's default: CUDA 11.2, too old for torch's CUDA
    13.0 build); the AMI line's driver and the pinned torch build are said together; the
    Dockerfile and RayJob use cluster.yaml's Ray image."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    cluster = yaml.safe_load((root / "cluster.yaml").read_text())
    amis = {t["node_config"].get("ImageId") for t in cluster["available_node_types"].values()}
    assert len(amis) == 1 and None not in amis and amis.pop().startswith("resolve:ssm:")
    image = cluster["docker"]["image"]
    assert f"FROM {image}" in (root / "infra/k8s/Dockerfile").read_text()
    assert f"FROM {image}" in (root / "infra/k8s/rayjob.yaml").read_text()
    pyproject = (root / "pyproject.toml").read_text()
    assert '"torch==2.14.1"' in pyproject and "2.60" in image and '"ray[default,train,tune]>=2.60,<2.61"' in pyproject
    assert "driver >= 580.65.06" in (root / "cluster.yaml").read_text() and min_driver("13.0") == "580.65.06"
