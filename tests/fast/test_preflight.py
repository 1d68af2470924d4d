"""`pipeline preflight`: every pass/fail decision, each case; the table and the problem lines at
the scale they are for (1,024 nodes give one line per problem, not one per node)."""
from __future__ import annotations

import ast
import math
import os
import subprocess
import sys

import pytest
import torch

from pipeline.ops import preflight as pf
from pipeline.ops import preflight_probes as probes
from pipeline.ops.preflight import FAIL, OK, WARN


def test_gpu_check():
    assert pf.gpu_check("n", 0, None, "no nvidia-smi").status == OK
    assert pf.gpu_check("n", 0, None).result == "no GPU"
    c = pf.gpu_check("n", 4, None, "no nvidia-smi")
    assert c.status == FAIL and "no nvidia-smi" in c.result and "driver" in c.fix
    assert pf.gpu_check("n", 0, ["NVIDIA A10G"]).status == WARN   # Ray does not offer them
    c = pf.gpu_check("n", 4, ["NVIDIA A10G"] * 3)
    assert c.status == WARN and "Ray offers 4" in c.result
    assert pf.gpu_check("n", 2, ["NVIDIA A10G", "NVIDIA A100"]).status == WARN
    c = pf.gpu_check("n", 8, ["NVIDIA A100-SXM4-40GB"] * 8)
    assert c.status == OK and c.result == "8 x NVIDIA A100-SXM4-40GB"
    assert c.figures["type"] == "NVIDIA A100-SXM4-40GB"


def test_one_gpu_type_per_cluster():
    assert pf.gpu_types_check({}) is None
    assert pf.gpu_types_check({f"n{i}": "A10G" for i in range(1024)}) is None
    c = pf.gpu_types_check({"a": "A10G", "b": "A10G", "c": "A100"})
    assert c.status == WARN and "2 node(s) of A10G" in c.result and "1 node(s) of A100" in c.result


def test_cuda_versions():
    assert pf.cuda_version("12.4") == (12, 4)
    assert pf.cuda_version("13.0") == (13, 0)
    assert pf.cuda_version(12040) == (12, 4)
    assert pf.cuda_version(13000) == (13, 0)
    assert pf.cuda_version(11020) == (11, 2)
    assert pf.cuda_version(None) is None and pf.cuda_version("") is None
    assert pf.cuda_version("x") is None


def test_driver_supports_its_cuda_major_only():
    assert pf.driver_supports((13, 0), (13, 0))
    assert pf.driver_supports((12, 2), (12, 8))     # minor-version compatibility
    assert pf.driver_supports((13, 0), (12, 8))
    assert not pf.driver_supports((12, 9), (13, 0))   # a 575 driver, torch cu130
    assert not pf.driver_supports((11, 2), (12, 1))   # Ray's default AMI, a cu12 torch
    # the worker's own start check (gpu_env's minimum driver) is the same verdict
    assert not pf.driver_supports((13, 0), (13, 0), driver="575.51.03")
    assert pf.driver_supports((13, 0), (13, 0), driver="580.65.06")


def test_driver_check():
    assert pf.driver_check("n", 0, None, None, "13.0").result == "no GPU"
    assert pf.driver_check("n", 0, None, None, None).status == OK
    c = pf.driver_check("n", 4, "580.65", 13000, None)
    assert c.status == FAIL and "CPU-only" in c.result
    c = pf.driver_check("n", 4, None, None, "13.0")
    assert c.status == FAIL and "libcuda" in c.result
    c = pf.driver_check("n", 4, "470.57", 11040, "13.0")
    assert c.status == FAIL
    assert "470.57" in c.result and "CUDA 11.4" in c.result and "CUDA 13.0" in c.result
    assert "cu114" in c.fix
    c = pf.driver_check("n", 4, "580.65.06", 13000, "13.0")
    assert c.status == OK and "580.65.06" in c.result


def test_matmul_check():
    assert pf.matmul_check("n", {"error": "CUDA error: an illegal memory access"}).status == FAIL
    c = pf.matmul_check("n", {"dtype": "bfloat16", "tflops": 120.0, "rel_err": 0.003})
    assert c.status == OK and c.result == "bfloat16 120 TFLOP/s"
    c = pf.matmul_check("n", {"dtype": "bfloat16", "tflops": 80.0, "rel_err": 0.004, "devices": 8})
    assert c.status == OK and "slowest of 8" in c.result
    assert pf.matmul_check("n", {"dtype": "bfloat16", "tflops": 1.0, "rel_err": 0.5}).status == FAIL
    assert pf.matmul_check("n", {"dtype": "bfloat16", "tflops": 1.0,
                                 "rel_err": math.nan}).status == FAIL


def test_bus_bandwidth():
    assert pf.bus_bandwidth(1 << 30, 1.0, 1) == 0.0
    assert pf.bus_bandwidth(1 << 30, 0.0, 8) == 0.0
    assert pf.bus_bandwidth(1000, 1.0, 2) == 1000.0          # 2 (n-1)/n = 1
    assert pf.bus_bandwidth(1000, 1.0, 8) == 1750.0          # 2 * 7/8
    assert pf.bus_bandwidth(1000, 0.5, 8192) == pytest.approx(4000 * 8191 / 8192)


