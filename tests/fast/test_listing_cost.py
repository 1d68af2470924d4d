"""Listing ILSVRC2012-shaped archives costs about one ranged GET per image; a re-stage of the
unchanged source costs one HEAD per archive and no GET of the source (the real listing and
re-stage code, on made-up archives that count every request)."""
from __future__ import annotations

from pipeline.data.listing_cost import listing_requests, restage_requests


def test_listing_is_about_one_get_per_image_and_a_restage_one_head_per_archive():
    got = listing_requests(classes=6, per_class=1300, image_bytes=110_000, val_images=500)
    assert got["images"] == 6 * 1300 + 500
    # one header read per image, plus per tar a few scans and the end-of-archive check
    assert got["images"] <= got["listing_gets"] <= got["images"] + 30 * (6 + 2), got
    again = restage_requests(train_shards=1252, val_shards=49)
    assert (again["source_heads"], again["source_gets"], again["source_lists"]) == (3, 0, 0)
    assert again["dest_gets"] == 1 and again["dest_heads"] <= 1252 + 49 + 2
