"""Which shards each node holds, and which samples each rank reads, step by step, every epoch.

Two placements:
- global: every node holds the whole split; every epoch is one order of it, and each global
  batch of it is cut into parts for all ranks (the FFCV recipe on one big node).
- node: each node reads exactly its part of each split, in proportion to the samples its
  workers take per step: whole shards, and at most two shards read in part (a range of their
  ids; the node holds them whole), so it holds at most its share plus two shards and every
  epoch trains on all of the split but the remainder of a global batch. Every epoch each node
  orders the samples of its share and each of its global-batch parts is cut among its ranks.

The order of an epoch is a pure function of (seed, epoch, the samples a group reads) over global
sample ids (shard, index in shard): never over a node file's local indices or page pointers,
which depend on the file's history (shards are appended after whatever a node already held).
Each node maps ids to its own file. So every rank of a global placement cuts the same sequence,
and a run over warm caches reads exactly the samples of the same run over fresh ones.

Every step reads one global batch (a constant of the run: the lr schedule depends on it), shared
among the ranks of the moment; every rank takes the same number of steps per epoch, so DDP's
collectives stay in step, and no sample is read twice in an epoch. An epoch interrupted at a
step (a preemption, a failure) resumes at the next step of the same order: the samples already
read are known from the cursor (data position) the checkpoint holds, even when the run resumes
on other nodes, with other shares. Under the global placement the resumed epoch reads exactly
the undisturbed epoch's samples; under the node placement only on the same assignment: re-placed
on other nodes, it reads the rest from the new shares (no sample twice, but another set).

The assignment (balance) keeps shards where they already are: each shard goes whole first to a
node that holds it in its cache (while it fits that node's share), the rest by rendezvous
hashing to the node that ranks it highest among those it fits; what fits no node whole is cut
among the nodes still short, holders first. It depends only on the seed, the shards, the node
ids and what the nodes hold, so a restarted run on the same nodes finds its caches warm, and
when a node is replaced or the run grows, the nodes that stay keep their whole shards and
mostly their cut ones (`pipeline bench scale` reports the share fetched again).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .manifest import ShardInfo
from .shares import Share, apportion, assign, balance  # noqa: F401  (placement's API)

STREAM_WINDOW = 2048   # samples shuffled together in the stream order
STREAM_SHARDS = 4      # shards read side by side in the stream order
STYLES = ("random", "stream")


# -- sample identities ---------------------------------------------------------------------------
class SampleIds:
    """Global sample ids of one split: id = the shard's offset (manifest order) + index in it."""

    def __init__(self, shards: list[ShardInfo]):
        self.paths = [s.path for s in shards]
        self.sizes = np.array([s.samples for s in shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.position = {p: i for i, p in enumerate(self.paths)}
        self.total = int(self.offsets[-1])
        self.terms = _Terms(self)

    def canonical(self, paths) -> list[str]:
        """These shard paths in manifest order (an order's input is a set, not a listing)."""
        return sorted(paths, key=self.position.__getitem__)

    def ranges(self, paths, cuts=()) -> list[tuple[int, int]]:
        """(first id, end id) of each shard's samples read, in manifest order; `cuts` (path,
        start, stop) narrow a shard to part of it."""
        cut = {p: (a, b) for p, a, b in cuts}
        out = []
        for i in sorted(self.position[p] for p in paths):
            a, b = cut.get(self.paths[i], (0, int(self.sizes[i])))
            out.append((int(self.offsets[i]) + a, int(self.offsets[i]) + b))
        return out

    def of(self, paths, cuts=()) -> np.ndarray:
        """The ids of these shards' samples (cut ones: their part), in manifest order."""
        parts = [np.arange(a, b) for a, b in self.ranges(paths, cuts)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def name(self, gid: int) -> str:
        """`<shard path>#<index in shard>`: what the epoch digest hashes."""
        i = int(np.searchsorted(self.offsets, gid, side="right")) - 1
        return f"{self.paths[i]}#{gid - self.offsets[i]}"

    def digest(self, gids: np.ndarray) -> int:
        """Sum mod 2^64 of the terms of these ids (order does not matter)."""
        return int(self.terms[gids].sum(dtype=np.uint64)) if len(gids) else 0


class _Terms:
    """`ids.terms[gids]`: per id, the first 8 bytes (little-endian) of sha256 of its name, as
    uint64, hashed for the ids asked only (a rank's reads, never the whole split). A rank asks
    for a longer prefix of the same reads at each checkpoint: only the new tail is hashed."""

    def __init__(self, ids: SampleIds):
        self.ids = ids
        self._last = (np.zeros(0, np.int64), np.zeros(0, np.uint64))

    def __getitem__(self, gids) -> np.ndarray:
        gids = np.asarray(gids, np.int64).reshape(-1)
        known, terms = self._last
        n = len(known) if len(known) <= len(gids) and np.array_equal(gids[:len(known)], known) \
            else 0
        tail = gids[n:]
        shard = np.searchsorted(self.ids.offsets, tail, side="right") - 1
        index = tail - self.ids.offsets[shard]
        paths = self.ids.paths
        new = np.frombuffer(b"".join(hashlib.sha256(f"{paths[s]}#{k}".encode()).digest()[:8]
                                     for s, k in zip(shard.tolist(), index.tolist())), "<u8")
        out = np.concatenate([terms[:n], new]) if n else new.copy()
        self._last = (gids.copy(), out)
        return out


def digest_hex(value: int) -> str:
    return f"{value % 2**64:016x}"


# -- the order of an epoch ------------------------------------------------------------------------
def group_sequence(ids: SampleIds, shards, seed: int, epoch: int, style: str,
                   cuts=()) -> np.ndarray:
    """The order in which a group of ranks reads these shards' samples (`cuts`: the part of
    a shard it reads) in one epoch.

    random: a permutation of all of them (memory mode: the node's share is in RAM).
    stream: shards in a shuffled order, STREAM_SHARDS at a time read side by side, each from its
    first sample to its last, and samples shuffled within windows of STREAM_WINDOW: a shard's
    pages are read once, in order, so a node whose share is larger than its RAM reads it
    through FFCV's process cache without thrashing."""
    shards = ids.canonical(shards)
    rng = np.random.default_rng([seed, epoch])
    if style == "random":
        return rng.permutation(ids.of(shards, cuts))
    if style != "stream":
        raise ValueError(f"unknown order style {style!r}")
    spans = ids.ranges(shards, cuts)
    picked = [spans[i] for i in rng.permutation(len(spans))]
    parts = []
    for start in range(0, len(picked), STREAM_SHARDS):
        side = [np.arange(a, b) for a, b in picked[start:start + STREAM_SHARDS]]
        progress = np.concatenate([(np.arange(len(s)) + 0.5) / max(1, len(s)) for s in side])
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

    shards: tuple[str, ...]    # manifest order: what the group's node holds
    ranks: tuple[int, ...]     # world ranks, ascending
    counts: tuple[int, ...]    # samples per step of each of those ranks
    cuts: tuple[tuple[str, int, int], ...] = ()   # shards read in part: (path, start, stop)

    @property
    def per_step(self) -> int:
        return sum(self.counts)

    def sequence(self, ids: SampleIds, seed: int, epoch: int, style: str) -> np.ndarray:
        return group_sequence(ids, self.shards, seed, epoch, style, self.cuts)

    def size(self, ids: SampleIds, done: np.ndarray | None = None) -> int:
        """Samples the group reads in an epoch (not yet `done`)."""
        spans = ids.ranges(self.shards, self.cuts)
        if done is None:
            return sum(b - a for a, b in spans)
        return sum(b - a - int(np.count_nonzero(done[a:b])) for a, b in spans)


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

    def to_dict(self, reads_only: bool = False) -> dict:
        """reads_only: what a cursor needs to know which samples a segment read (each group's
        shards, cuts and samples per step), without a list of ranks that grows with the world."""
        return {"style": self.style, "groups": [
            {"shards": list(g.shards),
             **({"per_step": g.per_step} if reads_only else
                {"ranks": list(g.ranks), "counts": list(g.counts)}),
             **({"cuts": [list(c) for c in g.cuts]} if g.cuts else {})}
            for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        """A layout saved in a checkpoint; one saved before cuts existed reads whole shards;
        one saved reads_only has groups without ranks (enough for read_before)."""
        return cls(tuple(Group(tuple(g["shards"]), tuple(g.get("ranks", ())),
                               tuple(g["counts"]) if "counts" in g else (int(g["per_step"]),),
                               tuple((str(p), int(a), int(b)) for p, a, b in g.get("cuts", ())))
                         for g in d["groups"]), d["style"])


def plan_layout(shards: list[ShardInfo], placement: str, rank_nodes: list[str], seed: int,
                global_batch: int, style: str = "random",
                holdings: dict[str, set[str]] | None = None) -> Layout:
    """rank_nodes[r] is the node id of rank r; holdings what each node's cache holds."""
    counts = rank_counts(global_batch, len(rank_nodes))
    if placement == "global":
        return Layout((Group(tuple(s.path for s in shards), tuple(range(len(rank_nodes))),
                             tuple(counts)),), style)
    if placement != "node":
        raise ValueError(f"unknown placement {placement!r}")
    members: dict[str, list[int]] = {}
    for r, n in enumerate(rank_nodes):   # nodes in the order of their first rank
        members.setdefault(n, []).append(r)
    weights = {n: sum(counts[r] for r in ranks) for n, ranks in members.items()}
    shares = balance(shards, weights, seed, holdings)
    return Layout(tuple(Group(shares[n].shards, tuple(ranks), tuple(counts[r] for r in ranks),
                              shares[n].cuts)
                        for n, ranks in members.items()), style)


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
    views: int = 0                    # their crops and flips' digest (views.py)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "global_batch": self.global_batch,
                "samples": self.samples, "digest": digest_hex(self.digest),
                "views": digest_hex(self.views),
                "segments": [{"layout": s.layout.to_dict(reads_only=True), "steps": s.steps}
                             for s in self.segments]}

    @classmethod
    def from_dict(cls, d: dict) -> "Cursor":
        return cls(int(d["epoch"]), int(d["seed"]), int(d["global_batch"]),
                   [Segment(Layout.from_dict(s["layout"]), int(s["steps"])) for s in d["segments"]],
                   int(d["samples"]), int(d["digest"], 16), int(d.get("views", "0"), 16))


def read_before(ids: SampleIds, cursor: Cursor) -> np.ndarray:
    """Mask over ids: the samples the cursor's segments read (all ranks)."""
    done = np.zeros(ids.total, bool)
    for seg in cursor.segments:
        taken = []
        for g in seg.layout.groups:
            seq = g.sequence(ids, cursor.seed, cursor.epoch, seg.layout.style)
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


def epoch_steps(ids: SampleIds, layout: Layout, done: np.ndarray | None = None,
                max_steps: int = 0) -> int:
    """Steps every rank takes in (the rest of) an epoch: the fewest any group can fill, counted
    from the groups' sizes (no group's order is needed)."""
    steps = min(g.size(ids, done) // g.per_step for g in layout.groups)
    return min(steps, max_steps) if max_steps else steps


def empty_epoch(ids: SampleIds, layout: Layout, rank_nodes: list[str] | None = None) -> str | None:
    """Why an epoch under `layout` would have 0 steps (a group's share is smaller than its
    part of one global batch), in words with the figures; None when it has at least one."""
    for g in layout.groups:
        size = g.size(ids)
        if size < g.per_step:
            who = f"node {rank_nodes[g.ranks[0]][:8]}" if rank_nodes and len(layout.groups) > 1 \
                else "the run"
            return (f"{who} reads {size} of the {ids.total} samples and takes {g.per_step} of each "
                    f"global batch of {layout.global_batch} ({len(g.ranks)} rank(s)): an epoch "
                    "would have 0 steps")
    return None


def epoch_reads(ids: SampleIds, layout: Layout, rank: int, seed: int, epoch: int,
                done: np.ndarray | None = None, max_steps: int = 0) -> EpochReads:
    """This rank's samples of an epoch under `layout`, skipping those `done` (read before an
    interruption). Every rank gets the same number of steps: the fewest any group can fill.
    Only the rank's own group's order is computed."""
    steps = epoch_steps(ids, layout, done, max_steps)
    group, offset, count = layout.place(rank)
    seq = group.sequence(ids, seed, epoch, layout.style)
    if done is not None:
        seq = seq[~done[seq]]
    mine = seq[:steps * group.per_step].reshape(steps, group.per_step)[:, offset:offset + count]
    return EpochReads(mine.reshape(-1).copy(), steps, count)


def val_part(ids: SampleIds, layout: Layout, rank: int) -> np.ndarray:
    """This rank's contiguous part of its group's validation samples: across ranks, every
    sample exactly once."""
    group, _, _ = layout.place(rank)
    return np.array_split(ids.of(group.shards, group.cuts),
                          len(group.ranks))[group.ranks.index(rank)]


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
