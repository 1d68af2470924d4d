"""Which shards each node holds, and which samples each rank reads, step by step, every epoch.

Two placements:
- global: every node holds the whole split; every epoch is one order of it, and each global
  batch of it is cut into parts for all ranks (the FFCV recipe on one big node).
- node: each node holds about 1/N of each split (whole shards, balanced by how many samples its
  workers take per step); every epoch each node orders the samples of its own shards and each
  of its global-batch parts is cut among its ranks.

The order of an epoch is a pure function of (seed, epoch, the shards a group reads) over global
sample ids (shard, index in shard): never over a node file's local indices or page pointers,
which depend on the file's history (shards are appended after whatever a node already held).
Each node maps ids to its own file. So every rank of a global placement cuts the same sequence,
and a run over warm caches reads exactly the samples of the same run over fresh ones.

Every step reads one global batch (a constant of the run: the lr schedule depends on it), shared
among the ranks of the moment; every rank takes the same number of steps per epoch, so DDP's
collectives stay in step, and no sample is read twice in an epoch. An epoch interrupted at a
step (a preemption, a failure) resumes at the next step of the same order: the samples already
read are known from the cursor (data position) the checkpoint holds, even when the run resumes
on other nodes, with other shares.

The assignment keeps shards where they already are: each shard goes first to a node that holds
it in its cache (while that node is under its target), the rest by rendezvous hashing to the
node that ranks it highest among those still under their target. It depends only on the seed,
the shards, the node ids and what the nodes hold, so a restarted run on the same nodes finds its
caches warm, and when a node is replaced or the run grows, the nodes that stay keep their shards
and only the missing ones are fetched.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .manifest import ShardInfo

STREAM_WINDOW = 2048   # samples shuffled together in the stream order
STREAM_SHARDS = 4      # shards read side by side in the stream order
STYLES = ("random", "stream")


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


# -- sample identities ---------------------------------------------------------------------------
class SampleIds:
    """Global sample ids of one split: id = the shard's offset (manifest order) + index in it."""

    def __init__(self, shards: list[ShardInfo]):
        self.paths = [s.path for s in shards]
        self.sizes = np.array([s.samples for s in shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.position = {p: i for i, p in enumerate(self.paths)}
        self.total = int(self.offsets[-1])
        self._terms: np.ndarray | None = None

    def canonical(self, paths) -> list[str]:
        """These shard paths in manifest order (an order's input is a set, not a listing)."""
        return sorted(paths, key=self.position.__getitem__)

    def of(self, paths) -> np.ndarray:
        """The ids of these shards' samples, shard by shard in manifest order."""
        parts = [np.arange(self.offsets[i], self.offsets[i + 1])
                 for i in sorted(self.position[p] for p in paths)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def name(self, gid: int) -> str:
        """`<shard path>#<index in shard>`: what the epoch digest hashes."""
        i = int(np.searchsorted(self.offsets, gid, side="right")) - 1
        return f"{self.paths[i]}#{gid - self.offsets[i]}"

    @property
    def terms(self) -> np.ndarray:
        """Per id: the first 8 bytes (little-endian) of sha256 of its name, as uint64."""
        if self._terms is None:
            out = np.empty(self.total, np.uint64)
            for i, path in enumerate(self.paths):
                start = int(self.offsets[i])
                out[start:start + int(self.sizes[i])] = np.frombuffer(b"".join(
                    hashlib.sha256(f"{path}#{k}".encode()).digest()[:8]
                    for k in range(int(self.sizes[i]))), "<u8")
            self._terms = out
        return self._terms

    def digest(self, gids: np.ndarray) -> int:
        """Sum mod 2^64 of the terms of these ids (order does not matter)."""
        return int(self.terms[gids].sum(dtype=np.uint64)) if len(gids) else 0


def digest_hex(value: int) -> str:
    return f"{value % 2**64:016x}"


# -- the order of an epoch ------------------------------------------------------------------------
def group_sequence(ids: SampleIds, shards, seed: int, epoch: int, style: str) -> np.ndarray:
    """The order in which a group of ranks reads these shards' samples in one epoch.

    random: a permutation of all of them (memory mode: the node's share is in RAM).
    stream: shards in a shuffled order, STREAM_SHARDS at a time read side by side, each from its
    first sample to its last, and samples shuffled within windows of STREAM_WINDOW: a shard's
    pages are read once, in order, so a node whose share is larger than its RAM reads it
    through FFCV's process cache without thrashing."""
    shards = ids.canonical(shards)
    rng = np.random.default_rng([seed, epoch])
    if style == "random":
        return rng.permutation(ids.of(shards))
    if style != "stream":
        raise ValueError(f"unknown order style {style!r}")
    picked = [shards[i] for i in rng.permutation(len(shards))]
    parts = []
    for start in range(0, len(picked), STREAM_SHARDS):
        side = [ids.of([p]) for p in picked[start:start + STREAM_SHARDS]]
        progress = np.concatenate([(np.arange(len(s)) + 0.5) / len(s) for s in side])
        parts.append(np.concatenate(side)[np.argsort(progress, kind="stable")])
    sequence = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    for start in range(0, len(sequence), STREAM_WINDOW):
        rng.shuffle(sequence[start:start + STREAM_WINDOW])
    return sequence


def rank_counts(global_batch: int, world: int) -> list[int]:
    """Samples each rank takes of one global batch: as even as can be, the first ranks one more."""
    if world < 1 or global_batch < world:
        raise ValueError(f"a global batch of {global_batch} cannot feed {world} ranks")
    base, extra = divmod(global_batch, world)
    return [base + (r < extra) for r in range(world)]


@dataclass(frozen=True)
class Group:
    """Ranks that read one sequence: in the global placement all of them, else one node's."""

    shards: tuple[str, ...]    # manifest order
    ranks: tuple[int, ...]     # world ranks, ascending
    counts: tuple[int, ...]    # samples per step of each of those ranks

    @property
    def per_step(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class Layout:
    """Who reads what in one split while the worker group stays as it is."""

    groups: tuple[Group, ...]
    style: str = "random"

    @property
    def global_batch(self) -> int:
        return sum(g.per_step for g in self.groups)

    def place(self, rank: int) -> tuple[Group, int, int]:
        """(group of rank, offset of its part in the group's step, its count)."""
        for g in self.groups:
            if rank in g.ranks:
                i = g.ranks.index(rank)
                return g, sum(g.counts[:i]), g.counts[i]
        raise KeyError(f"rank {rank} is in no group")

    def to_dict(self) -> dict:
        return {"style": self.style, "groups": [
            {"shards": list(g.shards), "ranks": list(g.ranks), "counts": list(g.counts)}
            for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(tuple(Group(tuple(g["shards"]), tuple(g["ranks"]), tuple(g["counts"]))
                         for g in d["groups"]), d["style"])


def plan_layout(shards: list[ShardInfo], placement: str, rank_nodes: list[str], seed: int,
                global_batch: int, style: str = "random",
                holdings: dict[str, set[str]] | None = None) -> Layout:
    """rank_nodes[r] is the node id of rank r; holdings what each node's cache holds."""
    counts = rank_counts(global_batch, len(rank_nodes))
    ids = SampleIds(shards)
    if placement == "global":
        return Layout((Group(tuple(ids.paths), tuple(range(len(rank_nodes))), tuple(counts)),),
                      style)
    if placement != "node":
        raise ValueError(f"unknown placement {placement!r}")
    nodes = list(dict.fromkeys(rank_nodes))   # in the order of their first rank
    weights = {n: sum(c for r, c in enumerate(counts) if rank_nodes[r] == n) for n in nodes}
    held = assign(shards, weights, seed, holdings)
    groups = []
    for n in nodes:
        ranks = tuple(r for r in range(len(rank_nodes)) if rank_nodes[r] == n)
        groups.append(Group(tuple(held[n]), ranks, tuple(counts[r] for r in ranks)))
    return Layout(tuple(groups), style)


@dataclass
class Segment:
    """Part of an epoch read under one layout: its steps so far."""

    layout: Layout
    steps: int = 0


@dataclass
class Cursor:
    """Where an epoch stands: what a checkpoint taken at a step boundary records, so that the
    resumed run reads the rest of the epoch's order and nothing it already read."""

    epoch: int                        # the epoch in progress (0-based)
    seed: int
    global_batch: int
    segments: list[Segment] = field(default_factory=list)
    samples: int = 0                  # samples read so far this epoch, all ranks
    digest: int = 0                   # their digest (sum mod 2^64)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "global_batch": self.global_batch,
                "samples": self.samples, "digest": digest_hex(self.digest),
                "segments": [{"layout": s.layout.to_dict(), "steps": s.steps}
                             for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> "Cursor":
        return cls(int(d["epoch"]), int(d["seed"]), int(d["global_batch"]),
                   [Segment(Layout.from_dict(s["layout"]), int(s["steps"])) for s in d["segments"]],
                   int(d["samples"]), int(d["digest"], 16))


def read_before(ids: SampleIds, cursor: Cursor) -> np.ndarray:
    """Mask over ids: the samples the cursor's segments read (all ranks)."""
    done = np.zeros(ids.total, bool)
    for seg in cursor.segments:
        taken = []
        for g in seg.layout.groups:
            seq = group_sequence(ids, g.shards, cursor.seed, cursor.epoch, seg.layout.style)
            taken.append(seq[~done[seq]][:seg.steps * g.per_step])
        for t in taken:
            done[t] = True
    return done


@dataclass(frozen=True)
class EpochReads:
    """One rank's reads of (the rest of) one epoch."""

    gids: np.ndarray    # step by step: `count` ids per step
    steps: int
    count: int


def epoch_reads(ids: SampleIds, layout: Layout, rank: int, seed: int, epoch: int,
                done: np.ndarray | None = None, max_steps: int = 0) -> EpochReads:
    """This rank's samples of an epoch under `layout`, skipping those `done` (read before an
    interruption). Every rank gets the same number of steps: the fewest any group can fill."""
    sequences = []
    for g in layout.groups:
        seq = group_sequence(ids, g.shards, seed, epoch, layout.style)
        sequences.append(seq if done is None else seq[~done[seq]])
    steps = min(len(s) // g.per_step for g, s in zip(layout.groups, sequences))
    if max_steps:
        steps = min(steps, max_steps)
    group, offset, count = layout.place(rank)
    seq = sequences[layout.groups.index(group)]
    mine = seq[:steps * group.per_step].reshape(steps, group.per_step)[:, offset:offset + count]
    return EpochReads(mine.reshape(-1), steps, count)


def val_part(ids: SampleIds, layout: Layout, rank: int) -> np.ndarray:
    """This rank's contiguous part of its group's validation samples: across ranks, every
    sample exactly once."""
    group, _, _ = layout.place(rank)
    return np.array_split(ids.of(group.shards), len(group.ranks))[group.ranks.index(rank)]


def order_style(streams: list[bool]) -> str:
    """One order for every rank of the run: the stream order as soon as any node streams (ranks
    of a global placement must cut the same sequence, whatever each node's read mode)."""
    return "stream" if any(streams) else "random"


# -- choices made from what each node has -------------------------------------------------------
def size_text(b: float) -> str:
    return f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB"


def choose_placement(setting: str, dataset_bytes: int, memory: list[float], disk: list[float],
                     fraction: float) -> tuple[str, str]:
    """(global | node, why), from the memory and cache-disk free space measured on each node that
    holds workers: auto is global when the whole dataset fits in `fraction` of the smallest of
    those nodes' memory and on each one's cache disk."""
    if setting != "auto":
        return setting, "as set"
    if not memory:
        raise ValueError("choose_placement needs the nodes that hold workers")
    smallest, free = min(memory), min(disk)
    n = len(memory)
    figures = (f"the {size_text(dataset_bytes)} dataset, the smallest worker node's "
               f"{size_text(smallest)} of memory (x {fraction:g}) and {size_text(free)} free on "
               "its cache disk")
    if dataset_bytes <= fraction * smallest and dataset_bytes <= free:
        return "global", f"{figures}: it fits, each of the {n} node(s) holds all of it"
    return "node", f"{figures}: it does not fit, each of the {n} node(s) holds about 1/{n} of it"


def streams(read_mode: str, share_bytes: int, memory: float, fraction: float) -> bool:
    """Whether a node reads its share page by page (stream) instead of through the page cache:
    read_mode auto streams when the share is over `fraction` of the node's memory."""
    if read_mode in ("memory", "stream"):
        return read_mode == "stream"
    return share_bytes > fraction * memory
