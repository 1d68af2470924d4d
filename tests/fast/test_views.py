"""Each sample's crop and flip: a pure function of (seed, epoch, sample id) with RandomResizedCrop's
distribution, and the `views` figure of epoch_samples over them."""
from __future__ import annotations

import hashlib
import json

import numpy as np

from pipeline.data.loaders import file_ids
from pipeline.data.node_data import LocalMap
from pipeline.data.manifest import ShardInfo
from pipeline.data.placement import (Cursor, SampleIds, Segment, epoch_reads, plan_layout,
                                     read_before)
from pipeline.data.views import RATIO, SCALE, ViewState, view, views, views_digest

SHARDS = [ShardInfo(path=f"train/shard-{i:05d}.beton", samples=100, bytes=1000, sha256="a" * 64)
          for i in range(12)]
IDS = SampleIds(SHARDS)


def test_a_view_is_a_pure_function_of_seed_epoch_and_sample_id():
    gids = np.arange(2000)
    heights, widths = 100 + gids % 300, 500 - gids % 200
    a = views(7, 3, gids, heights, widths)
    assert np.array_equal(a, views(7, 3, gids, heights, widths))
    # whatever the batch it comes in, in whatever order (a thread's, a rank's part)
    part = gids[::-1][:333]
    assert np.array_equal(views(7, 3, part, heights[part], widths[part]), a[part])
    assert tuple(a[17]) == view(7, 3, 17, heights[17], widths[17], *SCALE, *RATIO)
    # and another one for another seed, epoch or sample
    for other in (views(8, 3, gids, heights, widths), views(7, 4, gids, heights, widths)):
        assert (other != a).any(axis=1).mean() > 0.9
    assert (a[1:] != a[:-1]).any(axis=1).all()


def test_views_have_random_resized_crop_bounds_and_distribution_and_a_fair_flip():
    from ffcv.fields.rgb_image import get_random_crop   # FFCV's own, from np.random

    n = 20000
    for h0, w0 in ((375, 500), (500, 500), (640, 240)):
        rows = views(0, 0, np.arange(n), np.full(n, h0), np.full(n, w0))
        y, x, h, w, flip = rows.T
        assert (y >= 0).all() and (x >= 0).all() and (y + h <= h0).all() and (x + w <= w0).all()
        area, aspect = h * w / (h0 * w0), w / h
        # rounding w and h to whole pixels moves the area and the ratio a little past the bounds
        assert area.min() > 0.075 and area.max() <= 1.0 and area.min() < 0.09
        assert aspect.min() > 0.74 and aspect.max() < 1.345
        assert aspect.min() < 0.77 and aspect.max() > 1.3
        assert abs(flip.mean() - 0.5) < 0.02 and set(flip.tolist()) == {0, 1}
        # the distribution of FFCV's (and torchvision's) RandomResizedCrop
        np.random.seed(0)
        ref = np.array([get_random_crop(h0, w0, np.array(SCALE), np.array(RATIO))
                        for _ in range(n)])
        ref_area, ref_aspect = ref[:, 2] * ref[:, 3] / (h0 * w0), ref[:, 3] / ref[:, 2]
        assert abs(area.mean() - ref_area.mean()) < 0.01, (h0, w0)
        assert abs(np.log(aspect).mean() - np.log(ref_aspect).mean()) < 0.01, (h0, w0)
        assert abs(np.quantile(area, 0.1) - np.quantile(ref_area, 0.1)) < 0.01
        # the position is uniform over where the crop fits
        room = x / np.maximum(1, w0 - w)
        assert abs(room[w < w0].mean() - 0.5) < 0.02


