"""Bytes read are counted where Storage reads them: what `stage` reports as read from its source."""
from __future__ import annotations

import pickle

from pipeline.storage import Storage


def test_every_read_is_counted_once_and_a_tally_counts_its_own(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(bytes(range(256)) * 4)
    s = Storage()
    assert s.read_bytes(str(f), 10, 100) == bytes(range(10, 110))
    assert s.bytes_read == 100
    assert b"".join(s.stream(str(f), chunk=300)) == f.read_bytes()
    assert s.bytes_read == 100 + 1024
    s.download_file(str(f), tmp_path / "copy")
    assert s.bytes_read == 100 + 2 * 1024
    with s.open_range(str(f), 512, 100) as r:
        assert r.read(1000) == f.read_bytes()[512:612]   # never past the range
    assert s.bytes_read == 100 + 2 * 1024 + 100

    t = s.tally()
    t.read_bytes(str(f))
    assert (t.bytes_read, s.bytes_read) == (1024, 100 + 2 * 1024 + 100)
    assert pickle.loads(pickle.dumps(s)).bytes_read == 0   # a task counts its own reads
