"""`pipeline bench recovery`: what a preemption costs, with and without a notice, when one or two
nodes remain.

Each case is a real `pipeline train` (ResNet-18 at 32 px on sample data, elastic workers, a
checkpoint every few steps) on a new Ray cluster of this machine (ray.cluster_utils), one node
per worker. In epoch 2 one node goes: with a notice (drained with a deadline, as the spot agent
does on a cloud's notice, and removed at the deadline) or without one (removed at once, as a
node that just dies). The figures come from the run's own summary.json:
- steps lost: trained but not kept, counted from the steps the group completed (each node's
  record of its last step, run_events.Reached), not from its checkpoints (goal: 0 with a
  notice; without one, the steps since the last checkpoint: less than one interval),
- seconds from the notice (or the death) to the first step after the resume, and of them the
  seconds from the group's stop (the deadline, or the death) to that step,
- where the run resumed and on how many workers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..console import say

from . import _table


def add_arguments(p) -> None:
    p.add_argument("--remaining", type=int, nargs="+", default=[1, 2],
                   help="worker nodes that remain after one goes")
    p.add_argument("--cases", nargs="+", default=["notice", "no-notice"],
                   choices=["notice", "no-notice"])
    p.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    p.add_argument("--deadline", type=float, default=20.0, help="seconds from notice to deadline")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=150)


def _events(run_dir: Path, kind: str) -> list[dict]:
    from ..storage import Storage
    from ..training.run_events import RunEvents

    return [e for e in RunEvents(Storage(), str(run_dir)).all() if e["kind"] == kind]


def _wait(check, what: str, proc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)


def one_case(data: str, remaining: int, case: str, args, work: Path) -> dict:
    from ray._raylet import GcsClient
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    from ..ops.local_services import free_ports

    name = f"{case}-{remaining}"
    runs = work / "runs"
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "dashboard_port": free_ports(1)[0]})
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}, env_vars={
        "PIPELINE_CACHE_DIR": str(work / f"cache-{name}-{i}")}) for i in range(remaining + 1)]
    cluster.wait_for_nodes()
    cmd = [str(Path(sys.executable).with_name("pipeline")), "train", "--data", data,
           "--storage", str(runs), "--name", name, "--epochs", "3",
           "--num-workers", f"{remaining}-{remaining + 1}", "--max-failures", "1",
           "--checkpoint-every", f"{args.every} steps", "--elastic-resize-seconds", "600",
           "--arch", "resnet18", "--batch-size", "16", "--min-res", "32", "--max-res", "32",
           "--val-res", "32", "--start-ramp", "0", "--end-ramp", "0", "--lr", "0.4",
           "--lr-peak-epoch", "1", "--worker-resources", "trainer=1", "--json"]
    out = work / f"{name}.out"
    with open(out, "w") as sink:
        proc = subprocess.Popen(cmd, env=dict(os.environ, RAY_ADDRESS=cluster.address),
                                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    run_dir = runs / name
    try:
        _wait(lambda: any(e["epoch"] == 1 and e["step"] > 0 for e in _events(run_dir, "checkpoint")),
              "a checkpoint in epoch 2", proc)
        gone = nodes[-1]
        if case == "notice":
            stop = time.time() + args.deadline
            GcsClient(address=cluster.address).drain_node(
                gone.node_id, autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
                "bench", int(stop * 1000), timeout=10)
            _wait(lambda: time.time() > stop, "the deadline", proc)
        else:
            stop = time.time()
        cluster.remove_node(gone, allow_graceful=False)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    lines = out.read_text().strip().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: the run failed:\n" + "\n".join(lines[-20:]))
    summary = json.loads(lines[-1])
    first = [e for e in _events(run_dir, "first_step") if e["time"] > stop]
    record = (summary["preemptions"] or [{}])[0] if case == "notice" else \
        (summary["recoveries"] or [{}])[0]
    began = record.get("notice_at", stop)
    return {"case": case, "remaining": remaining, "steps_lost": record.get("steps_lost"),
            "resumed_at": record.get("resumed_at"),
            "workers_after": summary["world_sizes"][-1],
            "to_first_step_s": round(first[0]["time"] - began, 1) if first else None,
            "stop_to_first_step_s": round(first[0]["time"] - stop, 1) if first else None,
            "epochs_ok": summary["epochs_completed"] == 3}


def run(args) -> int:
    from . import staged_sample

    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-recovery-"))
    _, data = staged_sample(str(work), source=None, classes=args.classes,
                            train_per_class=args.train_per_class, val_per_class=10,
                            max_resolution=64, shard_size=50)
    rows = [one_case(data, remaining, case, args, work)
            for remaining in args.remaining for case in args.cases]
    say(_table(rows, ["case", "remaining", "steps_lost", "resumed_at", "workers_after",
                      "to_first_step_s", "stop_to_first_step_s", "epochs_ok"]))
    say(f"checkpoint every {args.every} steps; goals: 0 steps lost with a notice, at most "
        f"{args.every} without; first step after the resume within 12 s of the group's stop")
    print(json.dumps({"rows": rows}))
    return 0
