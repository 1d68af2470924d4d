"""One GPU type per run, the shipped configs on the shipped cluster's GPUs, and FFCV's threads
from the node's CPUs per GPU."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import Resources, TrainConfig, load_yaml
from pipeline.training.cluster import worker_bundle
from pipeline.training.gpu_env import loader_threads, one_gpu_type
from pipeline.training.trainer import lr_at

ROOT = Path(__file__).resolve().parents[2]


def test_one_gpu_type_per_run_unless_asked():
    assert one_gpu_type(["NVIDIA A10G"] * 8, "") is None
    assert one_gpu_type(["cpu", "cpu"], "") is None
    mixed = ["NVIDIA A10G"] * 4 + ["NVIDIA A100-SXM4-40GB"] * 8
    line = one_gpu_type(mixed, "")
    assert line and "\n" not in line and "4 x NVIDIA A10G" in line
    assert "8 x NVIDIA A100-SXM4-40GB" in line and "--accelerator-type" in line
    assert one_gpu_type(mixed, "any") is None


def test_the_accelerator_type_places_workers_on_that_type_only():
    assert worker_bundle(Resources(gpus_per_worker=1, cpus_per_worker=5,
                                   accelerator_type="A10G")) == {
        "CPU": 5.0, "GPU": 1, "accelerator_type:A10G": 0.001}
    for anything in ("", "any"):
        assert worker_bundle(Resources(gpus_per_worker=1, accelerator_type=anything)) == {
            "CPU": 1.0, "GPU": 1}
    # a CPU run has no GPU to type
    assert worker_bundle(Resources(accelerator_type="A10G")) == {"CPU": 1.0}


@pytest.mark.parametrize("setting,cpus,node_cpus,node_gpus,on_gpu,want", [
    (0, 5, 96, 8, True, 12),     # p4d.24xlarge: FFCV's reference, 12 per A100
    (0, 5, 48, 4, True, 12),     # g5.12xlarge
    (0, 5, 16, 4, True, 5),      # fewer CPUs per GPU than the reservation: the reservation
    (0, 2, 8, 0, False, 2),      # CPU workers: their CPUs also train
    (7, 5, 96, 8, True, 7),      # asked for
])
def test_loader_threads(setting, cpus, node_cpus, node_gpus, on_gpu, want):
    assert loader_threads(setting, cpus, node_cpus, node_gpus, on_gpu) == want


def _train(name: str) -> TrainConfig:
    return TrainConfig(**load_yaml(str(ROOT / "jobs/configs" / name))["train"])


def test_each_shipped_gpu_config_names_a_gpu_type_of_the_shipped_clusters():
    """Every GPU config is placed on one GPU type that cluster.yaml's node types offer (and the
    RayJob's worker group for the config it runs); the A10G config's batch is the one the
    README estimates fits 24 GB, the A100's the reference's; the lr per 256 images is the same,
    so each run's peak lr follows its global batch."""
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    offered = {k.split(":", 1)[1] for t in cluster["available_node_types"].values()
               for k in t.get("resources", {}) if k.startswith("accelerator_type:")}
    assert offered == {"A10G", "A100"}
    configs = {p.name: _train(p.name) for p in (ROOT / "jobs/configs").glob("*.yaml")}
    gpu = {n: c for n, c in configs.items() if c.resources.gpus_per_worker}
    assert set(gpu) >= {"imagenet-resnet50.yaml", "imagenet-resnet50-a10g.yaml"}
    for name, cfg in gpu.items():
        assert cfg.resources.accelerator_type in offered, name
    a100, a10g = gpu["imagenet-resnet50.yaml"], gpu["imagenet-resnet50-a10g.yaml"]
    assert a100.recipe.batch_size == 512 and a10g.recipe.batch_size == 384
    assert a10g.resources.accelerator_type == "A10G" and a100.recipe.lr == a10g.recipe.lr
    peak = lambda c: lr_at(c.recipe, c.recipe.lr_peak_epoch, c.global_batch)  # noqa: E731
    assert peak(a10g) / peak(a100) == pytest.approx(384 / 512)
    rayjob = (ROOT / "infra/k8s/rayjob.yaml").read_text()
    assert "jobs/configs/imagenet-resnet50-a10g.yaml" in rayjob and "groupName: gpu-a10g" in rayjob
