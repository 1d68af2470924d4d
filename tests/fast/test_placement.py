"""Which node holds which shards, and which samples each rank reads."""
from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.data.manifest import ShardInfo
from pipeline.data.placement import assign, epoch_order, plan_reads

SHARDS = [ShardInfo(path=f"train/shard-{i:05d}.beton", samples=100 if i < 30 else 37,
                    bytes=1000, sha256="a" * 64) for i in range(31)]
TOTAL = sum(s.samples for s in SHARDS)
BIGGEST = max(s.samples for s in SHARDS)


def test_each_node_gets_about_its_share_and_every_shard_goes_somewhere():
    for nodes in (["a"], ["a", "b"], ["a", "b", "c"], ["n1", "n2", "n3", "n4", "n5"]):
        held = assign(SHARDS, {n: 1 for n in nodes}, seed=0)
        assert sorted(p for paths in held.values() for p in paths) == [s.path for s in SHARDS]
        samples = {n: sum(s.samples for s in SHARDS if s.path in paths) for n, paths in held.items()}
        for n in nodes:   # at most one shard over the even share
            assert samples[n] <= TOTAL / len(nodes) + BIGGEST


def test_weights_follow_workers_per_node():
    held = assign(SHARDS, {"a": 2, "b": 1}, seed=0)
    a = sum(s.samples for s in SHARDS if s.path in held["a"])
    assert abs(a - TOTAL * 2 / 3) <= BIGGEST


def test_the_same_inputs_give_the_same_assignment_and_nodes_keep_what_they_hold():
    before = assign(SHARDS, {"a": 1, "b": 1, "c": 1}, seed=7)
    assert before == assign(SHARDS, {"c": 1, "a": 1, "b": 1}, seed=7)
    held = {n: set(paths) for n, paths in before.items()}
    assert assign(SHARDS, {"a": 1, "b": 1, "c": 1}, seed=7, holdings=held) == before
    # c is lost and replaced by d: a and b keep everything, d gets exactly what c had
    after = assign(SHARDS, {"a": 1, "b": 1, "d": 1}, seed=7, holdings={"a": held["a"], "b": held["b"]})
    assert after["a"] == before["a"] and after["b"] == before["b"] and after["d"] == before["c"]
    # an elastic run grows from one node to two: a keeps half of what it has, b fetches the rest
    one = assign(SHARDS, {"a": 1}, seed=7)
    grown = assign(SHARDS, {"a": 1, "b": 1}, seed=7, holdings={"a": set(one["a"])})
    assert set(grown["a"]) < set(one["a"]) and not set(grown["a"]) & set(grown["b"])


def test_a_split_of_one_shard_lost_with_its_node_goes_to_whichever_node_ranks_it_first():
    """Like val on small data: the node that stayed may be the one that fetches it."""
    one = SHARDS[:1]
    fetched_by = set()
    for seed in range(40):
        before = assign(one, {"a": 1, "b": 1}, seed=seed)
        lost = next(n for n, paths in before.items() if paths)
        stayed = "b" if lost == "a" else "a"
        after = assign(one, {stayed: 1, "d": 1}, seed=seed, holdings={stayed: set()})
        assert sorted(p for paths in after.values() for p in paths) == [one[0].path]
        fetched_by.add("stayed" if after[stayed] else "new")
        # where it is, it stays
        assert assign(one, {lost: 1, "d": 1}, seed=seed, holdings={lost: {one[0].path}})[lost]
    assert fetched_by == {"stayed", "new"}


def test_every_rank_reads_the_same_count_and_no_sample_twice_per_epoch():
    rank_nodes = ["a", "a", "b", "c"]          # node a runs two workers
    plans = [plan_reads(SHARDS, "node", rank_nodes, r, seed=3) for r in range(4)]
    assert len({p.per_rank for p in plans}) == 1
    offsets = {s.path: i * 100 for i, s in enumerate(SHARDS)}   # fake sample ids per shard
    for epoch in (0, 1):
        seen = []
        for p in plans:
            ids = np.concatenate([np.arange(offsets[s], offsets[s] + next(
                x.samples for x in SHARDS if x.path == s)) for s in p.shards])
            mine = epoch_order(ids, p.part, p.parts, p.per_rank, 3, epoch)
            assert len(mine) == p.per_rank
            seen.extend(mine.tolist())
        assert len(seen) == len(set(seen))
    g = [plan_reads(SHARDS, "global", rank_nodes, r, seed=3) for r in range(4)]
    assert {p.per_rank for p in g} == {TOTAL // 4} and [p.part for p in g] == [0, 1, 2, 3]


def test_stream_order_reads_whole_pages_in_windows():
    ids = np.arange(1000)
    pages = ids // 10                          # 10 samples per page
    a = epoch_order(ids, 0, 2, 500, seed=1, epoch=0, pages=pages)
    b = epoch_order(ids, 1, 2, 500, seed=1, epoch=0, pages=pages)
    assert not set(a) & set(b) and len(set(a)) == 500
    # each rank touches about half the pages, not all of them
    assert len(set(pages[a])) <= 51 and len(set(pages[b])) <= 51
    assert not np.array_equal(a, epoch_order(ids, 0, 2, 500, seed=1, epoch=1, pages=pages))
    assert Counter(np.diff(np.sort(a)) == 1)[True] > 400   # contiguous runs of pages
