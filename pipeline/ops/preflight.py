"""`pipeline preflight`: whether a run on this cluster would work, said in one minute.

One probe per node (Ray actor pinned to it): GPUs seen by the driver and by Ray, the driver's CUDA
against torch's build, S3 (or the dataset folder) read throughput and the bucket's region, the
node cache's free space and write speed, the spot agent where the node is a spot VM, the MLflow
server from the node. One rank per GPU (per node on a CPU cluster) runs a matmul and an
all-reduce across every rank (NCCL on GPUs, gloo on CPUs) whose bus bandwidth is reported. The
driver checks that the tracking store takes a write (an experiment tag set and deleted again).

A node that does not answer in time is a failed check, never a wait. Every pass/fail decision is
a plain function below (tests/fast/test_preflight.py); the probes that gather the facts are in
preflight_probes.py. Ray, boto3 and MLflow are imported only inside functions: `pipeline bench
gpu` reuses the GPU checks on a machine with only torch.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

DEFAULT_TIMEOUT_S = 60.0
OK, WARN, FAIL = "ok", "warn", "FAIL"
MATMUL_TOLERANCE = 0.02   # bf16 keeps 8 bits of mantissa: its product is off by ~0.3 % of fp32's
LIST_NODES = 4            # nodes named in one failure line, then "and N more"


@dataclass
class Check:
    node: str          # a node's label, or "cluster"
    name: str          # gpu, driver, matmul, all-reduce, s3 read, cache disk, spot agent, mlflow
    status: str        # OK, WARN or FAIL
    result: str        # what was found, with its figures
    fix: str = ""      # what to do, when not OK
    figures: dict = field(default_factory=dict)


def ok(node, name, result, **figures) -> Check:
    return Check(node, name, OK, result, figures=figures)


def failed(node, name, result, fix, status=FAIL, **figures) -> Check:
    return Check(node, name, status, result, fix, figures)


# -- decisions (plain functions) ------------------------------------------------------------------
def gpu_check(node: str, ray_gpus: float, smi: list[str] | None, smi_error: str = "") -> Check:
    """Ray's GPU count for the node against the GPUs the driver lists (nvidia-smi)."""
    seen = smi or []
    if not ray_gpus and not seen:
        return ok(node, "gpu", "no GPU", count=0)
    kinds = ", ".join(f"{seen.count(t)} x {t}" for t in sorted(set(seen)))
    if ray_gpus and not seen:
        return failed(node, "gpu", f"Ray offers {ray_gpus:g} GPUs; the NVIDIA driver lists none "
                      f"({smi_error or 'nvidia-smi found nothing'})",
                      "install the NVIDIA driver on this node (or use an image/AMI that has it)")
    if not ray_gpus:
        return failed(node, "gpu", f"{kinds}, but Ray offers none", "start Ray on this node with "
                      "its GPUs (`ray start ... --num-gpus N`, or no CUDA_VISIBLE_DEVICES='')",
                      status=WARN, count=len(seen))
    if int(ray_gpus) != len(seen):
        return failed(node, "gpu", f"{kinds}; Ray offers {ray_gpus:g}", "restart Ray on this "
                      "node so that it offers every GPU (`--num-gpus`)", status=WARN,
                      count=len(seen))
    if len(set(seen)) > 1:
        return failed(node, "gpu", kinds, "one GPU type per node: the slowest sets every "
                      "step's pace", status=WARN, count=len(seen))
    return ok(node, "gpu", kinds, count=len(seen), type=seen[0])


def gpu_types_check(types: dict[str, str]) -> Check | None:
    """One DDP group across GPU types runs at the pace of the slowest (node label -> type)."""
    kinds = sorted(set(types.values()))
    if len(kinds) < 2:
        return None
    return failed("cluster", "gpu", "GPU types mixed: " + ", ".join(
        f"{sum(1 for t in types.values() if t == k)} node(s) of {k}" for k in kinds),
        "run on one GPU type (ask for it with --worker-resources accelerator_type:X=0.001)",
        status=WARN)


