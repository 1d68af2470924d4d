"""Each node's data for one worker group: what the nodes have, who reads what, the fetch.

Runs in every training worker each time its worker group starts, so a node that joined after
launch (an autoscaled GPU node, a spot replacement, an elastic newcomer) is measured like the
others. Each rank measures its own node (memory, free space of the cache disk, the shards its
cache holds); the ranks exchange that, and every rank makes the same decisions from the same
facts: the placement (`auto`: from the memory of the nodes that actually hold workers), each
node's read mode, the order of the epochs, who reads what (placement.py). Then each node fetches
what it lacks into its node file (node_cache.py) while the ranks wait in short collectives, so a
cold node's fetch of many GB never runs into the process group's timeout.
"""
from __future__ import annotations

import os
import shutil
import threading
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import UserError
from ..storage import Storage
from .loaders import Reads
from .manifest import ShardManifest
from .node_cache import NodeSplit, cache_root
from .placement import (Layout, SampleIds, choose_placement, empty_epoch, order_style,
                        plan_layout, size_text, streams)

NODE_MEMORY_ENV = "PIPELINE_NODE_MEMORY"   # bytes: what the data may count on, when not the RAM
POLL_SECONDS = 5.0
SPLITS = ("train", "val")


def cgroup_memory_limit() -> float | None:
    """The container's memory limit (cgroup v2, then v1), if one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return float(text)
    return None


def node_memory_bytes() -> float:
    """The memory of this node that the data may count on: the physical memory, or the
    container's limit when lower (a pod sees the host's RAM), or PIPELINE_NODE_MEMORY."""
    import psutil

    given = os.environ.get(NODE_MEMORY_ENV)
    if given:
        return float(given)
    total = float(psutil.virtual_memory().total)
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


@dataclass
class NodeFacts:
    node: str
    memory: float                  # bytes (node_memory_bytes)
    disk_free: float               # bytes free where the node cache lives
    held: dict[str, list[str]] = field(default_factory=dict)   # split -> shard paths held


def measure_node(node: str, storage: Storage, data_uri: str, manifest: ShardManifest,
                 cache_dir: str = "") -> NodeFacts:
    held = {split: sorted(NodeSplit(storage, data_uri, manifest, split, cache_dir).held())
            for split in SPLITS}
    return NodeFacts(node, node_memory_bytes(), float(shutil.disk_usage(cache_root(cache_dir)).free),
                     held)


def pack_held(manifest: ShardManifest, held: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """split -> the manifest positions of the shards held: 4 bytes a shard, not its path."""
    out = {}
    for split, paths in held.items():
        position = {sh.path: i for i, sh in enumerate(manifest.splits[split].shards)}
        out[split] = np.array(sorted(position[p] for p in paths if p in position), np.uint32)
    return out


def unpack_held(manifest: ShardManifest, packed: dict[str, np.ndarray]) -> dict[str, list[str]]:
    return {split: [manifest.splits[split].shards[int(i)].path for i in positions]
            for split, positions in packed.items()}


def exchange_facts(mine: NodeFacts, rank: int, manifest: ShardManifest, gather) -> list[NodeFacts]:
    """Every rank's node facts, in rank order (two collectives). The ranks of a node hold the
    same cache: only the node's first rank sends what it holds, as shard positions, so a rank
    receives each node's holdings once, not once per rank of it."""
    small = gather((mine.node, mine.memory, mine.disk_free))
    first = {}
    for r, (node, _, _) in enumerate(small):
        first.setdefault(node, r)
    held = gather(pack_held(manifest, mine.held) if first[mine.node] == rank else None)
    by_node = {node: NodeFacts(node, small[r][1], small[r][2], unpack_held(manifest, held[r]))
               for node, r in first.items()}
    return [by_node[node] for node, _, _ in small]


@dataclass
class DataPlan:
    """The decisions of one worker group, the same on every rank."""

    placement: str
    why: str
    layouts: dict[str, Layout]
    streams: dict[str, bool]        # node -> reads its train share page by page
    shares: dict[str, int]          # node -> bytes of its train share

    def line(self, facts: dict[str, NodeFacts]) -> str:
        modes = ", ".join(f"{n[:8]} {'stream' if s else 'memory'} ({size_text(self.shares[n])} "
                          f"of {size_text(facts[n].memory)})" for n, s in self.streams.items())
        return f"data placement: {self.placement} ({self.why}); read mode per node: {modes}"


