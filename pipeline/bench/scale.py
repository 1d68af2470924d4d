"""`pipeline bench scale`: the project's own planning code at ImageNet scale, in one process.

ImageNet-1k (1,281,167 train samples) and ImageNet-21k (~14.2 M) in shards of 1,024 samples,
on 8 to 1,024 nodes of 8 ranks, storage faked (shard lists made up, nothing read). Every figure
comes from running the functions a worker runs when its group starts and at a checkpoint
(node_data.plan_data, placement.SampleIds / epoch_reads / Cursor, node_data.local_map,
checkpoint.save), never from a copy of them. Per row:

- trained: the share of the split trained per epoch (steps x global batch / samples); best: the
  most any placement can train (all but the remainder of a global batch),
- held/share: the most any node holds (whole shards: what it fetches) over its share,
- plan s / plan MB: one rank's start planning (the plan every rank makes, its own index arrays,
  its first epoch's reads), its CPU seconds (process time: the machine may be shared) and its
  peak memory (tracemalloc),
- start KB: what one rank receives when the ranks exchange their node facts at a start,
- digest s / MB: one rank's digest of what it read (trainer.read_digest), at a checkpoint at the
  end of the first epoch: its CPU seconds and peak memory,
- ckpt KB: what one rank receives at a checkpoint (the collectives of save_and_report),
- ckpt.pt KB: checkpoint.pt without the model, optimizer and scaler (their size does not depend
  on the cluster): RNG states, the cursor of an epoch in progress, 88 epochs of epoch_samples,
- refetch +1 / -1: the fraction of the split fetched again when one node joins / one goes
  (a new plan over the caches the old plan filled),
- fill %: filling the node with the most to hold from cold, what it costs beyond the shards'
  bytes (node_fill.fill_overhead: the real planning and commit code on a file that counts bytes;
  FFCV's ImageNet file's 424 KB a sample, 1 GiB commits), in % of its download time at the
  same speed,
- listing GETs / re-stage: per dataset, the GETs a first `pipeline stage` of the original
  archives makes to list them and the requests (HEADs and GETs) a re-stage of the unchanged,
  staged source makes (listing_cost: the real listing and re-stage code on made-up archives that
  count every request). The listing is measured on `--listing-classes` class tars of the real
  shape and scaled by the number of classes (each class tar is listed on its own); 0 lists all.
"""
from __future__ import annotations

import json
import pickle
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

from ..console import say, warn

from . import _table

DATASETS = {"1k": 1_281_167, "21k": 14_197_122}
VAL_SAMPLES = 50_000
BYTES_PER_SAMPLE = 110_000
STAGED_BYTES_PER_SAMPLE = 543e9 / 1_281_167   # FFCV's published ImageNet train file
CLASSES = {"1k": 1_000, "21k": 21_841}
COLUMNS = ["dataset", "nodes", "ranks", "shards", "best_pct", "trained_pct", "held_over_share", "plan_s",
           "plan_mb", "start_kb", "digest_s", "digest_mb", "ckpt_recv_kb", "ckpt_pt_kb", "refetch_join_pct",
           "refetch_leave_pct", "fill_overhead_pct", "listing_gets", "restage_requests"]


def add_arguments(p) -> None:
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--nodes", type=int, nargs="+", default=[8, 64, 256, 1024])
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=8192,
                   help="images per step, all ranks (a constant of a run: the lr depends on it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-churn", action="store_true",
                   help="skip the refetch columns (two more plans per row)")
    p.add_argument("--listing-classes", type=int, default=50,
                   help="class tars the listing is measured on, scaled to the dataset's classes "
                        "(0: all of them, ~1 min for ImageNet-1k, ~20 min for -21k)")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")


