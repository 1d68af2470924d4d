"""Each node's share of a split: exactly its part of the samples, in proportion to the samples
its workers take per step, as whole shards and at most two shards read in part (a range of
their ids), so it holds at most its share plus two shards.

Whole shards stay on nodes that hold them where they fit; the rest go by rendezvous hashing (the
highest-scoring node with room for the whole shard); what fits no node whole is cut among the
nodes still short, holders first, so warm caches keep their cuts. A pure function of the seed,
the shards, the node ids and what the nodes hold. Scores come from one hash per shard and one
per node (mixed with splitmix64), so ranking every node for every shard is array arithmetic, not
a sha256 per pair: a rank plans ImageNet-21k on 1,024 nodes in a fraction of a second.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .manifest import ShardInfo


def _hash64(texts) -> np.ndarray:
    """Per text: the first 8 bytes (little-endian) of its sha256, as uint64."""
    return np.frombuffer(b"".join(hashlib.sha256(t.encode()).digest()[:8] for t in texts),
                         "<u8").copy()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a well spread 64-bit score per (shard, node) from one hash of
    each, so ranking every node for a shard costs a few array operations, not N sha256s."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainder, ties to the first)."""
    weight_sum = sum(weights)
    base = [total * w // weight_sum for w in weights]
    rest = total - sum(base)
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % weight_sum), i))
    for i in by_remainder[:rest]:
        base[i] += 1
    return base


@dataclass(frozen=True)
class Share:
    """What one node reads of a split: whole shards, and at most two shards read in part
    (`cuts`: path -> (start, stop) within the shard). It holds (fetches) all of them."""

    shards: tuple[str, ...]                           # manifest order, cut ones included
    cuts: tuple[tuple[str, int, int], ...] = ()       # manifest order


def balance(shards: list[ShardInfo], weights: dict[str, int], seed: int,
            holdings: dict[str, set[str]] | None = None) -> dict[str, Share]:
    """node id -> its share: exactly its weight's part of the split's samples (largest
    remainder), as whole shards plus at most two shards read in part, so a node holds at most
    its share plus two shards. Whole shards stay on nodes that hold them where they fit; the
    rest go by rendezvous hashing (the highest-scoring node with room for the whole shard);
    what no node has room for whole is cut among the nodes still short, holders first."""
    holdings = holdings or {}
    nodes = sorted(weights)
    size = np.array([s.samples for s in shards], np.int64)
    target = np.array(apportion(int(size.sum()), [weights[n] for n in nodes]), np.int64)
    load = np.zeros(len(nodes), np.int64)
    node_h = _hash64(f"{seed}\0{n}" for n in nodes)
    shard_h = _hash64(f"{seed}\0{s.path}" for s in shards)
    position = {s.path: i for i, s in enumerate(shards)}
    holders: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        for path in holdings.get(n, ()):
            if path in position:
                holders.setdefault(position[path], []).append(k)
    owner = np.full(len(shards), -1, np.int64)
    order = sorted(range(len(shards)), key=lambda i: (-shards[i].samples, shards[i].path))

    def best(i: int, among: np.ndarray) -> int:
        return int(among[np.argmax(_mix(shard_h[i] ^ node_h[among]))])

    def place(i: int, k: int) -> None:
        owner[i] = k
        load[k] += size[i]

    # first: whole, where it already is; shards one node holds before those several hold (a
    # shard that was cut is held by each node that read part of it: it is cut again)
    for i in sorted((i for i in order if i in holders), key=lambda i: len(holders[i])):
        if True:
            among = np.array(holders[i], np.int64)
            among = among[load[among] + size[i] <= target[among]]
            if len(among):
                place(i, best(i, among))
    free = target - load
    rest = np.array([i for i in order if owner[i] < 0], np.int64)
    for start in range(0, len(rest), 512):   # scores of 512 shards x every node at a time
        chunk = rest[start:start + 512]
        scores = _mix(shard_h[chunk, None] ^ node_h[None, :])
        for i, row in zip(chunk.tolist(), scores):
            k = int(np.argmax(np.where(free >= size[i], row, 0)))
            if free[k] >= size[i]:
                place(i, k)
                free[k] -= size[i]
    # What is left: shards no node has room for whole. Every node is short by less than any of
    # them (each was left when no node had room for it, and loads only grow), so a node given
    # its whole need from one shard, or the tail of one and the head of the next, touches at
    # most two. Holders of a shard are served from it first, and a node that carries into the
    # next shard goes on with one it holds, so warm caches keep their cuts.
    need = target - load
    left = [int(i) for i in np.flatnonzero(owner < 0)]
    later = np.zeros(len(nodes), np.int64)    # leftover shards not yet cut that each node holds
    for i in left:
        later[holders.get(i, [])] += 1
    cuts: list[tuple[int, int, int, int]] = []    # (node, shard, start, stop)
    carried = -1                                  # a node whose cut runs into the next shard
    while left:
        mine = [i for i in left if carried >= 0 and carried in holders.get(i, ())]
        i = mine[0] if mine else left[0]
        left.remove(i)
        later[holders.get(i, [])] -= 1
        pos, end = 0, int(size[i])
        if carried >= 0:
            cuts.append((carried, i, 0, int(need[carried])))
            pos, need[carried], carried = int(need[carried]), 0, -1
        held_i = np.zeros(len(nodes), bool)
        held_i[holders.get(i, [])] = True
        while pos < end:
            short = np.flatnonzero(need > 0)
            fits = short[need[short] <= end - pos]
            # whole needs first: holders of this shard that hold no other still to be cut,
            # other holders, nodes that hold none still to be cut; only then one node takes the
            # tail: a holder that goes on with another shard it holds, any holder, then others
            free = later == 0
            for pool in (fits[held_i[fits] & free[fits]], fits[held_i[fits]], fits[free[fits]],
                         short[held_i[short] & ~free[short]], short[held_i[short]],
                         short[free[short]], short):
                if len(pool):
                    break
            k = best(i, pool)
            take = min(int(need[k]), end - pos)
            cuts.append((k, i, pos, pos + take))
            pos += take
            need[k] -= take
            if need[k]:
                carried = k
    parts: dict[int, set[int]] = {k: set() for k in range(len(nodes))}
    for i in np.flatnonzero(owner >= 0):
        parts[int(owner[i])].add(int(i))
    cut_of: dict[int, list] = {k: [] for k in range(len(nodes))}
    for k, i, a, b in cuts:
        if (a, b) == (0, int(size[i])):
            parts[k].add(i)
        else:
            parts[k].add(i)
            cut_of[k].append((i, a, b))
    return {n: Share(tuple(shards[i].path for i in sorted(parts[k])),
                     tuple((shards[i].path, a, b) for i, a, b in sorted(cut_of[k])))
            for k, n in enumerate(nodes)}


def assign(shards: list[ShardInfo], weights: dict[str, int], seed: int,
           holdings: dict[str, set[str]] | None = None) -> dict[str, list[str]]:
    """node id -> the shard paths it holds (balance: its share plus at most two shards)."""
    return {n: list(s.shards) for n, s in balance(shards, weights, seed, holdings).items()}
