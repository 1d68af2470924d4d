"""Which shards each node holds, and which samples each rank reads per epoch.

Two placements:
- global: every node holds the whole split; every epoch is one permutation of it, cut into equal
  parts for all ranks (the FFCV recipe on one big node).
- node: each node holds about 1/N of each split (whole shards, balanced by sample count and by
  how many workers it runs); every epoch each node shuffles the samples of all its shards and
  cuts them into equal parts for its own ranks.
Either way every rank gets the same number of samples per epoch (the smallest part across
nodes), so DDP's collectives stay in step, and no sample is seen twice in an epoch.

The assignment keeps shards where they already are: each shard goes first to a node that holds
it in its cache (while that node is under its target), the rest by rendezvous hashing to the
node that ranks it highest among those still under their target. It depends only on the seed,
the shards, the node ids and what the nodes hold, so a restarted run on the same nodes finds its
caches warm, and when a node is replaced or the run grows, the nodes that stay keep their shards
and only the missing ones are fetched.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .manifest import ShardInfo

STREAM_WINDOW = 2048   # samples shuffled together in stream mode (pages are read in order)


def _rank(seed: int, shard: str, node: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{shard}\0{node}".encode()).digest()


def assign(shards: list[ShardInfo], weights: dict[str, int], seed: int,
           holdings: dict[str, set[str]] | None = None) -> dict[str, list[str]]:
    """node id -> shard paths, each node's samples close to its weight's share (at most one
    shard over it); shards stay on nodes that hold them where the balance allows."""
    holdings = holdings or {}
    total = sum(s.samples for s in shards)
    weight_sum = sum(weights.values())
    target = {n: total * w / weight_sum for n, w in weights.items()}
    load = {n: 0 for n in weights}
    out: dict[str, list[str]] = {n: [] for n in weights}
    order = sorted(shards, key=lambda s: (-s.samples, s.path))

    def prefer(shard, among):
        return sorted(among, key=lambda n: _rank(seed, shard.path, n), reverse=True)

    def place(shard, node):
        out[node].append(shard.path)
        load[node] += shard.samples

    rest = []
    for shard in order:   # first: where it already is
        holders = [n for n in prefer(shard, weights) if shard.path in holdings.get(n, ())
                   and load[n] < target[n]]
        if holders:
            place(shard, holders[0])
        else:
            rest.append(shard)
    for shard in rest:
        ranked = prefer(shard, weights)
        under = [n for n in ranked if load[n] < target[n]]
        place(shard, under[0] if under else min(ranked, key=lambda n: load[n] / weights[n]))
    order = {s.path: i for i, s in enumerate(shards)}
    return {n: sorted(paths, key=order.__getitem__) for n, paths in out.items()}


@dataclass(frozen=True)
class ReadPlan:
    """What one rank reads of one split: the shards its node holds for it, and its part."""

    shards: list[str]     # in manifest order
    part: int             # this rank's part of the shards' samples
    parts: int            # how many ranks share those samples
    per_rank: int         # samples per epoch, the same on every rank (train)
    node_samples: int


def plan_reads(shards: list[ShardInfo], placement: str, rank_nodes: list[str], rank: int,
               seed: int, holdings: dict[str, set[str]] | None = None) -> ReadPlan:
    """rank_nodes[r] is the node id of rank r; holdings what each node's cache holds."""
    if placement == "global":
        total = sum(s.samples for s in shards)
        world = len(rank_nodes)
        return ReadPlan([s.path for s in shards], rank, world, total // world, total)
    weights = Counter(rank_nodes)
    held = assign(shards, dict(weights), seed, holdings)
    samples = {s.path: s.samples for s in shards}
    node = rank_nodes[rank]
    mine = [r for r in range(len(rank_nodes)) if rank_nodes[r] == node]
    per_rank = min(sum(samples[p] for p in held[n]) // weights[n] for n in weights)
    return ReadPlan(held[node], mine.index(rank), len(mine), per_rank,
                    sum(samples[p] for p in held[node]))


def epoch_order(indices: np.ndarray, part: int, parts: int, per_rank: int, seed: int, epoch: int,
                pages: np.ndarray | None = None) -> np.ndarray:
    """This rank's samples for one epoch. The same generator on every rank of a node (or of the
    whole run, in the global placement) shuffles the shared samples; each rank takes its own
    contiguous part. With `pages` (stream mode) whole pages are shuffled instead of samples, and
    samples only within windows, so each page is read once, in order, per epoch."""
    rng = np.random.default_rng([seed, epoch])
    if pages is None:
        sequence = rng.permutation(indices)
    else:
        page_ids = np.unique(pages)
        page_order = rng.permutation(page_ids)
        rank_of = np.empty(page_ids.max() + 1, np.int64)
        rank_of[page_order] = np.arange(len(page_order))
        sequence = indices[np.argsort(rank_of[pages], kind="stable")]
    mine = sequence[part * per_rank:(part + 1) * per_rank]
    if pages is not None:
        mine = mine.copy()
        for start in range(0, len(mine), STREAM_WINDOW):
            rng.shuffle(mine[start:start + STREAM_WINDOW])
    return mine
