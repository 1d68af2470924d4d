"""`pipeline run` (one config, resumable chain), `pipeline submit` to a `ray start --head` cluster,
and the deployment files (cluster.yaml, KubeRay, job entrypoints, README reference)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import PIPELINE, last_json, mlflow_client, run_cli

pytestmark = pytest.mark.slow   # real services / Ray clusters


ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = {"arch": "resnet18", "epochs": 2, "batch_size": 16, "lr": 0.4, "lr_peak_epoch": 1,
              "min_res": 32, "max_res": 32, "start_ramp": 0, "end_ramp": 0, "val_res": 32,
              "num_workers": 1}


def write_config(path: Path, source: str, work: Path, tune: bool, model: str) -> Path:
    cfg = {"stage": {"source": source, "dest": str(work / "staged"), "max_resolution": 64,
                     "shard_size": 200},
           "train": {**TINY_TRAIN, "storage": str(work / "runs"), "cache_dir": str(work / "cache"),
                     "worker_resources": {"trainer": 1}},
           "register": {"model": model}}
    if tune:
        cfg["tune"] = {"name": "sweep", "trials": 1, "scheduler": "none",
                       "search_space": {"lr": {"grid": [0.4, 0.2]}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_chain_then_rerun_resumes_without_redoing(train_data, ray_cluster, tmp_path):
    source = str(Path(train_data).parent / "src")
    config = write_config(tmp_path / "tiny.yaml", source, tmp_path, tune=True, model="run-model")
    env = {"RAY_ADDRESS": ray_cluster.address}
    first = run_cli("run", "--config", config, "--json", env=env)
    out = last_json(first.stdout)
    assert out["dataset"] == str(tmp_path / "staged") and out["model_version"] == "1"
    assert out["alias"] == "champion" and out["val_top1"] > 0.5
    assert "plot:" in first.stdout and "checkpoint:" in first.stdout

    again = run_cli("run", "--config", config, "--json", env=env)
    assert "[stage] skipped" in again.stdout
    assert "already registered as run-model version 1" in again.stdout
    runs = tmp_path / "runs" / "sweep" / "runs"
    for trial in runs.iterdir():   # finished trials were not trained again
        assert len(list((trial / "events").glob("*-driver_start-*"))) == 1
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    assert len(client.search_model_versions("name = 'run-model'")) == 1

    only = last_json(run_cli("run", "--config", config, "--only", "register", "--json", env=env).stdout)
    assert only["model_version"] == "1"


def test_submit_to_a_ray_start_head(ray_head, train_data, tmp_path):
    source = str(Path(train_data).parent / "src")
    config = write_config(tmp_path / "job.yaml", source, tmp_path, tune=False, model="job-model")
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["worker_resources"] = {}
    config.write_text(yaml.safe_dump(cfg))
    tracking = f"sqlite:///{tmp_path / 'job-mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": tracking, "AWS_SECRET_ACCESS_KEY": "not-printed-secret-42"}
    proc = run_cli("submit", "--address", ray_head, "--", "run", "--config", config, env=env,
                   timeout=900)
    assert "SUCCEEDED" in proc.stdout
    assert "not-printed-secret-42" not in proc.stdout + proc.stderr
    assert "AWS_SECRET_ACCESS_KEY" in proc.stdout   # named as passed, never shown
    version = mlflow_client(tracking).get_model_version_by_alias("job-model", "champion")
    assert str(version.version) == "1"


def test_submit_failure_exits_nonzero(ray_head, tmp_path):
    proc = run_cli("submit", "--address", ray_head, "--", "train", "--data", tmp_path / "nothing",
                   check=False, timeout=300)
    assert proc.returncode == 1 and "FAILED" in proc.stdout
    assert "manifest.json is missing" in proc.stdout


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    for remote, local in cfg["file_mounts"].items():
        assert (ROOT / local).exists(), local
    commands = " ".join(cfg["setup_commands"])
    assert "pip install" in commands and (ROOT / "pyproject.toml").exists()
    apt = re.search(r"^APT_PKGS := (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert all(pkg in commands for pkg in apt)   # the same system libraries as make install
    gpu = [t for t in cfg["available_node_types"].values()
           if t["node_config"]["InstanceType"].startswith(("g5.", "p4d."))]
    assert gpu and all("Arn" in t["node_config"]["IamInstanceProfile"] for t in gpu)
    assert "aws_access_key" not in (ROOT / "cluster.yaml").read_text().lower()


def test_kuberay_job_runs_the_pipeline_entrypoint():
    import ray

    job = yaml.safe_load((ROOT / "infra/k8s/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    script, _, config = job["spec"]["entrypoint"].split()[1:4]
    assert script == "jobs/run_pipeline.py" and (ROOT / script).exists()
    assert (ROOT / job["spec"]["entrypoint"].split()[-1]).exists()
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    images = [c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]]
    assert all(img.endswith(f":{ray.__version__}") for img in images)
    assert f"rayproject/ray:{ray.__version__}-py311-gpu" in (ROOT / "infra/k8s/Dockerfile").read_text()
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            for g in spec["workerGroupSpecs"]]
    assert gpus and all(int(g) >= 1 for g in gpus)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_job_entrypoints_run(script):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / script), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--config" in out.stdout


@pytest.mark.parametrize("name", ["tiny-local.yaml", "imagenet-resnet50.yaml", "imagenet-resnet18.yaml"])
def test_job_configs_are_valid(name):
    from pipeline.ops.run import load_pipeline_config

    cfg = load_pipeline_config(str(ROOT / "jobs" / "configs" / name))
    assert cfg.stage and cfg.register_ and cfg.register_.model
    if name.startswith("imagenet"):
        assert cfg.train.lr_tta and cfg.train.blurpool and cfg.train.label_smoothing == 0.1
        assert cfg.train.val_res == 256 and (cfg.train.min_res, cfg.train.max_res) == (160, 192)


def test_readme_opens_with_the_two_commands_and_its_reference_is_current():
    from pipeline.docs import render_reference

    readme = (ROOT / "README.md").read_text()
    head = "\n".join(readme.splitlines()[:12])
    assert "make demo" in head and "make test" in head
    assert render_reference() in readme, "README reference is stale: python -m pipeline.docs"
