"""`pipeline bench data`: what each node downloads and holds, and how soon it reads, in the global
and the per-node placement, on Ray clusters of 1..N worker nodes on this machine.

The dataset sits on a local S3 server (SeaweedFS, started here) unless --data names one. Every
cluster is new (ray.cluster_utils.Cluster, one cache folder per node, cold caches); its workers
run the data path of training (node_data.prepare: placement, fetch, node file) and then one FFCV loader
epoch without a model, so the figures are the data path's alone:
- bytes downloaded and peak bytes on the node's disk (its cache folder),
- seconds from the start of the run to the node's first batch (and of them, fetching),
- loader images/s per worker (second epoch: the first one compiles the pipeline).
With --accuracy-seeds N it also trains the sample data N times per placement and prints val top-1.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ..console import say

from . import _table


def add_arguments(p) -> None:
    p.add_argument("--data", help="staged dataset to read (default: sample data staged to a "
                                  "local S3 server started for the benchmark)")
    p.add_argument("--nodes", type=int, nargs="*", default=[1, 2, 3],
                   help="worker nodes per run (none: only the accuracy runs)")
    p.add_argument("--placements", nargs="+", default=["global", "node"], choices=["global", "node"])
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--train-per-class", type=int, default=250)
    p.add_argument("--max-resolution", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--res", type=int, default=64, help="RandomResizedCrop output size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--accuracy-seeds", type=int, default=0,
                   help="also train N seeds per placement on 2 nodes and print val top-1")
    p.add_argument("--epochs", type=int, default=4, help="epochs of each accuracy run")
    p.add_argument("--no-warm-mixed", dest="warm_mixed", action="store_false",
                   help="skip the warm-cache/mixed-mode row: 2 nodes, global placement, one "
                        "whose cache holds half the shards in another order and streams (little "
                        "memory), one fresh in memory mode; checks each sample is read once")


def bench_worker(config: dict) -> None:
    """One Ray Train worker: the node's data as training gets it, then a loader-only pass."""
    import ray
    import ray.train
    import torch

    from ..config import LoaderSettings
    from ..data.loaders import TrainLoader
    from ..data.manifest import ShardManifest
    from ..data.node_cache import cache_root
    from ..data.node_data import prepare
    from ..training.trainer import gather
    from ..training.worker import any_true

    started = time.time()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    manifest = ShardManifest.model_validate(config["manifest"])
    storage, data = config["storage"], config["data"]
    node = ray.get_runtime_context().get_node_id()
    device = torch.device("cpu")
    reads, plan, _, fetched = prepare(
        storage, data, manifest, LoaderSettings(placement=config["placement"],
                                                read_mode=config.get("read_mode", "auto")),
        rank, node, 0, config["batch_size"] * world, gather=lambda v: gather(v, world),
        any_pending=lambda pending: any_true(pending, world, device))
    train = reads["train"]
    loader = TrainLoader(train, train.count, config["res"], 1, 0, device)
    first_batch = None
    for epoch in range(2):
        count, t0 = 0, time.perf_counter()
        reads = train.epoch(epoch, 0)
        order = train.local[reads.gids]
        for images, _ in loader.epoch(epoch, config["res"], order):
            if first_batch is None:
                first_batch = time.time()
            count += len(images)
        rate = count / (time.perf_counter() - t0)
    group, _, _ = plan.layouts["train"].place(rank)
    sizes = {sh.path: sh.bytes for sh in manifest.splits["train"].shards}
    fetched = {**fetched.splits["train"], "share_bytes": sum(sizes[x] for x in group.shards),
               "seconds": fetched.seconds}
    disk = sum(f.stat().st_size for f in cache_root().rglob("*") if f.is_file())
    out = {"rank": rank, "node": node[:8], "bytes_downloaded": fetched["bytes_downloaded"],
           "share_bytes": fetched["share_bytes"], "disk_bytes": disk,
           "fetch_s": fetched["seconds"], "first_step_s": first_batch - config["t0"],
           "worker_start_s": started - config["t0"], "images_per_s": rate,
           "stream": plan.streams[node], "kept": fetched.get("shards_kept", 0),
           "read_last_epoch": reads.gids.tolist(), "style": plan.layouts["train"].style}
    Path(config["out"], f"rank-{rank}.json").write_text(json.dumps(out))