def plan_data(facts: list[NodeFacts], manifest: ShardManifest, placement: str, read_mode: str,
              memory_fraction: float, seed: int, global_batch: int) -> DataPlan:
    """facts[r] are the facts of rank r's node."""
    rank_nodes = [f.node for f in facts]
    by_node = {f.node: f for f in facts}
    nodes = list(by_node)
    dataset = sum(s.bytes for split in manifest.splits.values() for s in split.shards)
    chosen, why = choose_placement(placement, dataset, [by_node[n].memory for n in nodes],
                                   [by_node[n].disk_free for n in nodes], memory_fraction)
    train = manifest.splits["train"].shards
    holdings = {n: set(by_node[n].held.get("train", ())) for n in nodes}
    layout = plan_layout(train, chosen, rank_nodes, seed, global_batch, holdings=holdings)
    empty = empty_epoch(SampleIds(train), layout, rank_nodes)
    if empty:   # the driver refuses this before workers start; here the node count is known
        raise UserError(f"{empty} ({len(nodes)} node(s), {chosen} placement); lower "
                        "--batch-size or --num-workers")
    size = {s.path: s.bytes for s in train}
    shares = {}
    for g in layout.groups:
        for r in g.ranks:
            shares[rank_nodes[r]] = sum(size[p] for p in g.shards)
    modes = {n: streams(read_mode, shares[n], by_node[n].memory, memory_fraction) for n in nodes}
    layouts = {"train": Layout(layout.groups, order_style(list(modes.values())))}
    val = manifest.splits["val"].shards
    layouts["val"] = plan_layout(val, chosen, rank_nodes, seed, len(rank_nodes),
                                 holdings={n: set(by_node[n].held.get("val", ())) for n in nodes})
    return DataPlan(chosen, why, layouts, modes, shares)


class LocalMap:
    """global sample id -> its index in the node file (-1 where the node does not hold it),
    as `local[gids]`. It keeps one entry per shard the node holds, not one per sample of the
    split: a rank's index arrays are sized to what its node holds."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray, firsts: np.ndarray):
        order = np.argsort(starts)
        self.starts, self.ends, self.firsts = starts[order], ends[order], firsts[order]

    def __getitem__(self, gids) -> np.ndarray:
        gids = np.asarray(gids, np.int64)
        if not len(self.starts):
            return np.full(gids.shape, -1, np.int64)
        i = np.maximum(np.searchsorted(self.starts, gids, side="right") - 1, 0)
        inside = (gids >= self.starts[i]) & (gids < self.ends[i])
        return np.where(inside, self.firsts[i] + gids - self.starts[i], -1)

    def file_ids(self) -> np.ndarray:
        """The inverse: per position in the node file, its global sample id (-1: none)."""
        out = np.full(int((self.firsts + self.ends - self.starts).max(initial=0)), -1, np.int64)
        for start, end, first in zip(self.starts, self.ends, self.firsts):
            out[first:first + end - start] = np.arange(start, end)
        return out


def local_map(ids: SampleIds, state) -> LocalMap:
    """global sample id -> its index in the node file (-1 where the node does not hold it)."""
    held = state.shards if state else []
    starts = np.array([ids.offsets[ids.position[h.path]] for h in held], np.int64)
    return LocalMap(starts, starts + np.array([h.samples for h in held], np.int64),
                    np.array([h.first for h in held], np.int64))


@dataclass
class Fetched:
    """What one node fetched for this worker group (both splits)."""

    node: str
    seconds: float = 0.0
    bytes_downloaded: int = 0
    splits: dict[str, dict] = field(default_factory=dict)


def fetch_while_waiting(storage: Storage, data_uri: str, manifest: ShardManifest,
                        plan: DataPlan, rank: int, node: str, cache_dir: str,
                        any_pending) -> tuple[dict, Fetched]:
    """Make this node's file of each split hold its shards (fetching what it lacks), while every
    rank takes part in a short collective every POLL_SECONDS (`any_pending(still_fetching)` is
    True while any rank still fetches): warm ranks wait in collectives that each end within
    seconds, however long a cold node's fetch takes. Returns ({split: state}, what was done)."""
    result: dict = {}

    def fetch():
        try:
            for split in SPLITS:
                group, _, _ = plan.layouts[split].place(rank)
                state, stats = NodeSplit(storage, data_uri, manifest, split,
                                         cache_dir).ensure(list(group.shards))
                result[split] = (state, stats, stats.seconds)
        except BaseException as exc:   # raised in the rank's own thread below
            result["error"] = exc

    thread = threading.Thread(target=fetch, name="node-cache-fetch", daemon=True)
    thread.start()
    while True:
        thread.join(timeout=POLL_SECONDS)
        if "error" in result:
            raise result["error"]
        if not any_pending(thread.is_alive()):
            break
    done = Fetched(node)
    states = {}
    for split in SPLITS:
        state, stats, seconds = result[split]
        states[split] = state
        done.seconds += seconds
        done.bytes_downloaded += stats.bytes_downloaded
        done.splits[split] = asdict(stats)
    return states, done


def prepare(storage: Storage, data_uri: str, manifest: ShardManifest, loader_settings,
            rank: int, node: str, seed: int, global_batch: int, gather, any_pending):
    """The whole of it, for one rank: (reads per split, plan, facts by node, what this node
    fetched). `gather(value)` returns every rank's value in rank order."""
    s = loader_settings
    facts = exchange_facts(measure_node(node, storage, data_uri, manifest, s.cache_dir), rank,
                           manifest, gather)
    plan = plan_data(facts, manifest, s.placement, s.read_mode, s.memory_fraction, seed,
                     global_batch)
    states, fetched = fetch_while_waiting(storage, data_uri, manifest, plan, rank, node,
                                          s.cache_dir, any_pending)
    reads = {}
    for split in SPLITS:
        ids = SampleIds(manifest.splits[split].shards)
        path = str(NodeSplit(storage, data_uri, manifest, split, s.cache_dir).path)
        reads[split] = Reads(path, ids, local_map(ids, states[split]), plan.layouts[split],
                             rank, plan.streams[node])
    return reads, plan, {f.node: f for f in facts}, fetched