def test_allreduce_check():
    good = {"sum_ok": True, "seconds": 0.01, "nbytes": 16 << 20}
    c = pf.allreduce_check("gloo", 3, [good] * 3, 3)
    assert c.status == OK and "gloo across 3 ranks" in c.result
    assert c.figures["busbw_gbps"] == pytest.approx((16 << 20) / 0.01 * 4 / 3 / 1e9)
    c = pf.allreduce_check("gloo", 3, [good, dict(good, seconds=0.02), good], 3)
    assert c.figures["busbw_gbps"] == pytest.approx((16 << 20) / 0.02 * 4 / 3 / 1e9)  # slowest
    c = pf.allreduce_check("nccl", 16, [good] * 14, 16)
    assert c.status == FAIL and "2 of 16 ranks did not answer" in c.result and "port" in c.fix
    c = pf.allreduce_check("nccl", 2, [good, {"error": "DistNetworkError: timed out"}], 2)
    assert c.status == FAIL and "timed out" in c.result
    assert pf.allreduce_check("gloo", 2, [good, dict(good, sum_ok=False)], 2).status == FAIL
    assert pf.allreduce_check("gloo", 1, [good], 1).status == OK
    assert pf.allreduce_check("gloo", 2, [], 2).status == FAIL   # the first rank never started


def test_s3_check():
    assert pf.s3_check("n", "", {}).status == OK
    c = pf.s3_check("n", "s3://b/d", {"error": "s3://b/d/manifest.json: access denied"})
    assert c.status == FAIL and "access denied" in c.result and "environment" in c.fix
    assert pf.s3_check("n", "s3://b/d", {"bytes": 0, "seconds": 1.0}).status == FAIL
    c = pf.s3_check("n", "s3://b/d", {"bytes": 200 << 20, "seconds": 1.0,
                                      "bucket_region": "us-west-2", "node_region": "us-west-2"})
    assert c.status == OK and c.result.startswith("210 MB/s (bucket in us-west-2)")
    c = pf.s3_check("n", "s3://b/d", {"bytes": 1 << 20, "seconds": 1.0,
                                      "bucket_region": "us-west-2", "node_region": "eu-west-1"})
    assert c.status == WARN and "eu-west-1" in c.result and "us-west-2" in c.fix


def test_disk_check():
    got = {"folder": "/mnt/cache", "free": 100 * 10**9, "bytes": 1 << 30, "seconds": 1.0}
    assert pf.disk_check("n", {"error": "[Errno 30] Read-only file system"}, 0, 0).status == FAIL
    assert pf.disk_check("n", got, 10**9, 10**10).status == OK
    c = pf.disk_check("n", got, 150 * 10**9, 1400 * 10**9)
    assert c.status == FAIL and "150.0 GB" in c.result
    c = pf.disk_check("n", got, 50 * 10**9, 150 * 10**9)
    assert c.status == WARN and "--placement node" in c.fix
    assert pf.disk_check("n", got, 0, 0).status == OK   # a node that trains nothing