def one_run(data: str, storage, manifest, nodes: int, placement: str, args, work: Path,
            env: dict, node_env=None, name: str = "") -> list[dict]:
    """A fresh cluster of `nodes` worker nodes (cold caches, unless node_env(i, cache) warms
    one and returns extra variables for it); one row per worker."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.train import RunConfig, ScalingConfig

    from ..ops.local_services import free_ports
    from ..training.failures import Trainer

    name = name or f"{placement}-{nodes}"
    out = work / f"out-{name}"
    out.mkdir(parents=True)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "dashboard_port": free_ports(1)[0],
                                      "env_vars": env})
    for i in range(nodes):
        cache = work / f"cache-{name}-{i}"
        extra = node_env(i, cache) if node_env else {}
        cluster.add_node(num_cpus=1, resources={"trainer": 1},
                         env_vars={**env, "PIPELINE_CACHE_DIR": str(cache), **extra})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        t0 = time.time()
        Trainer(bench_worker,
                train_loop_config={"manifest": manifest.model_dump(), "storage": storage,
                                   "data": data, "placement": placement, "out": str(out),
                                   "batch_size": args.batch_size, "res": args.res, "t0": t0},
                scaling_config=ScalingConfig(num_workers=nodes, resources_per_worker={
                    "CPU": 1, "trainer": 1}),
                run_config=RunConfig(storage_path=str(work / "ray"), name=name)
                ).fit()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def warm_mixed(data: str, storage, manifest, args, work: Path, env: dict) -> list[dict]:
    """2 nodes, global placement: node 0's cache holds half the train shards, fetched in reverse
    order before (a history of another run), and little memory (it streams); node 1 is fresh, in
    memory mode. Each sample of the epoch must be read once, exactly the set fresh caches read."""
    from ..data.node_cache import NodeSplit
    from ..data.placement import SampleIds, epoch_reads, plan_layout

    shards = manifest.splits["train"].shards
    share = sum(s.bytes for s in shards)

    def node_env(i, cache):
        if i:
            return {}
        held = [s.path for s in shards[::2]][::-1]   # half of them, in another order
        NodeSplit(storage, data, manifest, "train", str(cache)).ensure(held)
        return {"PIPELINE_NODE_MEMORY": str(int(share))}   # its share is over half of it

    rows = one_run(data, storage, manifest, 2, "global", args, work, env, node_env, "warm-mixed")
    ids = SampleIds(shards)
    style = rows[0]["style"]
    layout = plan_layout(shards, "global", ["x", "y"], 0, args.batch_size * 2, style=style)
    want = sorted(int(g) for r in range(2) for g in epoch_reads(ids, layout, r, 0, 1).gids)
    got = sorted(g for r in rows for g in r["read_last_epoch"])
    return [{"case": f"warm+fresh, {style} order", "node": r["node"], "stream": r["stream"],
             "kept": r["kept"], "downloaded_MB": round(r["bytes_downloaded"] / 1e6, 1),
             "fetch_s": round(r["fetch_s"], 1), "first_step_s": round(r["first_step_s"], 1),
             "img_per_s": round(r["images_per_s"], 0), "read": len(got), "expected": len(want),
             "once": len(got) == len(set(got)), "as_fresh": got == want} for r in rows]


def accuracy(data: str, placement: str, seed: int, args, work: Path, env: dict) -> float:
    """val top-1 of a real `pipeline train` run on 2 worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    from ..config import TrainConfig
    from ..ops.local_services import free_ports
    from ..training.launch import train

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "dashboard_port": free_ports(1)[0], "env_vars": env})
    for i in range(2):
        cluster.add_node(num_cpus=1, resources={"trainer": 1}, env_vars={
            **env, "PIPELINE_CACHE_DIR": str(work / f"acc-cache-{i}")})
    cluster.wait_for_nodes()
    try:
        cfg = TrainConfig(data=data, arch="resnet18", epochs=args.epochs, batch_size=16, lr=0.4,
                          lr_peak_epoch=1, min_res=32, max_res=32, start_ramp=0, end_ramp=0,
                          val_res=32, num_workers="2", worker_resources={"trainer": 1},
                          placement=placement, seed=seed, storage=str(work / "acc-runs"),
                          name=f"{placement}-{seed}")
        return train(cfg, ray_address=cluster.address, say=lambda *_: None)["val_top1"]
    finally:
        ray.shutdown()
        cluster.shutdown()