def test_no_crop_fits_in_ten_tries_then_the_centre_crop_clamped_to_the_ratio():
    n = 500
    wide = views(1, 2, np.arange(n), np.full(n, 10), np.full(n, 1000))
    assert (wide[:, :4] == [0, (1000 - 13) // 2, 10, 13]).all()   # 13 = round(10 * 4/3)
    tall = views(1, 2, np.arange(n), np.full(n, 1000), np.full(n, 10))
    assert (tall[:, :4] == [(1000 - 13) // 2, 0, 13, 10]).all()   # 13 = round(10 / (3/4))
    # all of a square image at a ratio off the square almost never fits: the whole image
    whole = views(1, 2, np.arange(n), np.full(n, 30), np.full(n, 30), scale=(1, 1))
    assert (whole[:, :4] == [0, 0, 30, 30]).all()
    # a square image and only wide ratios: the widest centre crop at the narrowest ratio
    wide_only = views(1, 2, np.arange(n), np.full(n, 30), np.full(n, 30), scale=(1, 1),
                      ratio=(2, 3))
    assert (wide_only[:, :4] == [7, 0, 15, 30]).all()


def test_the_views_digest_is_as_the_contract_says():
    gids = np.array([0, 5, 1130])
    rows = views(3, 1, gids, [40, 50, 60], [70, 80, 90])
    want = sum(int.from_bytes(hashlib.sha256(
        f"{IDS.name(g)}#{x},{y},{w},{h},{f}".encode()).digest()[:8], "little")
        for g, (y, x, h, w, f) in zip(gids, rows.tolist())) % 2**64
    assert views_digest(IDS, gids, rows) == want
    assert views_digest(IDS, gids[::-1], rows[::-1]) == want
    assert views_digest(IDS, gids[:0], rows[:0]) == 0


def test_the_decoder_state_maps_file_positions_to_ids_and_a_cursor_keeps_the_views():
    local = np.array([-1, 2, 0, -1, 1])            # ids 1, 2, 4 held at positions 2, 0, 1
    state = ViewState(9, file_ids(local))
    assert state.gid_of_local.tolist() == [2, 4, 1]
    # a run's map (shards held at node-file offsets) inverts the same way
    shards = LocalMap(np.array([10, 0]), np.array([13, 2]), np.array([0, 3]))
    assert file_ids(shards).tolist() == [10, 11, 12, 0, 1]
    state.set_epoch(5)
    assert state.state.tolist() == [9, 5]
    cursor = Cursor(1, 9, 32, [], samples=10, digest=3, views=2**64 - 1)
    back = Cursor.from_dict(json.loads(json.dumps(cursor.to_dict())))
    assert back.views == 2**64 - 1
    old = cursor.to_dict()
    del old["views"]                                # a checkpoint from before views
    assert Cursor.from_dict(old).views == 0


def test_a_re_placed_node_epoch_reads_other_samples_than_an_undisturbed_one():
    """What the README says of placement: node (issue 25 item 9): interrupted and resumed on
    other nodes, an epoch reads no sample twice, each in the view it has in any run, but not the
    samples of the undisturbed epoch (its samples, digest and views differ); resumed on the same
    nodes, it reads exactly those."""
    def read(layout, done=None):
        return np.concatenate([epoch_reads(IDS, layout, r, 2, 0, done).gids
                               for r in range(sum(len(g.ranks) for g in layout.groups))])

    before = plan_layout(SHARDS, "node", ["a", "b", "c"], 2, 24)
    undisturbed = read(before)
    done = read_before(IDS, Cursor(0, 2, 24, [Segment(before, 5)]))
    same = np.concatenate([np.flatnonzero(done), read(before, done)])
    assert IDS.digest(same) == IDS.digest(undisturbed) and len(same) == len(undisturbed)
    after = plan_layout(SHARDS, "node", ["a", "d"], 2, 24, holdings={
        "a": set(before.groups[0].shards)})
    moved = np.concatenate([np.flatnonzero(done), read(after, done)])
    assert len(moved) == len(set(moved.tolist()))
    assert set(moved.tolist()) != set(undisturbed.tolist())
    size = np.full(len(moved), 64)
    assert np.array_equal(views(2, 0, moved, size, size)[:5],
                          views(2, 0, moved[:5], size[:5], size[:5]))
