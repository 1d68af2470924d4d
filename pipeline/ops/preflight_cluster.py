"""`pipeline preflight` across the cluster: one actor per node (per GPU on GPU nodes, the first
of them also probing the node), an all-reduce across every rank, MLflow from the driver, and
whatever did not answer by the deadline counted as failed."""
from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta

from . import preflight as pf
from . import preflight_probes as probes

ALLREDUCE_BYTES = {"nccl": 256 << 20, "gloo": 16 << 20}
ALLREDUCE_ITERS = {"nccl": 10, "gloo": 3}
MARGIN_S = 3.0   # for answers to travel back and the table to be printed


class NodeProbe:
    """Made a Ray actor at call time (this module imports Ray only in gather())."""

    def address(self) -> str:
        import ray

        return f"{ray.util.get_node_ip_address()}:{probes.free_port()}"

    def node(self, data: str, storage, cache_dir: str, tracking_uri: str,
             metadata_endpoint: str | None) -> dict:
        import torch

        from ..tracking import reachable

        names, driver, why = probes.nvidia_smi()
        out = {"smi": names, "smi_error": why, "driver": driver,
               "driver_cuda": probes.cuda_driver_version(), "torch_cuda": torch.version.cuda,
               "instance": probes.instance_facts(metadata_endpoint),
               "spot_agent": probes.spot_agent_pid(), "kubernetes": pf.in_kubernetes(),
               "mlflow": reachable(tracking_uri) if tracking_uri.startswith("http") else None,
               "disk": probes.write_cache_disk(cache_dir)}
        out["read"] = probes.read_dataset(storage, data) if data else {}
        return out

    def rank(self, rank: int, world: int, master: str, backend: str, wall_deadline: float) -> dict:
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
        out = {"matmul": probes.matmul(device)}
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            left = max(1.0, wall_deadline - time.time())
            dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank,
                                    world_size=world, timeout=timedelta(seconds=left))
            nbytes = ALLREDUCE_BYTES[backend]
            x = torch.full((nbytes // 4,), float(rank + 1), device=device)
            dist.all_reduce(x)
            want = world * (world + 1) / 2
            sum_ok = bool(x.min().item() == want == x.max().item())
            dist.barrier()
            start = time.perf_counter()
            for _ in range(ALLREDUCE_ITERS[backend]):
                dist.all_reduce(x)
            probes.sync(device)
            seconds = (time.perf_counter() - start) / ALLREDUCE_ITERS[backend]
            dist.destroy_process_group()
            out.update(sum_ok=sum_ok, seconds=seconds, nbytes=nbytes)
        except Exception as exc:   # noqa: BLE001 - the finding
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return out


def bounded(fn, seconds: float):
    """fn() in a daemon thread: (True, its value) or (False, None) when it took longer."""
    box = []
    thread = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    thread.start()
    thread.join(max(0.0, seconds))
    return (True, box[0]) if box else (False, None)


def mlflow_write(uri: str, experiment: str) -> pf.Check:
    """Set an experiment tag and delete it again: the store takes writes and keeps nothing."""
    from ..tracking import local_store, reachable, redact

    shown = redact(uri)
    if uri.startswith("http") and not reachable(uri):
        return pf.failed("cluster", "mlflow", f"{shown} does not answer",
                         "start the tracking server, or set MLFLOW_TRACKING_URI / --tracking-uri")
    store = local_store(uri, os.getcwd()) if not uri.startswith("http") else None
    if store is not None and not store.exists():
        if os.access(store.parent if store.parent.exists() else os.getcwd(), os.W_OK):
            return pf.ok("cluster", "mlflow", f"{shown}: created by the first run")
        return pf.failed("cluster", "mlflow", f"{shown}: folder not writable",
                         "point --tracking-uri at a folder you can write, or a server")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        target = exp.experiment_id if exp and exp.lifecycle_stage == "active" else "0"
        client.set_experiment_tag(target, "pipeline.preflight", f"{socket.gethostname()} "
                                  f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        client.delete_experiment_tag(target, "pipeline.preflight")
    except Exception as exc:   # noqa: BLE001 - the finding, without the URI's password
        text = str(exc).replace(uri, shown).splitlines()[0][:200] if str(exc) else ""
        return pf.failed("cluster", "mlflow", f"{shown} refused a write ({type(exc).__name__}: "
                         f"{text})", "check the server's log and your MLflow credentials "
                         "(MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)")
    return pf.ok("cluster", "mlflow", f"{shown}: writable (experiment "
                 f"{experiment if target != '0' else 'Default'})")


def gather(data: str, storage, ray_address: str | None, tracking_uri: str, experiment: str,
           cache_dir: str, deadline: float, metadata_endpoint: str | None, say=print):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ..ray_connect import connect
    from ..tracking import redact

    started = time.monotonic()
    connect(ray_address)
    nodes = sorted((n for n in ray.nodes() if n["Alive"]),
                   key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeID"]))
    labels = {n["NodeID"]: pf.node_label(n["NodeManagerAddress"], n["NodeID"],
                                         "node:__internal_head__" in n["Resources"]) for n in nodes}
    gpu_cluster = any(n["Resources"].get("GPU") for n in nodes)
    backend = "nccl" if gpu_cluster else "gloo"
    ranks_text = "one rank per GPU (NCCL)" if gpu_cluster else "one rank per node (gloo)"
    say(f"[preflight] {len(nodes)} nodes; {ranks_text}; "
        f"answers within {pf.deadline_left(deadline):.0f} s")
    mlflow = {}

    def write_check():
        try:
            mlflow["check"] = mlflow_write(tracking_uri, experiment)
        except Exception as exc:   # noqa: BLE001 - said as a failed check, not as a missing answer
            mlflow["check"] = pf.failed("cluster", "mlflow", f"{type(exc).__name__}: "
                                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
                                        "check --tracking-uri / MLFLOW_TRACKING_URI")

    side = threading.Thread(target=write_check, daemon=True)
    side.start()

    remote = ray.remote(NodeProbe)
    first, ranks = {}, []   # node -> its probing actor; the ranks, in order
    for n in nodes:
        slots = int(n["Resources"].get("GPU", 0)) if gpu_cluster else 1
        for slot in range(max(1, slots)):
            actor = remote.options(
                num_cpus=0, num_gpus=1 if gpu_cluster and slots else 0, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote()
            first.setdefault(n["NodeID"], actor)
            if slots:
                ranks.append((n["NodeID"], actor))
    node_refs = {nid: a.node.remote(data, storage, cache_dir, tracking_uri, metadata_endpoint)
                 for nid, a in first.items()}
    wall_deadline = time.time() + pf.deadline_left(deadline) - MARGIN_S
    master_ref = ranks[0][1].address.remote()
    ready, _ = ray.wait([master_ref], timeout=pf.deadline_left(deadline) - MARGIN_S)
    rank_refs = {}
    if ready:
        master = ray.get(master_ref)
        rank_refs = {i: (nid, a.rank.remote(i, len(ranks), master, backend, wall_deadline))
                     for i, (nid, a) in enumerate(ranks)}
    pending = list(node_refs.values()) + [r for _, r in rank_refs.values()]
    ray.wait(pending, num_returns=len(pending), timeout=pf.deadline_left(deadline) - MARGIN_S / 2)

    def answer(ref):
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            return None
        try:
            return ray.get(ref)
        except Exception as exc:   # noqa: BLE001 - the actor died, or could not start there
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}

    checks, node_facts = [], {nid: answer(ref) for nid, ref in node_refs.items()}
    budget = deadline - started
    rank_answers = {i: (nid, answer(ref)) for i, (nid, ref) in rank_refs.items()}
    shards = next((f["read"]["shards"] for f in node_facts.values()
                   if f and f.get("read", {}).get("shards")), [])
    rank_nodes = {nid for nid, _ in ranks}
    need_node, need_all = pf.node_share(shards, len(rank_nodes))
    types = {}
    for n in nodes:
        nid, label, facts = n["NodeID"], labels[n["NodeID"]], node_facts[n["NodeID"]]
        if facts is None or facts.get("error"):
            checks.append(pf.answer_check(label, "the node's probe", budget)
                          if facts is None else pf.failed(label, "answer", facts["error"],
                                                          "check the node's Ray logs"))
            continue
        gpus = n["Resources"].get("GPU", 0)
        gpu = pf.gpu_check(label, gpus, facts["smi"], facts["smi_error"])
        if gpu.figures.get("type"):
            types[label] = gpu.figures["type"]
        checks.append(gpu)
        checks.append(pf.driver_check(label, int(gpus), facts["driver"], facts["driver_cuda"],
                                      facts["torch_cuda"]))
        mine = [a for i, (rn, a) in rank_answers.items() if rn == nid]
        if mine:
            checks.append(worst_matmul(label, mine, budget))
        checks.append(pf.s3_check(label, data, {**facts["read"], "node_region":
                                                facts["instance"]["region"]}))
        checks.append(pf.disk_check(label, facts["disk"], need_node if nid in rank_nodes else 0,
                                    need_all if nid in rank_nodes else 0))
        checks.append(pf.spot_check(label, facts["instance"]["market"], facts["spot_agent"],
                                    facts["kubernetes"]))
        checks.append(pf.mlflow_node_check(label, tracking_uri, facts["mlflow"]))
    mixed = pf.gpu_types_check(types)
    checks += [mixed] if mixed else []
    answered = [a for _, a in rank_answers.values()
                if a is not None and ("seconds" in a or a.get("error"))]
    checks.append(pf.allreduce_check(backend, len(ranks), answered, len(ranks)))
    side.join(pf.deadline_left(deadline))
    checks.append(mlflow.get("check") or pf.answer_check("cluster", f"MLflow at "
                                                         f"{redact(tracking_uri)}", budget))
    for actor in {id(a): a for a in [*first.values(), *(a for _, a in ranks)]}.values():
        ray.kill(actor, no_restart=True)
    return checks, [labels[n["NodeID"]] for n in nodes]


def worst_matmul(label: str, answers: list[dict | None], budget: float) -> pf.Check:
    got = [a.get("matmul") if a else None for a in answers]
    if any(g is None for g in got):
        return pf.answer_check(label, "a rank", budget)
    bad = [g for g in got if g.get("error")]
    if bad:
        return pf.matmul_check(label, bad[0])
    slowest = min(got, key=lambda g: g["tflops"])
    return pf.matmul_check(label, {**slowest, "rel_err": max(g["rel_err"] for g in got),
                                   "devices": len(got)})
