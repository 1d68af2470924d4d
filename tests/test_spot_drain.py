"""`pipeline spot-agent` against a real Ray cluster: a notice from a metadata server on 127.0.0.1
drains the worker node with the notice's deadline, as Ray itself reports it (the call Ray Train's
PreemptionWatcher makes); `--drain-now` (the KubeRay preStop hook) drains a node and waits until
it has left."""
from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
from helpers import PIPELINE, run_cli, wait_for
from ray_internals import died_of_preemption_drain, draining_nodes

from pipeline.ops.spot_agent import ms_iso

pytestmark = pytest.mark.slow   # a Ray cluster


def test_notice_drains_the_node_with_its_deadline_and_prestop_drains_and_waits(fake_metadata):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    agent = None
    try:
        busy = cluster.add_node(num_cpus=1, resources={"spot": 1})
        idle = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)

        @ray.remote(num_cpus=0, resources={"spot": 1})
        class Work:   # as a training worker: a drained node with work stays up, draining
            def ping(self):
                return 1

        work = Work.remote()
        ray.get(work.ping.remote())

        # several nodes share this machine: the agent must be told which (on a cluster it is
        # the one whose raylet runs beside it)
        from pipeline.ops.spot_agent import RayNode
        assert RayNode(cluster.address).find() == (None, "3 Ray nodes run on this machine: "
                                                         "pass --node-id")

        agent = subprocess.Popen(
            [PIPELINE, "spot-agent", "--endpoint", fake_metadata.url, "--address", cluster.address,
             "--node-id", busy.node_id, "--poll-seconds", "0.2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(agent.stdout), daemon=True)
        reader.start()
        def polls():
            return sum(p == "/latest/meta-data/spot/instance-action"
                       for _, p, _ in fake_metadata.requests)

        wait_for(lambda: polls() >= 3, "3 polls without a notice (404)", 60, agent)
        deadline_ms = (int(time.time()) + 90) * 1000
        fake_metadata.notice = json.dumps({"action": "terminate", "time": ms_iso(deadline_ms)})
        assert agent.wait(timeout=60) == 0
        reader.join(10)
        assert draining_nodes() == {busy.node_id: deadline_ms}
        assert len(lines) == 2 and lines[0].startswith("[spot] watching"), lines
        assert lines[1].strip().startswith(f"[spot] aws notice: terminate at {ms_iso(deadline_ms)}; "
                                           f"drained Ray node {busy.node_id} with that deadline"), lines

        # the preStop hook: an idle node drains at once and leaves, said in two lines
        out = run_cli("spot-agent", "--drain-now", "60", "--node-id", idle.node_id,
                      "--address", cluster.address, timeout=120)
        assert f"drained Ray node {idle.node_id} with a deadline 60 s away" in out.stdout
        assert f"Ray node {idle.node_id} finished draining" in out.stdout
        assert died_of_preemption_drain(cluster.address, idle.node_id)
    finally:
        if agent and agent.poll() is None:
            agent.kill()
        ray.shutdown()
        cluster.shutdown()
