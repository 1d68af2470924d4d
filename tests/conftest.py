"""Fixtures for real services: SeaweedFS S3 on loopback, multi-node Ray clusters on one machine."""
from __future__ import annotations

import uuid

import pytest

from pipeline.ops.local_services import start_seaweedfs
from pipeline.data.sample_data import generate
from pipeline.storage import S3Settings, Storage


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (`weed mini`) on free loopback ports, keys enforced; stopped by PID."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(s3):
    """A new, empty bucket for one test."""
    name = "t-" + uuid.uuid4().hex[:12]
    client = S3Settings(s3.endpoint, s3.access_key, s3.secret_key).client()
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_storage(s3) -> Storage:
    return Storage(S3Settings(s3.endpoint, s3.access_key, s3.secret_key, "us-east-1"))


def start_cluster(trainer_nodes: int, slots: int = 1):
    """A head (1 CPU, where Ray Train's controller lands) and worker nodes with `slots` CPUs and
    `trainer` resources each, all on this machine (ray.cluster_utils.Cluster)."""
    from ray.cluster_utils import Cluster

    from pipeline.ops.local_services import free_ports

    # Own dashboard port: several clusters may be up at once, and Ray Train's controller needs
    # the State API that the dashboard serves.
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "dashboard_port": free_ports(1)[0]})
    for _ in range(trainer_nodes):
        cluster.add_node(num_cpus=slots, resources={"trainer": slots})
    cluster.wait_for_nodes()
    return cluster


@pytest.fixture(scope="session")
def ray_cluster():
    """A 3-node cluster shared by the tests that do not change its shape."""
    cluster = start_cluster(2)
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, ray_cluster):
    """A small staged dataset that a ResNet-18 learns at 32 px: 4 classes, 150 images each."""
    from helpers import run_cli

    root = tmp_path_factory.mktemp("train-data")
    generate(str(root / "src"), "folders", classes=4, train_per_class=150, val_per_class=10, seed=3)
    run_cli("stage", "--source", root / "src", "--dest", root / "staged", "--max-resolution", 64,
            "--shard-size", 200, env={"RAY_ADDRESS": ray_cluster.address})
    return str(root / "staged")


@pytest.fixture(scope="session")
def sample_sets(tmp_path_factory):
    """One small sample set per layout (same seed, so the same images and labels in each)."""
    root = tmp_path_factory.mktemp("samples")
    out = {}
    for layout in ("folders", "kaggle", "devkit", "tars"):
        out[layout] = str(root / layout)
        generate(out[layout], layout, classes=4, train_per_class=6, val_per_class=3, seed=1,
                 bad_files=True)
    return out


@pytest.fixture(scope="session")
def mlflow_server(s3, tmp_path_factory):
    """A real `mlflow server` over HTTP on loopback; artifacts proxied to the SeaweedFS bucket."""
    from pipeline.ops.local_services import create_bucket, start_mlflow

    create_bucket(S3Settings(s3.endpoint, s3.access_key, s3.secret_key).client(), "mlflow")
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"), s3, bucket="mlflow")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def local_tracking_store(tmp_path_factory):
    """Runs that do not name a tracking server log to a throwaway SQLite store, not the repo."""
    import os

    path = tmp_path_factory.mktemp("mlflow-local") / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path}"
    yield


@pytest.fixture
def ray_head(tmp_path_factory):
    """A Ray head started the way users start one (`ray start --head`): own ports, own temp dir,
    the venv first on PATH (jobs run with the head's environment); token auth as Ray 2.60 sets
    it up. Stopped by its PID."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    from pipeline.ops.local_services import free_ports, stop_pid, wait_http

    gcs, dash, agent, client = free_ports(4)
    temp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")   # short: Ray's socket paths are limited
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={gcs}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         f"--temp-dir={temp}", "--num-cpus=2", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:   # the dashboard answers 401 without the token once it is up
            try:
                wait_http(f"http://127.0.0.1:{dash}/api/version", 2, proc)
                break
            except TimeoutError:
                import urllib.error
                import urllib.request
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                except urllib.error.HTTPError:
                    break
                except OSError:
                    pass
            assert time.monotonic() < deadline, "ray head did not start"
        yield f"http://127.0.0.1:{dash}"
    finally:
        stop_pid(proc.pid, timeout=60)
