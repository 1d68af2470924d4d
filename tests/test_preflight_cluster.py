"""`pipeline preflight` on a real 3-node Ray cluster on this machine, the dataset in SeaweedFS and
a real MLflow server: it passes with every node in its table and leaves nothing in MLflow; a
tracking server that does not answer and a dataset that is not there fail it (exit 2) with a
line saying what to do; a frozen node fails it within its bound instead of hanging it."""
from __future__ import annotations

import contextlib
import os
import subprocess

import pytest
from conftest import add_trainer_node
from helpers import PIPELINE, last_json, mlflow_client, run_cli, upload_tree

from pipeline.ops.local_services import free_ports

pytestmark = pytest.mark.slow   # real services / Ray clusters


@pytest.fixture(scope="module")
def s3_data(train_data, s3):
    from pipeline.storage import S3Settings, Storage

    settings = S3Settings(s3.endpoint, s3.access_key, s3.secret_key, "us-east-1")
    settings.client().create_bucket(Bucket="preflight")
    upload_tree(Storage(settings), train_data, "s3://preflight/imagenet")
    return "s3://preflight/imagenet"


# the bound on the whole preflight is the frozen-node test's subject; here it is only a
# backstop, wide enough for a loaded 2-core machine to start a probe on every node
BACKSTOP_S = 240


def preflight(cluster, s3, *args, check=True):
    return run_cli("preflight", "--json", "--timeout", BACKSTOP_S, *args, check=check,
                   env={"RAY_ADDRESS": cluster.address, **s3.env()}, timeout=BACKSTOP_S + 120)


def mlflow_state(uri: str) -> dict:
    client = mlflow_client(uri)
    return {e.experiment_id: (e.name, e.lifecycle_stage, e.tags,
                              len(client.search_runs([e.experiment_id], run_view_type=3)))
            for e in client.search_experiments(view_type=3)}   # 3: active and deleted


def test_passes_on_every_node_and_leaves_nothing_in_mlflow(ray_cluster, s3, s3_data,
                                                          mlflow_server):
    before = mlflow_state(mlflow_server.uri)
    proc = preflight(ray_cluster, s3, "--data", s3_data, "--tracking-uri", mlflow_server.uri,
                     "--experiment", "preflight-test")
    out = last_json(proc.stdout)
    print(proc.stdout)
    assert proc.returncode == 0 and out["exit"] == 0 and out["ok"]
    assert len(out["nodes"]) == 3   # the head and the two worker nodes
    table = proc.stdout.split("[preflight]")[1]
    for node in out["nodes"]:
        assert node in table
    by = {}
    for c in out["checks"]:
        by.setdefault(c["name"], []).append(c)
    assert {c["node"] for c in by["s3 read"]} == set(out["nodes"])
    assert all(c["status"] == "ok" and c["figures"]["mbps"] > 0 for c in by["s3 read"])
    assert all(c["status"] == "ok" and c["figures"]["free"] > 0 for c in by["cache disk"])
    assert all(c["result"] == "no GPU" for c in by["gpu"] + by["driver"])
    assert all(c["status"] == "ok" for c in by["matmul"]) and len(by["matmul"]) == 3
    assert all(c["result"].startswith("not expected") for c in by["spot agent"])
    [allreduce] = by["all-reduce"]
    assert allreduce["status"] == "ok" and allreduce["figures"]["world"] == 3
    assert allreduce["figures"]["busbw_gbps"] > 0
    assert [c["status"] for c in by["mlflow"]] == ["ok"] * 4   # 3 nodes reach it, the driver writes
    # the write check set a tag and deleted it: no experiment, run or tag left behind
    assert mlflow_state(mlflow_server.uri) == before


def test_unreachable_mlflow_and_missing_dataset_fail_with_what_to_do(ray_cluster, s3, s3_data):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"   # nothing listens there
    proc = preflight(ray_cluster, s3, "--data", s3_data.replace("imagenet", "not-staged"),
                     "--tracking-uri", dead, check=False)
    print(proc.stdout)
    out = last_json(proc.stdout)
    assert proc.returncode == 2 and out["exit"] == 2, proc.stderr[-3000:]
    assert len(out["nodes"]) == 3
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[preflight] FAIL")]
    mlflow = [line for line in lines if line.startswith("[preflight] FAIL: mlflow:")]
    assert len(mlflow) == 1 and dead in mlflow[0] and "start the tracking server" in mlflow[0]
    s3_read = [line for line in lines if line.startswith("[preflight] FAIL: s3 read on ")]
    assert len(s3_read) == 1 and "manifest.json is missing" in s3_read[0], lines
    assert all(n in s3_read[0] for n in out["nodes"])   # one line naming the three nodes
    assert "pipeline stage" in s3_read[0]


def test_a_frozen_node_is_a_failed_check_not_a_hang(ray_cluster, s3, s3_data, mlflow_server):
    """The node is frozen (its raylet and every process it started: SIGSTOP) once preflight has
    listed it alive: whatever the GCS later decides about it, it never answers. The bound (60 s,
    the default) also gives the healthy nodes' probes time to start on a loaded machine."""
    import psutil

    node = add_trainer_node(ray_cluster)
    ray_cluster.wait_for_nodes()
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    proc = subprocess.Popen([PIPELINE, "preflight", "--json", "--data", s3_data, "--tracking-uri",
                             mlflow_server.uri, "--timeout", "60"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "RAY_ADDRESS": ray_cluster.address, **s3.env()})
    frozen_procs = []
    try:
        lines = []
        for line in proc.stdout:   # ends when the command does, so bounded by its own timeout
            lines.append(line)
            if line.startswith("[preflight] 4 nodes"):
                raylet.suspend()   # first: it starts nothing more
                frozen_procs = [raylet, *raylet.children(recursive=True)]
                for p in frozen_procs[1:]:
                    p.suspend()
                break
        stdout = "".join(lines) + proc.stdout.read()
        proc.wait(timeout=300)
    finally:
        for p in frozen_procs:
            with contextlib.suppress(psutil.Error):
                p.resume()
        if proc.poll() is None:
            proc.kill()
        ray_cluster.remove_node(node)
    print(stdout)
    out = last_json(stdout)
    assert frozen_procs and proc.returncode == 2 and len(out["nodes"]) == 4, proc.stderr.read()
    frozen = [c for c in out["checks"] if c["name"] == "answer"]
    assert len(frozen) == 1 and frozen[0]["node"].split("/")[1].split()[0] == node.node_id[:6]
    assert frozen[0]["status"] == "FAIL"
    assert any(line.startswith("[preflight] FAIL: answer on ") for line in stdout.splitlines())
    # the other nodes were still checked
    assert sum(c["name"] == "s3 read" and c["status"] == "ok" for c in out["checks"]) == 3
