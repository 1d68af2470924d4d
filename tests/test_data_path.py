"""The data path on the cluster the README sends users to: nodes that join after `train`
started (an autoscaling cluster), measured where they run; caches warm from earlier runs with
other placements; nodes in different read modes. Every epoch reads what the order says, once."""
from __future__ import annotations

import re

import pytest
from conftest import add_trainer_node, start_cluster
from helpers import Running, events, expected_epoch_samples, last_json

pytestmark = pytest.mark.slow

TINY = ["--arch", "resnet18", "--batch-size", 16, "--min-res", 32, "--max-res", 32,
        "--val-res", 32, "--start-ramp", 0, "--end-ramp", 0, "--lr", 0.4, "--lr-peak-epoch", 1,
        "--worker-resources", "trainer=1", "--json", "--num-workers", 2]


def test_late_nodes_are_measured_and_warm_mixed_caches_read_each_sample_once(
        train_data, node_caches, tmp_path):
    from pipeline.data.placement import Layout, plan_layout
    from pipeline.data.manifest import read_manifest
    from pipeline.storage import Storage

    manifest = read_manifest(Storage(), train_data)
    cluster = start_cluster(0, {}, node_caches)   # a head and no worker node, as cluster.yaml starts
    small = {"PIPELINE_NODE_MEMORY": str(40_000_000)}   # a node type with little memory
    try:
        # 1. Nothing can hold a worker at launch: the run waits for the autoscaler and decides
        # the placement from the nodes that come, each measured on itself.
        env = {"RAY_ADDRESS": cluster.address}
        run = Running("train", "--data", train_data, "--storage", tmp_path / "runs", "--name",
                      "late", "--epochs", 1, "--autoscaling", *TINY, env=env)
        run.wait_for_line("data placement: decided when the workers start")
        run.wait_for_line("waiting up to")
        a = cluster.add_node(num_cpus=1, resources={"trainer": 1},
                             env_vars={**cluster.node_env(), **small})
        b = add_trainer_node(cluster)
        code, out = run.finish()
        assert code == 0, out[-3000:]
        line = next(x for x in out.splitlines() if "] data placement: node" in x)
        # 55 MB of data over 0.5 of the smallest node's own 40 MB: per node; that node streams
        assert "the smallest worker node's 40 MB of memory" in line, line
        assert re.search(rf"{a.node_id[:8]} stream \(\d+ MB of 40 MB\)", line), line
        assert re.search(rf"{b.node_id[:8]} memory \(\d+ MB of \d+\.\d GB\)", line), line
        late = last_json(out)
        [layout] = [Layout.from_dict(e["train"]) for e in events(tmp_path / "runs" / "late", "layout")]
        assert layout.style == "stream"   # one order for all ranks as soon as one node streams
        assert late["epoch_samples"] == expected_epoch_samples(train_data, 1, 0, [layout])

        # 2. A fresh node beside one whose cache holds the shards of that per-node run (in its
        # own order), one streaming and one in memory mode, global placement: every sample of
        # each epoch once, exactly what the same run reads on fresh caches.
        cluster.remove_node(b)
        c = add_trainer_node(cluster)
        run = Running("train", "--data", train_data, "--storage", tmp_path / "runs", "--name",
                      "warm", "--epochs", 2, "--placement", "global", *TINY, env=env)
        code, out = run.finish()
        assert code == 0, out[-3000:]
        warm = last_json(out)
        fetched = {(d["node"], d["split"]): d for d in warm["node_data"]}
        assert fetched[(a.node_id, "train")]["shards_kept"] > 0        # its history was kept
        assert fetched[(c.node_id, "train")]["shards_kept"] == 0       # a fresh cache
        assert fetched[(a.node_id, "train")]["stream"] and not fetched[(c.node_id, "train")]["stream"]
        # the first step's line names the fetch every rank waited for: all that both nodes
        # fetched (the warm one only what it lacked), and the slower of the two
        first = re.search(r"\] first step [\d.]+ s after the workers started; data: (\d+) MB "
                          r"fetched by 2 node\(s\), the slowest \((\w{8})\)", out)
        assert first, out[-3000:]
        assert int(first[1]) == round(sum(d["bytes_downloaded"] for d in warm["node_data"]) / 1e6)
        assert first[2] in (a.node_id[:8], c.node_id[:8])
        fresh = plan_layout(manifest.splits["train"].shards, "global", ["x", "y"], 0, 32,
                            style="stream")
        want = expected_epoch_samples(train_data, 2, 0, [fresh, fresh])
        assert warm["epoch_samples"] == want
        train = manifest.splits["train"].samples
        assert all(train - e["samples"] < 32 for e in want)   # only the remainder is dropped
    finally:
        cluster.shutdown()
