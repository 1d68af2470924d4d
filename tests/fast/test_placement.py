"""Which node holds which shards, and which samples each rank reads."""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from pipeline.data.manifest import ShardInfo
from pipeline.data.placement import (STREAM_WINDOW, Cursor, Layout, SampleIds, Segment, assign,
                                     balance,
                                     choose_placement, digest_hex, epoch_reads, group_sequence,
                                     order_style, plan_layout, rank_counts, read_before, streams,
                                     val_part)

SHARDS = [ShardInfo(path=f"train/shard-{i:05d}.beton", samples=100 if i < 30 else 37,
                    bytes=1000, sha256="a" * 64) for i in range(31)]
TOTAL = sum(s.samples for s in SHARDS)
BIGGEST = max(s.samples for s in SHARDS)


def share_ids(share):
    return IDS.of(share.shards, share.cuts)


def test_each_node_reads_exactly_its_share_and_every_sample_goes_to_one_node():
    for nodes in (["a"], ["a", "b"], ["a", "b", "c"], ["n1", "n2", "n3", "n4", "n5"]):
        shares = balance(SHARDS, {n: 1 for n in nodes}, seed=0)
        got = np.concatenate([share_ids(s) for s in shares.values()])
        assert sorted(got.tolist()) == list(range(TOTAL))
        for n in nodes:
            s = shares[n]
            assert len(share_ids(s)) in (TOTAL // len(nodes), TOTAL // len(nodes) + 1)
            assert len(s.cuts) <= 2     # it holds at most its share plus two shards
            assert sum(x.samples for x in SHARDS if x.path in s.shards) <= \
                TOTAL / len(nodes) + 2 * BIGGEST


def test_weights_follow_workers_per_node():
    shares = balance(SHARDS, {"a": 2, "b": 1}, seed=0)
    assert len(share_ids(shares["a"])) == round(TOTAL * 2 / 3)


def test_the_same_inputs_give_the_same_shares_and_nodes_keep_what_they_hold():
    before = balance(SHARDS, {"a": 1, "b": 1, "c": 1}, seed=7)
    assert before == balance(SHARDS, {"c": 1, "a": 1, "b": 1}, seed=7)
    held = {n: set(s.shards) for n, s in before.items()}
    assert balance(SHARDS, {"a": 1, "b": 1, "c": 1}, seed=7, holdings=held) == before
    # c is lost and replaced by d: a and b fetch nothing, d at most c's share and two shards
    after = balance(SHARDS, {"a": 1, "b": 1, "d": 1}, seed=7,
                    holdings={"a": held["a"], "b": held["b"]})
    assert set(after["a"].shards) <= held["a"] and set(after["b"].shards) <= held["b"]
    assert len(after["d"].shards) <= len(before["c"].shards) + 2
    # an elastic run grows from one node to two: a keeps part of what it has, b fetches the rest
    one = assign(SHARDS, {"a": 1}, seed=7)
    grown = assign(SHARDS, {"a": 1, "b": 1}, seed=7, holdings={"a": set(one["a"])})
    assert set(grown["a"]) < set(one["a"]) and len(set(grown["a"]) & set(grown["b"])) <= 1


def test_a_split_of_one_shard_is_cut_between_the_nodes():
    """Like val on small data: each node reads half of the one shard (and holds it)."""
    one = SHARDS[:1]
    for seed in range(5):
        shares = balance(one, {"a": 1, "b": 1}, seed=seed)
        assert sorted(len(IDS.of(s.shards, s.cuts)) for s in shares.values()) == [50, 50]
        assert all(s.shards == (one[0].path,) for s in shares.values())


# -- the order of an epoch over global sample ids ---------------------------------------------

IDS = SampleIds(SHARDS)


def read_epoch(layout, seed, epoch, done=None, max_steps=0):
    """Every rank's reads of one epoch: (ids read per rank, steps)."""
    world = sum(len(g.ranks) for g in layout.groups)
    out = [epoch_reads(IDS, layout, r, seed, epoch, done, max_steps) for r in range(world)]
    assert len({r.steps for r in out}) == 1          # every rank steps equally often
    return [r.gids for r in out], out[0].steps


def test_sample_ids_and_the_digest_are_as_the_contract_says():
    assert IDS.total == TOTAL and IDS.name(100) == "train/shard-00001.beton#0"
    gids = np.array([0, 5, 3030])
    want = sum(int.from_bytes(hashlib.sha256(IDS.name(g).encode()).digest()[:8], "little")
               for g in gids) % 2**64
    assert IDS.digest(gids) == want and digest_hex(want) == f"{want:016x}"
    assert IDS.digest(gids[::-1]) == want   # a set's digest: order does not matter


@pytest.mark.parametrize("placement,style,rank_nodes", list(itertools.product(
    ["global", "node"], ["random", "stream"],
    [["a"], ["a", "b"], ["a", "a", "b"], ["a", "b", "c", "c"]])))
def test_each_epoch_reads_every_sample_at_most_once_and_drops_only_a_remainder(
        placement, style, rank_nodes):
    batch = 8
    layout = plan_layout(SHARDS, placement, rank_nodes, seed=3, global_batch=batch * len(rank_nodes),
                         style=style)
    b = layout.global_batch
    for epoch in (0, 1):
        per_rank, steps = read_epoch(layout, 3, epoch)
        seen = np.concatenate(per_rank)
        assert len(seen) == len(set(seen.tolist())) == steps * b
        if placement == "global":   # only the remainder that does not fill a global batch
            assert TOTAL - len(seen) < b
        else:                        # per node: the same within each node's share
            for g in layout.groups:
                share = len(IDS.of(g.shards, g.cuts))
                mine = np.concatenate([per_rank[r] for r in g.ranks])
                assert set(mine.tolist()) <= set(IDS.of(g.shards, g.cuts).tolist())
                assert share - len(mine) < g.per_step or steps < share // g.per_step
    # a new order every epoch, the same one for the same (seed, epoch)
    assert not np.array_equal(read_epoch(layout, 3, 0)[0][0], read_epoch(layout, 3, 1)[0][0])
    assert np.array_equal(read_epoch(layout, 3, 1)[0][0], read_epoch(layout, 3, 1)[0][0])


def test_the_order_depends_on_the_shards_not_on_how_a_node_lists_or_holds_them():
    for style in ("random", "stream"):
        a = group_sequence(IDS, [s.path for s in SHARDS], 5, 2, style)
        b = group_sequence(IDS, [s.path for s in reversed(SHARDS)], 5, 2, style)
        assert np.array_equal(a, b)


def test_stream_order_reads_each_shard_from_first_to_last_sample_a_few_shards_at_a_time():
    big = SampleIds([ShardInfo(path=f"train/shard-{i:05d}.beton", samples=3000, bytes=1,
                               sha256="a" * 64) for i in range(10)])
    seq = group_sequence(big, big.paths, seed=1, epoch=0, style="stream")
    assert sorted(seq.tolist()) == list(range(big.total))
    shard_of = np.searchsorted(big.offsets, seq, side="right") - 1
    window = np.arange(len(seq)) // STREAM_WINDOW
    for k in range(10):
        where = np.flatnonzero(shard_of == k)
        index = seq[where] - big.offsets[k]
        # its samples in its own order, shuffled only within a window: its pages are read
        # once, in order, and let go of
        assert np.all(np.diff(window[where][np.argsort(index)]) >= 0)
        assert np.ptp(window[where]) <= 4 * 3000 // STREAM_WINDOW + 1
    for w in np.unique(window):   # a few shards at a time
        assert len(set(shard_of[window == w].tolist())) <= 8


@pytest.mark.parametrize("placement", ["global", "node"])
@pytest.mark.parametrize("style", ["random", "stream"])
def test_an_epoch_interrupted_at_a_step_resumes_with_exactly_the_rest(placement, style):
    """Resumed on the same nodes: exactly the samples of the undisturbed epoch. Resumed on fewer
    workers with the same global batch (global placement): the same too."""
    nodes = ["a", "a", "b", "b"]
    layout = plan_layout(SHARDS, placement, nodes, 7, global_batch=32, style=style)
    full, steps = read_epoch(layout, 7, 1)
    everything = np.concatenate(full)
    for stop in (0, 1, steps // 2, steps - 1):
        cursor = Cursor(1, 7, 32, [Segment(layout, stop)])
        done = read_before(IDS, cursor)
        assert done.sum() == stop * 32
        after = [layout] if placement == "node" else [
            layout, plan_layout(SHARDS, "global", ["a", "a"], 7, 32, style=style),
            plan_layout(SHARDS, "global", ["a", "b", "c"], 7, 32, style=style)]
        for new in after:
            rest, more = read_epoch(new, 7, 1, done)
            assert stop + more == steps
            got = np.concatenate([np.flatnonzero(done), *rest])
            assert sorted(got.tolist()) == sorted(everything.tolist())
            assert IDS.digest(got) == IDS.digest(everything)


def test_resumed_on_other_nodes_in_the_per_node_placement_no_sample_is_read_twice():
    before = plan_layout(SHARDS, "node", ["a", "b", "c"], 2, 24)
    first = read_before(IDS, Cursor(0, 2, 24, [Segment(before, 40)]))
    assert first.sum() == 40 * 24
    # c goes, d comes: a new assignment, and a second interruption 10 steps later
    after = plan_layout(SHARDS, "node", ["a", "d"], 2, 24, holdings={
        "a": set(before.groups[0].shards)})
    done = read_before(IDS, Cursor(0, 2, 24, [Segment(before, 40), Segment(after, 10)]))
    assert (done >= first).all()
    rest, _ = read_epoch(after, 2, 0, done)
    got = np.concatenate([np.flatnonzero(done), *rest])
    assert len(got) == len(set(got.tolist()))
    assert done.sum() == 40 * 24 + 10 * 24


def test_a_cursor_and_a_layout_survive_json():
    import json

    layout = plan_layout(SHARDS, "node", ["x", "y", "y"], 1, 30, style="stream")
    cursor = Cursor(3, 1, 30, [Segment(layout, 4)], samples=120, digest=2**64 - 5)
    back = Cursor.from_dict(json.loads(json.dumps(cursor.to_dict())))
    assert back.steps == 4 and (back.samples, back.digest) == (120, 2**64 - 5)
    assert np.array_equal(read_before(IDS, back), read_before(IDS, cursor))
    assert Layout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    # a layout saved before shards could be cut: whole shards, as it was read
    old = {"style": "random", "groups": [{"shards": [SHARDS[0].path], "ranks": [0, 1],
                                          "counts": [4, 4]}]}
    assert Layout.from_dict(old).groups[0].cuts == () and \
        len(IDS.of(*[Layout.from_dict(old).groups[0].shards])) == 100


def test_counts_split_a_global_batch_as_evenly_as_can_be():
    assert rank_counts(32, 2) == [16, 16] and rank_counts(32, 3) == [11, 11, 10]
    assert rank_counts(32, 1) == [32]
    with pytest.raises(ValueError):
        rank_counts(2, 3)


def test_validation_reads_every_sample_exactly_once():
    for placement, nodes in (("global", ["a", "b", "b"]), ("node", ["a", "b", "b"])):
        layout = plan_layout(SHARDS, placement, nodes, 0, len(nodes))
        parts = [val_part(IDS, layout, r) for r in range(3)]
        got = np.concatenate(parts)
        assert sorted(got.tolist()) == list(range(TOTAL))


GB = 1e9


@pytest.mark.parametrize("setting,size,memory,disk,want", [
    ("auto", 10 * GB, [64 * GB, 32 * GB], [500 * GB] * 2, "global"),
    ("auto", 20 * GB, [64 * GB, 32 * GB], [500 * GB] * 2, "node"),       # over 0.5 of 32 GB
    ("auto", 10 * GB, [64 * GB, 64 * GB], [500 * GB, 8 * GB], "node"),   # one cache disk too small
    ("global", 900 * GB, [1 * GB], [1 * GB], "global"),
    ("node", 1 * GB, [64 * GB], [500 * GB], "node"),
])
def test_placement_is_chosen_from_the_nodes_that_hold_workers(setting, size, memory, disk, want):
    placement, why = choose_placement(setting, int(size), memory, disk, 0.5)
    assert placement == want
    if setting == "auto":   # the line names the figures it decided from
        assert f"{size / GB:.1f} GB" in why and f"{min(memory) / GB:.1f} GB" in why
        assert f"{min(disk) / GB:.1f} GB" in why
    with pytest.raises(ValueError):
        choose_placement("auto", 1, [], [], 0.5)   # never from nodes that are not there


def test_read_mode_and_the_order_every_rank_shares():
    assert streams("auto", 40, memory=64, fraction=0.5) and not streams("auto", 30, 64, 0.5)
    assert streams("stream", 1, 64, 0.5) and not streams("memory", 10**12, 64, 0.5)
    assert order_style([False, False]) == "random" and order_style([False, True]) == "stream"