def fake_shards(split: str, samples: int, shard_size: int):
    from ..data.manifest import ShardInfo

    n, last = divmod(samples, shard_size)
    sizes = [shard_size] * n + ([last] if last else [])
    return [ShardInfo.model_construct(path=f"{split}/shard-{i:05d}.beton", samples=k,
                                      bytes=k * BYTES_PER_SAMPLE, sha256="0" * 64)
            for i, k in enumerate(sizes)]


def fake_manifest(samples: int, shard_size: int):
    from ..data.manifest import ShardManifest, SplitInfo

    splits = {"train": SplitInfo.model_construct(samples=samples,
                                                 shards=fake_shards("train", samples, shard_size)),
              "val": SplitInfo.model_construct(samples=VAL_SAMPLES,
                                               shards=fake_shards("val", VAL_SAMPLES, shard_size))}
    return ShardManifest.model_construct(classes=[], splits=splits, writer=None, source={},
                                         skipped=[], plan="")


def node_name(i: int) -> str:
    return f"{i:04d}" + "ab" * 26   # as long as a Ray node id (56 hex)


def rank_facts(nodes: list[str], per_node: int, held: dict[str, dict[str, list[str]]]):
    from ..data.node_data import NodeFacts

    facts = {n: NodeFacts(n, 64e9, 2e12, held.get(n, {"train": [], "val": []})) for n in nodes}
    return [facts[n] for n in nodes for _ in range(per_node)]


def held_by_node(plan, rank_nodes: list[str]) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for split, layout in plan.layouts.items():
        for g in layout.groups:
            out.setdefault(rank_nodes[g.ranks[0]], {})[split] = list(g.shards)
    return out


def plan(manifest, facts, args):
    from ..data.node_data import plan_data

    # a node joining at full size has more ranks than the global batch feeds: one each then
    return plan_data(facts, manifest, "node", "memory", 0.5, args.seed,
                     max(args.global_batch, len(facts)))


def start_of_rank(manifest, facts, args, rank: int):
    """What one rank computes when its group starts (node_data.prepare, worker.epoch_plan)."""
    from ..data.node_data import local_map
    from ..data.placement import SampleIds, epoch_reads

    p = plan(manifest, facts, args)
    reads = {}
    for split in ("train", "val"):
        ids = SampleIds(manifest.splits[split].shards)
        group, _, _ = p.layouts[split].place(rank)
        first = 0
        state_shards = []
        for path in group.shards:
            k = manifest_samples(manifest, split, path)
            state_shards.append(SimpleNamespace(path=path, samples=k, first=first))
            first += k
        local = local_map(ids, SimpleNamespace(shards=state_shards))
        reads[split] = (ids, local)
    ids = reads["train"][0]
    epoch = epoch_reads(ids, p.layouts["train"], rank, args.seed, 0)
    return p, ids, epoch, reads


_SAMPLES: dict = {}


def manifest_samples(manifest, split: str, path: str) -> int:
    key = (id(manifest), split)
    if key not in _SAMPLES:
        _SAMPLES[key] = {s.path: s.samples for s in manifest.splits[split].shards}
    return _SAMPLES[key][path]


DIR_NAME = "step-0001-000010-abcdef"


def checkpoint_figures(ids, epoch, p, world: int, args) -> tuple[float, float, int, int]:
    """(digest seconds, its peak bytes, bytes one rank receives at a checkpoint, checkpoint.pt
    bytes without the model): what save_and_report does, in one process. A rank receives the
    digest's all_reduce (3 int64) and the folder name Ray broadcasts from rank 0; its RNG state
    goes to its own file (checkpoint.save_rng), nobody else's comes to it."""
    from ..data.manifest import ShardInfo
    from ..data.placement import Cursor, Segment
    from ..training import checkpoint

    from ..data.placement import SampleIds

    began = time.process_time()
    ids.digest(epoch.gids)           # trainer.read_digest: this rank's terms, summed
    digest_s = time.process_time() - began
    fresh = SampleIds([ShardInfo.model_construct(path=path, samples=int(n), bytes=0, sha256="")
                       for path, n in zip(ids.paths, ids.sizes)])
    tracemalloc.start()   # a second time, traced, on ids that have hashed nothing yet
    fresh.digest(epoch.gids)
    digest_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    received = 3 * 8 + len(pickle.dumps(DIR_NAME))
    cursor = Cursor(0, args.seed, args.global_batch, [Segment(p.layouts["train"], 10)],
                    samples=10 * args.global_batch, digest=12345)
    history = [{"epoch": e, "samples": ids.total, "digest": "0" * 16} for e in range(1, 89)]
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(folder, model={}, optimizer={}, scaler={}, epoch=0, meta={},
                        cursor=cursor.to_dict(), epoch_samples=history, world_size=world)
        size = Path(folder, checkpoint.CHECKPOINT_FILE).stat().st_size
    return digest_s, digest_peak, received, size