def cuda_version(text: str | int | None) -> tuple[int, int] | None:
    """'12.4' (torch.version.cuda) or 12040 (cuDriverGetVersion) -> (12, 4)."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text // 1000, (text % 1000) // 10
    try:
        major, minor, *_ = (str(text) + ".0").split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def driver_supports(driver_cuda: tuple[int, int], torch_cuda: tuple[int, int],
                    driver: str | None = None) -> bool:
    """CUDA's minor-version compatibility: a driver runs every build of its own CUDA major version
    (torch ships its kernels compiled, so no PTX needs the newer minor); an older major, never.
    Where the driver's own version is known, the worker's start check (gpu_env, the minimum
    driver per CUDA major) must agree too: preflight says what a run's workers will say."""
    from ..training.gpu_env import driver_supports as worker_check

    if driver and worker_check(f"{torch_cuda[0]}.{torch_cuda[1]}", driver):
        return False
    return driver_cuda[0] >= torch_cuda[0]


def driver_check(node: str, gpus: int, driver: str | None, driver_cuda: int | None,
                 torch_cuda: str | None) -> Check:
    if not gpus:
        return ok(node, "driver", "no GPU")
    if torch_cuda is None:
        return failed(node, "driver", "torch here is a CPU-only build",
                      "install a CUDA build of torch on this node (pip's default on Linux)")
    need, have = cuda_version(torch_cuda), cuda_version(driver_cuda)
    if have is None:
        return failed(node, "driver", f"driver {driver or '?'}: libcuda not found; torch is "
                      f"built for CUDA {torch_cuda}", "install the NVIDIA driver (libcuda.so.1)")
    text = f"driver {driver or '?'} (CUDA {have[0]}.{have[1]}), torch built for CUDA {torch_cuda}"
    if not driver_supports(have, need, driver):
        return failed(node, "driver", text, f"the driver is too old for torch's CUDA {torch_cuda}:"
                      f" use an image/AMI with a driver for CUDA {need[0]}, or a torch build for "
                      f"CUDA {have[0]} (pip install torch --index-url "
                      f"https://download.pytorch.org/whl/cu{have[0]}{have[1]})")
    return ok(node, "driver", text)


def matmul_check(node: str, got: dict) -> Check:
    """got: {dtype, tflops, rel_err, devices} or {error}; a wrong product is a broken GPU/driver."""
    if got.get("error"):
        return failed(node, "matmul", got["error"], "this node cannot compute: check its "
                      "GPU/driver (nvidia-smi, dmesg for Xid errors)")
    text = f"{got['dtype']} {got['tflops']:.3g} TFLOP/s" + (
        f" (slowest of {got['devices']})" if got.get("devices", 1) > 1 else "")
    if not got["rel_err"] <= MATMUL_TOLERANCE:   # NaN fails too
        return failed(node, "matmul", f"{text}, off by {got['rel_err']:.2g} from float64",
                      "wrong results: drain this node, the GPU is faulty")
    return ok(node, "matmul", text, tflops=got["tflops"], rel_err=got["rel_err"])


def bus_bandwidth(nbytes: int, seconds: float, world: int) -> float:
    """All-reduce bus bandwidth in bytes/s (nccl-tests): each rank sends and receives
    2 (n-1)/n of the buffer, so the figure compares across world sizes with the link's speed."""
    if world < 2 or seconds <= 0:
        return 0.0
    return nbytes / seconds * 2 * (world - 1) / world


