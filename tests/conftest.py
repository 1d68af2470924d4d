"""Fixtures for real services: SeaweedFS S3 on loopback, multi-node Ray clusters on one machine."""
from __future__ import annotations

import os
import uuid

import pytest

# Nothing in a test may reach the cloud's instance metadata address (169.254.169.254: off this
# machine): preflight and the spot agent ask the loopback discard port instead (refused at once:
# "not a cloud VM"), and boto3 never looks for instance credentials. Set before any import of
# the package (spot_agent reads it at import), and inherited by every process a test starts.
os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

from pipeline.ops.local_services import start_seaweedfs  # noqa: E402
from pipeline.data.sample_data import generate  # noqa: E402
from pipeline.storage import S3Settings, Storage  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (`weed mini`) on free loopback ports, keys enforced; stopped by PID."""
    from helpers import on_fresh_ports

    server = on_fresh_ports(lambda: start_seaweedfs(tmp_path_factory.mktemp("seaweedfs")),
                            "SeaweedFS")
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


class NodeCaches:
    """One node-cache folder per node of a test cluster, as separate machines would have."""

    def __init__(self, root):
        self.root, self.count = root, 0

    def new(self) -> dict[str, str]:
        self.count += 1
        return {"PIPELINE_CACHE_DIR": str(self.root / f"node-{self.count}")}


def start_cluster(trainer_nodes: int, s3_env: dict, caches: NodeCaches, slots: int = 1):
    """A head (1 CPU, where Ray Train's controller lands) and worker nodes with `slots` CPUs and
    `trainer` resources each, all on this machine (ray.cluster_utils.Cluster). Like the nodes of
    a real cluster, each has S3 credentials in its own environment (nothing ships keys to them)
    and a cache folder of its own."""
    from ray.cluster_utils import Cluster

    from pipeline.ops.local_services import free_ports

    # Own dashboard port: several clusters may be up at once, and Ray Train's controller needs
    # the State API that the dashboard serves.
    from helpers import on_fresh_ports

    cluster = on_fresh_ports(lambda: Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": free_ports(1)[0],
                                              "env_vars": {**s3_env, **caches.new()}}),
        "the Ray head")
    cluster.node_env = lambda: {**s3_env, **caches.new()}
    for _ in range(trainer_nodes):
        add_trainer_node(cluster, slots)
    cluster.wait_for_nodes()
    return cluster


def add_trainer_node(cluster, slots: int = 1):
    return cluster.add_node(num_cpus=slots, resources={"trainer": slots}, env_vars=cluster.node_env())


@pytest.fixture(scope="session")
def node_caches(tmp_path_factory) -> NodeCaches:
    return NodeCaches(tmp_path_factory.mktemp("node-caches"))


@pytest.fixture(scope="session")
def ray_cluster(s3, node_caches):
    """A 3-node cluster shared by the tests that do not change its shape."""
    cluster = start_cluster(2, s3.env(), node_caches)
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
            "--shard-size", 50, env={"RAY_ADDRESS": ray_cluster.address})
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
    from helpers import on_fresh_ports

    server = on_fresh_ports(lambda: start_mlflow(tmp_path_factory.mktemp("mlflow"), s3,
                                                 bucket="mlflow"), "the MLflow server")
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


@pytest.fixture(scope="module")
def ray_head(s3):
    """A Ray head started the way users start one (`ray start --head`): own ports, own temp dir,
    the venv first on PATH (jobs run with the head's environment), S3 credentials in the
    environment it starts with (as infra/local does; nothing ships keys to it), and token auth
    as Ray 2.60 sets it up when a token exists. Stopped by its PID."""
    import os
    import subprocess
    import sys
    import tempfile
    import types
    import urllib.error
    import urllib.request

    from helpers import on_fresh_ports, wait_for

    from pipeline.ops.local_services import free_ports, stop_pid

    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **s3.env())
    env.pop("RAY_ADDRESS", None)
    # a head started while a token exists requires it from every client, as on a real cluster
    subprocess.run([os.path.join(bin_dir, "ray"), "get-auth-token", "--generate"], env=env,
                   capture_output=True, check=True, timeout=120)

    def start():
        gcs, dash, agent, client = free_ports(4)
        temp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")   # short: Ray's socket paths are limited
        proc = subprocess.Popen(
            [os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={gcs}",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
             f"--temp-dir={temp}", "--num-cpus=2", "--include-dashboard=true"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

        def answers() -> bool:   # the dashboard answers 401 without the token once it is up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False

        try:
            wait_for(answers, "the Ray head's dashboard", 90, proc)
        except BaseException:
            stop_pid(proc.pid, timeout=60)
            raise
        return proc, types.SimpleNamespace(address=f"http://127.0.0.1:{dash}", temp=temp)

    proc, head = on_fresh_ports(start, "the Ray head (ray start)")
    try:
        yield head
    finally:
        stop_pid(proc.pid, timeout=60)


@pytest.fixture
def fake_metadata():
    """A cloud VM's instance metadata server on 127.0.0.1 (the real one is link-local on a VM):
    AWS IMDSv2 (token, then spot/instance-action: 404 until a notice) or GCP (instance/preempted,
    Metadata-Flavor: Google). Set `.provider`, `.notice` (the body a notice answers), `.fail` (an
    HTTP status, 'hang' until the test ends, or 'close' without an answer), `.revoke()`
    the tokens given; `.requests` lists what came in, `.hangs_ended` how many hangs ended."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class State:
        provider, notice, fail = "aws", None, None

        def __init__(self):
            self.requests, self.tokens = [], set()
            self.release, self.hangs_ended = threading.Event(), 0

        def revoke(self):
            self.tokens.clear()

    state = State()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, status, body="", headers=()):
            data = body.encode()
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def handle_one(self, method):
            state.requests.append((method, self.path, {k.lower(): v for k, v in self.headers.items()}))
            if state.fail == "hang":   # until the test ends: only a client timeout ends a call
                state.release.wait(600)
                state.hangs_ended += 1
            if state.fail in ("hang", "close"):
                self.close_connection = True
                return
            if state.fail:
                return self.answer(state.fail, "error")
            if state.provider == "aws":
                if method == "PUT" and self.path == "/latest/api/token":
                    if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                        return self.answer(400)
                    token = f"token-{len(state.requests)}"
                    state.tokens.add(token)
                    return self.answer(200, token)
                if method == "GET" and self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") not in state.tokens:
                        return self.answer(401)
                    return self.answer(404) if state.notice is None else self.answer(200, state.notice)
                return self.answer(404)
            flavor = [("Metadata-Flavor", "Google")]
            if self.headers.get("Metadata-Flavor") != "Google":
                return self.answer(403, headers=flavor)
            if method == "GET" and self.path == "/computeMetadata/v1/":
                return self.answer(200, "instance/\nproject/\n", flavor)
            if method == "GET" and self.path == "/computeMetadata/v1/instance/preempted":
                return self.answer(200, state.notice or "FALSE", flavor)
            return self.answer(404, headers=flavor)

        def do_GET(self):
            self.handle_one("GET")

        def do_PUT(self):
            self.handle_one("PUT")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