def run(args) -> int:
    from ..data.manifest import read_manifest
    from ..storage import S3Settings, Storage
    from . import staged_sample

    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-data-"))
    server = None
    try:
        env: dict[str, str] = {}
        data = args.data
        if not data:
            from ..ops.local_services import start_seaweedfs
            from ..storage import Storage as S

            _, staged = staged_sample(str(work), source=None, classes=args.classes,
                                      train_per_class=args.train_per_class,
                                      val_per_class=args.train_per_class // 10,
                                      max_resolution=args.max_resolution,
                                      shard_size=args.shard_size)
            server = start_seaweedfs(work / "s3", buckets=("bench",))
            env = server.env()
            store = S(S3Settings(server.endpoint, server.access_key, server.secret_key))
            for rel, _ in S().list(staged):
                store.upload_file(os.path.join(staged, rel), f"s3://bench/staged/{rel}")
            data = "s3://bench/staged"
            os.environ.update(env)   # this driver reads the manifest with them too
        storage = Storage(S3Settings.from_env())
        manifest = read_manifest(storage, data)
        total = sum(s.bytes for s in manifest.splits["train"].shards)
        biggest = max(s.bytes for s in manifest.splits["train"].shards)
        rows = []
        for placement in args.placements:
            for n in args.nodes:
                for r in one_run(data, storage, manifest, n, placement, args, work, env):
                    rows.append({"placement": placement, "nodes": n, "node": r["node"],
                                 "downloaded_MB": round(r["bytes_downloaded"] / 1e6, 1),
                                 "of_D": round(r["bytes_downloaded"] / total, 2),
                                 "disk_MB": round(r["disk_bytes"] / 1e6, 1),
                                 "disk_vs_share": round(r["disk_bytes"] / max(1, r["share_bytes"]), 2),
                                 "fetch_s": round(r["fetch_s"], 1),
                                 "first_step_s": round(r["first_step_s"], 1),
                                 "img_per_s": round(r["images_per_s"], 0),
                                 # a node reads its exact share: whole shards, two cut ones
                                 "bound_ok": r["bytes_downloaded"] <= total / n + 2 * biggest})
        mixed = warm_mixed(data, storage, manifest, args, work, env) if args.warm_mixed else []
        if rows:
            say(_table(rows, ["placement", "nodes", "node", "downloaded_MB", "of_D", "disk_MB",
                              "disk_vs_share", "fetch_s", "first_step_s", "img_per_s", "bound_ok"]))
        if mixed:
            say(_table(mixed, ["case", "node", "stream", "kept", "downloaded_MB", "fetch_s",
                               "first_step_s", "img_per_s", "read", "expected", "once",
                               "as_fresh"]))
        summary = {}
        for placement in args.placements:
            for n in args.nodes:
                sel = [r for r in rows if r["placement"] == placement and r["nodes"] == n]
                summary[f"{placement}-{n}"] = {
                    "first_step_s": max(r["first_step_s"] for r in sel),
                    "img_per_s_per_worker": round(statistics.mean(r["img_per_s"] for r in sel), 1)}
        say(f"train split D = {total / 1e6:.1f} MB in {len(manifest.splits['train'].shards)} "
              f"shards (largest {biggest / 1e6:.1f} MB); goals: per-node bytes <= D/N + one "
              "shard, disk <= 1.1 x share, first step falls with N, img/s within 5 % of global")
        for key, value in summary.items():
            say(f"  {key}: first step after {value['first_step_s']} s (slowest node), "
                  f"{value['img_per_s_per_worker']} img/s per worker")
        acc = {}
        for placement in args.placements if args.accuracy_seeds else []:
            acc[placement] = [accuracy(data, placement, seed, args, work, env)
                              for seed in range(args.accuracy_seeds)]
            say(f"  accuracy, {placement}: val top-1 {acc[placement]} (mean "
                  f"{statistics.mean(acc[placement]):.3f})")
        say(json.dumps({"bench": "data", "dataset_bytes": total, "rows": rows,
                          "summary": summary, "accuracy": acc, "warm_mixed": mixed}))
        return 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