def allreduce_check(backend: str, world: int, ranks: list[dict], expected_ranks: int) -> Check:
    """ranks: what each rank answered ({sum_ok, seconds, nbytes} or {error}); a rank missing
    means it did not answer in time."""
    errors = [r["error"] for r in ranks if r.get("error")]
    if len(ranks) < expected_ranks or errors:
        why = errors[0] if errors else f"{expected_ranks - len(ranks)} of {expected_ranks} ranks " \
                                       "did not answer in time"
        return failed("cluster", "all-reduce", f"{backend} across {world} ranks failed: {why}",
                      "if a node failed to answer above, that is why; else check that every "
                      "node reaches every other on all TCP ports (security group / firewall), "
                      "and NCCL_SOCKET_IFNAME on multi-NIC nodes")
    if not all(r["sum_ok"] for r in ranks):
        return failed("cluster", "all-reduce", f"{backend} across {world} ranks: wrong sum",
                      "a rank computes wrongly: run preflight on fewer nodes to find it")
    if world < 2:
        return ok("cluster", "all-reduce", f"{backend}, 1 rank: nothing to measure", world=1)
    seconds = max(r["seconds"] for r in ranks)
    bw = bus_bandwidth(ranks[0]["nbytes"], seconds, world)
    return ok("cluster", "all-reduce", f"{backend} across {world} ranks: bus bandwidth "
              f"{bw / 1e9:.3g} GB/s ({ranks[0]['nbytes'] >> 20} MiB in {seconds * 1e3:.3g} ms)",
              world=world, busbw_gbps=bw / 1e9)


def s3_check(node: str, data: str, got: dict) -> Check:
    """got: {bytes, seconds, bucket_region, node_region} or {error}."""
    if not data:
        return ok(node, "s3 read", "not checked (no --data)")
    if got.get("error"):
        return failed(node, "s3 read", got["error"], "the run's workers read the dataset from "
                      "here: fix what the line says on this node (keys and endpoint come from "
                      "the node's own environment or instance profile)")
    rate = got["bytes"] / max(got["seconds"], 1e-9)
    where = f" (bucket in {got['bucket_region']})" if got.get("bucket_region") else ""
    text = f"{rate / 1e6:.0f} MB/s{where}, {got['bytes'] >> 20} MiB in {got['seconds']:.2g} s"
    if not got["bytes"]:
        return failed(node, "s3 read", "read nothing", "the dataset's shards are empty or "
                      "missing: re-run `pipeline stage`")
    node_region, bucket_region = got.get("node_region"), got.get("bucket_region")
    if node_region and bucket_region and node_region != bucket_region:
        return failed(node, "s3 read", f"{text}; this node is in {node_region}",
                      f"reads cross regions (slower, and billed): run the cluster in "
                      f"{bucket_region} or copy the dataset to a bucket in {node_region}",
                      status=WARN, mbps=rate / 1e6)
    return ok(node, "s3 read", text, mbps=rate / 1e6)


def disk_check(node: str, got: dict, need_node: int, need_all: int) -> Check:
    """got: {folder, free, bytes, seconds} or {error}. need_node: the least this node must hold
    (its share of each split when placement is per node); need_all: the whole dataset (global
    placement, or a cluster of one node)."""
    if got.get("error"):
        return failed(node, "cache disk", got["error"], "set --cache-dir (or PIPELINE_CACHE_DIR "
                      "on the node) to a writable folder of this user on a large local disk")
    rate = got["bytes"] / max(got["seconds"], 1e-9)
    text = f"{got['folder']}: {got['free'] / 1e9:.1f} GB free, writes {rate / 1e6:.0f} MB/s"
    if need_node and got["free"] < need_node:
        return failed(node, "cache disk", f"{text}; this node's share of the dataset is "
                      f"{need_node / 1e9:.1f} GB", "free space there or point --cache-dir at a "
                      "larger disk (the instance-store NVMe)", free=got["free"], mbps=rate / 1e6)
    if need_all and got["free"] < need_all:
        return failed(node, "cache disk", f"{text}; the whole dataset is {need_all / 1e9:.1f} GB",
                      "use --placement node (each node holds its share), or a larger disk",
                      status=WARN, free=got["free"], mbps=rate / 1e6)
    return ok(node, "cache disk", text, free=got["free"], mbps=rate / 1e6)