def test_node_share_at_imagenet_scale():
    assert pf.node_share([], 8) == (0, 0)
    assert pf.node_share([100, 50], 1) == (150, 150)
    shards = [140_000_000] * 1_282   # ImageNet-1k at ~1,000 images per shard, ~180 GB
    total = sum(shards)
    assert pf.node_share(shards, 8) == (total // 8 + 140_000_000, total)
    assert pf.node_share(shards, 1024)[0] == total // 1024 + 140_000_000
    assert pf.node_share([10, 10], 4) == (15, 20)


def test_spot_check():
    assert pf.spot_check("n", "spot", 4242, False).result.startswith("running (pid 4242)")
    c = pf.spot_check("n", "spot", None, False)
    assert c.status == FAIL and "pipeline spot-agent" in c.fix
    assert pf.spot_check("n", "spot", None, True).status == OK   # the pod's preStop drains
    assert pf.spot_check("n", "on-demand", None, False).result == "not expected (on-demand)"
    assert pf.spot_check("n", None, None, False).result == "not expected (not a cloud VM)"


def test_mlflow_node_and_answer_checks():
    assert pf.mlflow_node_check("n", "sqlite:///x.db", None).status == OK
    assert pf.mlflow_node_check("n", "http://h:5000", True).status == OK
    assert pf.mlflow_node_check("n", "http://h:5000", False).status == WARN
    c = pf.answer_check("n", "the node's probe", 60)
    assert c.status == FAIL and "within 60 s" in c.result


def test_exit_code():
    assert pf.exit_code([]) == 0
    assert pf.exit_code([pf.ok("n", "gpu", "no GPU"), pf.failed("n", "gpu", "x", "y",
                                                                  status=WARN)]) == 0
    assert pf.exit_code([pf.ok("n", "gpu", "no GPU"), pf.failed("n", "gpu", "x", "y")]) == 2


def test_table_and_problem_lines_at_1024_nodes():
    nodes = [pf.node_label(f"10.0.{i // 256}.{i % 256}", f"{i:056x}", i == 0) for i in range(1024)]
    checks = [pf.ok(n, "cache disk", "ok") for n in nodes[:1000]]
    checks += [pf.disk_check(n, {"error": "[Errno 30] Read-only file system"}, 0, 0)
               for n in nodes[1000:]]
    checks += [pf.s3_check(n, "s3://b/d", {"bytes": 1, "seconds": 1, "bucket_region": "us-west-2",
                                           "node_region": "eu-west-1"}) for n in nodes[:3]]
    checks.append(pf.allreduce_check("nccl", 8192, [], 8192))
    text = pf.table(checks)
    assert all(n in text for n in nodes) and len(text.splitlines()) == len(checks) + 1
    lines = pf.problem_lines(checks)
    assert len(lines) == 3, lines
    assert lines[0].startswith("[preflight] FAIL: cache disk on 10.0.3.232/") and \
        "and 20 more" in lines[0] and "--cache-dir" in lines[0]
    assert lines[1].startswith("[preflight] FAIL: all-reduce: nccl across 8192 ranks failed")
    assert lines[2].startswith("[preflight] warning: s3 read on ") and "and" not in \
        lines[2].split(":")[1]
    out = pf.summary(checks, nodes, 12.34)
    assert out["exit"] == 2 and not out["ok"] and out["seconds"] == 12.3


def test_matmul_probe_on_cpu():
    got = probes.matmul(torch.device("cpu"), n=64, iters=1)
    assert got["dtype"] == "float32" and got["tflops"] > 0 and got["rel_err"] < 1e-5
    assert pf.matmul_check("n", got).status == OK


def test_cache_disk_probe(tmp_path):
    got = probes.write_cache_disk(str(tmp_path / "cache"), seconds=5, max_bytes=8 << 20)
    assert got["bytes"] == 8 << 20 and got["free"] > 0 and got["folder"] == str(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []   # nothing left behind
    (tmp_path / "file").write_text("")
    assert "error" in probes.write_cache_disk(str(tmp_path / "file"))


def test_spot_agent_found_by_its_lock_file(tmp_path):
    lock = tmp_path / "pipeline-spot-agent.lock"
    assert probes.spot_agent_pid(str(tmp_path)) is None
    lock.write_text(str(os.getpid()))   # a live process, but not an agent
    assert probes.spot_agent_pid(str(tmp_path)) is None
    agent = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); "
                              "time.sleep(60)", "spot-agent"], stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout.readline() == "up\n"   # it runs (as the agent would)
        lock.write_text(str(agent.pid))
        assert probes.spot_agent_pid(str(tmp_path)) == agent.pid
    finally:
        agent.kill()
        agent.wait()
    assert probes.spot_agent_pid(str(tmp_path)) is None   # it died; its lock file stays


def test_no_instance_metadata_is_not_a_cloud_vm():
    port = probes.free_port()   # nothing listens there
    assert probes.instance_facts(f"127.0.0.1:{port}") == {"market": None, "region": None}
    # and by default tests ask the loopback address conftest names, never the cloud's
    assert probes.instance_facts(None) == {"market": None, "region": None}


def test_bad_timeout_is_one_line():
    from pipeline.cli import main

    assert main(["preflight", "--timeout", "0"]) == 2


def test_gpu_checks_run_where_only_torch_is_installed():
    """`pipeline bench gpu` prints them on a GPU machine without Ray, boto3 or MLflow."""
    blocked = "import sys\nfor m in ('ffcv', 'ray', 'mlflow', 'boto3', 'pyarrow', 'numba'): " \
              "sys.modules[m] = None\n"
    code = blocked + "from pipeline.ops.preflight_probes import gpu_lines\nprint(gpu_lines())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    if not torch.cuda.is_available():
        assert lines == ["gpu here: ok: no GPU", "driver here: ok: no GPU"]
    else:
        assert lines[0].startswith("gpu here: ") and len(lines) == 2 + torch.cuda.device_count()


def test_dataset_and_cache_from_the_flags_else_the_config_file(tmp_path):
    from pipeline.cli import build_parser, preflight_settings

    def settings(*argv):
        return preflight_settings(build_parser().parse_args(["preflight", *map(str, argv)]))

    assert settings() == ("", "")
    run_file = tmp_path / "run.yaml"   # a `pipeline run` file: train: data, else stage: dest
    run_file.write_text("stage: {source: s3://b/src, dest: s3://b/staged}\ntrain: {epochs: 2}\n")
    assert settings("--config", run_file) == ("s3://b/staged", "")
    run_file.write_text("stage: {dest: s3://b/staged}\ntrain: {data: s3://b/other, "
                        "cache_dir: /mnt/c}\n")
    assert settings("--config", run_file) == ("s3://b/other", "/mnt/c")
    assert settings("--config", run_file, "--data", "/d", "--cache-dir", "/c") == ("/d", "/c")
    train_file = tmp_path / "train.yaml"   # a `pipeline train` file: settings at the top
    train_file.write_text("data: /staged\nepochs: 3\n")
    assert settings("--config", train_file) == ("/staged", "")