def start_received(manifest, facts) -> int:
    """Bytes one rank receives when the ranks exchange their node facts (exchange_facts): each
    rank's (node, memory, disk), and each node's holdings once, from its first rank."""
    from ..data.node_data import pack_held

    first: dict = {}
    for f in facts:
        first.setdefault(f.node, f)
    return (sum(len(pickle.dumps((f.node, f.memory, f.disk_free))) for f in facts) +
            sum(len(pickle.dumps(pack_held(manifest, f.held))) for f in first.values()) +
            (len(facts) - len(first)) * len(pickle.dumps(None)))


def refetch(manifest, nodes: list[str], per_node: int, before, args) -> tuple[float, float]:
    """Fraction of the train split fetched again when a node joins, and when one goes."""
    rank_nodes = [n for n in nodes for _ in range(per_node)]
    held = held_by_node(before, rank_nodes)
    sizes = {s.path: s.samples for s in manifest.splits["train"].shards}
    total = sum(sizes.values())
    out = []
    for after in (nodes + [node_name(len(nodes))], nodes[:len(nodes) // 2] + nodes[len(nodes) // 2 + 1:]):
        p = plan(manifest, rank_facts(after, per_node, held), args)
        new = held_by_node(p, [n for n in after for _ in range(per_node)])
        fetched = sum(sizes[s] for n, h in new.items() for s in h["train"]
                      if s not in set(held.get(n, {}).get("train", ())))
        out.append(fetched / total)
    return out[0], out[1]


def measure(name: str, samples: int, n_nodes: int, args) -> dict:
    manifest = fake_manifest(samples, args.shard_size)
    nodes = [node_name(i) for i in range(n_nodes)]
    facts = rank_facts(nodes, args.ranks_per_node, {})
    world = len(facts)
    start_bytes = start_received(manifest, facts)
    began = time.process_time()
    p, ids, epoch, _ = start_of_rank(manifest, facts, args, rank=0)
    plan_s = time.process_time() - began
    tracemalloc.start()   # a second time, traced (tracing slows what it traces)
    start_of_rank(manifest, facts, args, rank=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    gb = p.layouts["train"].global_batch
    train = manifest.splits["train"].shards
    sizes = {s.path: s.samples for s in train}
    total = sum(sizes.values())
    over = max(sum(sizes[s] for s in g.shards) / (total * g.per_step / gb)
               for g in p.layouts["train"].groups)
    extra = max(sum(sizes[s] for s in g.shards) - total * g.per_step / gb
                for g in p.layouts["train"].groups)
    digest_s, digest_peak, received, ckpt_size = checkpoint_figures(ids, epoch, p, world, args)
    row = {"dataset": name, "nodes": n_nodes, "ranks": world, "shards": len(train),
           "best_pct": round(100 * (total // gb) * gb / total, 2),
           "trained_pct": round(100 * epoch.steps * gb / total, 2),
           "held_over_share": round(float(over), 3),
           "held_ok": bool(extra <= 2 * max(sizes.values())), "plan_s": round(plan_s, 3),
           "plan_mb": round(peak / 1e6, 1), "start_kb": round(start_bytes / 1e3, 1),
           "digest_s": round(digest_s, 3), "digest_mb": round(digest_peak / 1e6, 1), "ckpt_recv_kb": round(received / 1e3, 1),
           "ckpt_pt_kb": round(ckpt_size / 1e3, 1), "refetch_join_pct": "",
           "refetch_leave_pct": "", "fill_overhead_pct": "", "listing_gets": "",
           "restage_requests": ""}
    from ..data.node_fill import fill_overhead

    most = max(sum(sizes[s] for s in g.shards) for g in p.layouts["train"].groups)
    fill = fill_overhead(int(most * STAGED_BYTES_PER_SAMPLE), most, 1 << 30, args.shard_size)
    row["fill_overhead_pct"] = fill["overhead_pct"]
    if not args.no_churn:
        join, leave = refetch(manifest, nodes, args.ranks_per_node, p, args)
        row["refetch_join_pct"] = round(100 * join, 2)
        row["refetch_leave_pct"] = round(100 * leave, 2)
    return row


def listing_figures(name: str, args) -> dict:
    """GETs to list the dataset's original archives (measured on some class tars and their part
    of the val images, scaled by classes) and requests of a re-stage of the unchanged, staged source."""
    from ..data.listing_cost import listing_requests, restage_requests

    classes = CLASSES[name]
    part = min(classes, args.listing_classes or classes)
    per_class = round(DATASETS[name] / classes)
    listed = listing_requests(classes=part, per_class=per_class,
                              val_images=round(VAL_SAMPLES * part / classes))
    train_shards = -(-DATASETS[name] // args.shard_size)
    again = restage_requests(train_shards, -(-VAL_SAMPLES // args.shard_size))
    return {"listing_gets": round(listed["listing_gets"] * classes / part),
            "restage_requests": sum(again.values()), "listing_measured_classes": part}


def run(args) -> int:
    rows = []
    for name in args.datasets:
        listing = listing_figures(name, args)
        warn(f"{name}: listing measured on {listing['listing_measured_classes']} of "
             f"{CLASSES[name]:,} class tars, scaled by classes; re-stage {listing['restage_requests']} "
             "requests")
        for n in args.nodes:
            row = measure(name, DATASETS[name], n, args)
            row.update(listing)
            rows.append(row)
            warn(" ".join(f"{k}={row[k]}" for k in COLUMNS if row[k] != ""))
    say(_table(rows, COLUMNS))
    goals = {"trained_99": all(r["trained_pct"] >= 99 or r["trained_pct"] == r["best_pct"]
                               for r in rows),
             "held_within_share_plus_two_shards": all(r["held_ok"] for r in rows),
             "plan_under_1s_500mb": all(r["plan_s"] <= 1 and r["plan_mb"] <= 500 for r in rows),
             "ckpt_received_under_1mb": all(r["ckpt_recv_kb"] <= 1000 for r in rows),
             "fill_overhead_under_2pct": all(r["fill_overhead_pct"] <= 2 for r in rows)}
    say("goals: trained >= 99 % (or all but the batch remainder), held <= share + 2 shards, a "
        "rank's planning <= 1 s and 500 MB, <= 1 MB received at a checkpoint, a cache fill's "
        "overhead <= 2 % of its download: " +
        ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    say(f"fill_overhead_pct: the fullest node filled from cold, beyond its shards' bytes, in % of "
        f"their download; listing_gets: a first stage's listing of the original archives "
        f"(measured on {args.listing_classes or 'all'} class tars a dataset, scaled by classes); "
        "restage_requests: a re-stage of the unchanged source (HEADs and GETs, source and dest)")
    say(json.dumps({"bench": "scale", "ranks_per_node": args.ranks_per_node,
                    "shard_size": args.shard_size, "global_batch": args.global_batch,
                    "goals": goals, "rows": rows}))
    return 0
