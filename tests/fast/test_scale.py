"""Placement, planning and checkpoint costs at ImageNet-1k scale (1,281,167 samples in 1,024-sample
shards), on 8 to 1,024 nodes of 8 ranks: the invariants `pipeline bench scale` reports on."""
from __future__ import annotations

import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.bench.scale import fake_manifest, fake_shards, node_name, rank_facts
from pipeline.data.node_data import local_map, plan_data
from pipeline.data.placement import (SampleIds, balance, empty_epoch, epoch_reads, epoch_steps,
                                     plan_layout)
from pipeline.errors import UserError
from pipeline.training.cluster import batch_refusal

IMAGENET = 1_281_167
SHARDS = fake_shards("train", IMAGENET, 1024)
IDS = SampleIds(SHARDS)
NODE_COUNTS = [8, 64, 256, 1024]


@pytest.mark.parametrize("nodes", NODE_COUNTS)
def test_every_epoch_trains_all_but_a_global_batch_remainder_and_no_node_holds_over_two_shards_more(
        nodes):
    ranks = [node_name(n) for n in range(nodes) for _ in range(8)]
    global_batch = 8192   # one image per rank per step on 1,024 nodes
    layout = plan_layout(SHARDS, "node", ranks, seed=0, global_batch=global_batch)
    steps = epoch_steps(IDS, layout)
    assert steps == IMAGENET // global_batch   # the shortfall is only the remainder of a batch
    assert steps * global_batch / IMAGENET >= 0.99
    seen = np.zeros(IMAGENET, np.int64)
    for g in layout.groups:
        share = IMAGENET * g.per_step / global_batch
        held = sum(IDS.sizes[IDS.position[p]] for p in g.shards)
        assert held <= share + 2 * 1024
        assert len(g.cuts) <= 2
        seen[IDS.of(g.shards, g.cuts)] += 1
    assert (seen == 1).all()   # every sample in exactly one node's share


def test_one_node_joining_or_going_refetches_little():
    nodes = [node_name(n) for n in range(64)]
    before = balance(SHARDS, {n: 8 for n in nodes}, seed=0)
    held = {n: set(s.shards) for n, s in before.items()}
    for after in (nodes + [node_name(64)], nodes[1:]):
        shares = balance(SHARDS, {n: 8 for n in after}, seed=0, holdings=held)
        fetched = sum(1 for n, s in shares.items() for p in s.shards if p not in held.get(n, ()))
        # the node that came or went: its share, about 1/64 of the split; the cuts around it
        assert fetched / len(SHARDS) <= 0.08


def test_an_epoch_of_no_step_is_refused_with_the_figures():
    assert batch_refusal(IMAGENET, 512, 64) is None
    line = batch_refusal(1000, 64, 32)
    assert "global batch of 2048" in line and "1000 training images" in line
    assert "0 steps" in line and "\n" not in line
    # where the node count is known only when the workers start (the plan every rank makes)
    manifest = fake_manifest(5000, 64)
    facts = rank_facts([node_name(n) for n in range(4)], 8, {})
    plan_data(facts, manifest, "node", "memory", 0.5, 0, 32 * 8 * 2)   # 5000 >= 512
    with pytest.raises(UserError, match="0 steps"):
        plan_data(facts, manifest, "node", "memory", 0.5, 0, 8192)
    small = fake_shards("train", 100, 64)
    assert "0 steps" in empty_epoch(SampleIds(small), plan_layout(small, "global", ["a"] * 4, 0, 128))


def one_rank_start(nodes: int):
    """What rank 0 computes at a start: the plan, its group's order, the reads of its first
    epoch; (peak bytes, its reads)."""
    manifest = fake_manifest(IMAGENET, 1024)
    facts = rank_facts([node_name(n) for n in range(nodes)], 8, {})
    tracemalloc.start()
    plan = plan_data(facts, manifest, "node", "memory", 0.5, 0, 8 * nodes)
    group = plan.layouts["train"].groups[0]
    first, held = 0, []
    for path in group.shards:   # its node file: the shards in the order they were fetched
        held.append(SimpleNamespace(path=path, samples=int(IDS.sizes[IDS.position[path]]),
                                    first=first))
        first += held[-1].samples
    reads = epoch_reads(IDS, plan.layouts["train"], 0, 0, 0)
    assert (local_map(IDS, SimpleNamespace(shards=held))[reads.gids] >= 0).all()
    IDS.terms[reads.gids]   # the digest at a checkpoint: this rank's reads only
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, reads


def test_a_ranks_start_planning_does_not_grow_with_the_cluster():
    small, _ = one_rank_start(8)
    large, reads = one_rank_start(256)
    assert large <= small * 1.5
    assert large < 4 * IMAGENET   # never an array per sample of the split on every rank
    assert len(reads.gids) * 256 * 8 <= IMAGENET


def test_each_node_sends_what_it_holds_once_and_every_rank_gets_the_same_facts():
    import threading

    from pipeline.data.node_data import NodeFacts, exchange_facts

    manifest = fake_manifest(20_000, 1024)
    paths = [s.path for s in manifest.splits["train"].shards]
    nodes = ["a", "a", "b", "b", "b"]
    held = {"a": paths[:3], "b": paths[5:]}
    world = len(nodes)
    barrier, calls, sent, out = threading.Barrier(world), {}, [], [None] * world

    def gather_as(rank):
        seq = [0]

        def gather(value):   # all_gather_object among threads: every rank's value, rank order
            slot = calls.setdefault(seq[0], [None] * world)
            slot[rank] = value
            sent.append(value)
            barrier.wait()
            seq[0] += 1
            got = list(slot)
            barrier.wait()
            return got
        return gather

    def rank(r):
        mine = NodeFacts(nodes[r], 1e9 * (r + 1), 2e9, {"train": held[nodes[r]], "val": []})
        out[r] = exchange_facts(mine, r, manifest, gather_as(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(o == out[0] for o in out)
    assert [f.node for f in out[0]] == nodes
    assert out[0][1].held["train"] == held["a"] and out[0][4].held["train"] == held["b"]
    assert out[0][1].memory == 1e9   # the node's first rank speaks for it
    # the holdings travel once per node (from its first rank), as 4-byte shard positions
    holdings = [v for v in sent if isinstance(v, dict)]
    assert len(holdings) == 2 and all(a.dtype.itemsize == 4 for h in holdings for a in h.values())


def test_an_epoch_resumed_from_a_saved_cursor_after_a_node_went_reads_no_sample_twice():
    import json

    from pipeline.data.placement import Cursor, Segment, read_before

    nodes = [node_name(n) for n in range(64)]
    before = plan_layout(SHARDS, "node", [n for n in nodes for _ in range(8)], 0, 8192)
    saved = json.loads(json.dumps(Cursor(0, 0, 8192, [Segment(before, 50)]).to_dict()))
    done = read_before(IDS, Cursor.from_dict(saved))
    assert done.sum() == 50 * 8192
    held = {n: set(g.shards) for n, g in zip(nodes, before.groups)}
    rest = nodes[1:]
    after = plan_layout(SHARDS, "node", [n for n in rest for _ in range(8)], 0, 8192,
                        holdings={n: held[n] for n in rest})
    reads = [epoch_reads(IDS, after, r, 0, 0, done) for r in range(len(rest) * 8)]
    got = np.concatenate([r.gids for r in reads])
    assert len(set(got.tolist())) == len(got) and not done[got].any()
    assert 50 + reads[0].steps >= IMAGENET // 8192 - 2   # the rest, less what the re-cut costs