def node_share(shard_bytes: list[int], nodes: int) -> tuple[int, int]:
    """(the least a node holds under per-node placement: its 1/N plus one shard, the whole
    dataset under global placement)."""
    total = sum(shard_bytes)
    if not shard_bytes:
        return 0, 0
    return (total if nodes <= 1 else min(total, total // nodes + max(shard_bytes))), total


def spot_check(node: str, market: str | None, agent_pid: int | None, kubernetes: bool) -> Check:
    """market: 'spot' / 'on-demand' from the instance metadata, None off a cloud VM."""
    if agent_pid:
        return ok(node, "spot agent", f"running (pid {agent_pid})" +
                  (f", {market} node" if market else ""))
    if kubernetes:
        return ok(node, "spot agent", "Kubernetes: the pod's preStop hook drains "
                  "(infra/k8s/rayjob.yaml)")
    if market == "spot":
        return failed(node, "spot agent", "spot node, no agent: a preemption would cost the "
                      "steps since the last epoch checkpoint", "start it on this node: `nohup "
                      "setsid pipeline spot-agent --address=HEAD:6379 &` (cluster.yaml's "
                      "worker_start_ray_commands)")
    return ok(node, "spot agent", f"not expected ({market or 'not a cloud VM'})")


def mlflow_node_check(node: str, uri: str, reached: bool | None) -> Check:
    """reached: the server's /health from the node; None when the store is not a server."""
    if reached is None:
        return ok(node, "mlflow", "a local store: checked from the driver only")
    if reached:
        return ok(node, "mlflow", "reachable")
    return failed(node, "mlflow", "the tracking server does not answer from here",
                  "this node's metrics are held and sent when it answers; open the server's "
                  "port to the cluster's nodes", status=WARN)


def answer_check(node: str, what: str, seconds: float) -> Check:
    return failed(node, "answer", f"{what} did not answer within {seconds:.0f} s",
                  "the node is overloaded, its GPUs are held by another job, or it is unhealthy:"
                  " check `ray status` and the node's raylet log, or replace the node")


def exit_code(checks: list[Check]) -> int:
    return 2 if any(c.status == FAIL for c in checks) else 0


# -- what the user reads --------------------------------------------------------------------------
def table(checks: list[Check]) -> str:
    rows = [("node", "check", "status", "result")] + \
        [(c.node, c.name, c.status, c.result) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r[:3], widths)) + "  " + r[3]
                     for r in rows)


def problem_lines(checks: list[Check]) -> list[str]:
    """One line per failed (then warned) check and remedy; the same problem on many nodes is one
    line naming a few of them (a 1,024-node cluster with one bad setting gives one line)."""
    groups: dict[tuple, list[Check]] = {}
    for c in checks:
        if c.status != OK:
            groups.setdefault((c.status, c.name, c.fix), []).append(c)
    lines = []
    for (status, name, fix), found in sorted(groups.items(), key=lambda g: g[0][0] != FAIL):
        nodes = [c.node for c in found]
        where = ", ".join(nodes[:LIST_NODES]) + (
            f" and {len(nodes) - LIST_NODES} more" if len(nodes) > LIST_NODES else "")
        head = "FAIL" if status == FAIL else "warning"
        result = found[0].result.rstrip(".")
        lines.append(f"[preflight] {head}: {name} on {where}: {result}: {fix}"
                     if where != "cluster" else f"[preflight] {head}: {name}: {result}: {fix}")
    return lines


def summary(checks: list[Check], nodes: list[str], seconds: float) -> dict:
    return {"ok": exit_code(checks) == 0, "exit": exit_code(checks), "nodes": nodes,
            "seconds": round(seconds, 1), "checks": [asdict(c) for c in checks]}


def node_label(ip: str, node_id: str, head: bool) -> str:
    return f"{ip}/{node_id[:6]}" + (" head" if head else "")


def deadline_left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def run_preflight(data: str, storage, ray_address: str | None, tracking_uri: str,
                  experiment: str, cache_dir: str = "", timeout: float = DEFAULT_TIMEOUT_S,
                  metadata_endpoint: str | None = None, say=print) -> dict:
    from .preflight_cluster import gather

    start = time.monotonic()
    checks, nodes = gather(data, storage, ray_address, tracking_uri, experiment, cache_dir,
                           start + timeout, metadata_endpoint, say)
    return summary(checks, nodes, time.monotonic() - start)


def in_kubernetes(env=None) -> bool:
    return "KUBERNETES_SERVICE_HOST" in (os.environ if env is None else env)
