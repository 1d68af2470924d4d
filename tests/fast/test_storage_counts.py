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


def test_requests_are_counted_by_kind(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"x" * 100)
    s = Storage()
    s.read_bytes(str(f), 0, 10)
    list(s.stream(str(f)))
    assert s.stat(str(f)) == (100, str(f.stat().st_mtime_ns))
    list(s.list_detailed(str(tmp_path)))
    assert s.requests == {"get": 2, "head": 1, "list": 1}
    assert s.tally().requests == {"get": 0, "head": 0, "list": 0}


class Clock:
    """Time that passes only when someone sleeps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_the_rate_limit_spaces_requests_halves_on_slowdown_and_recovers():
    from pipeline.retry import RateLimit

    clock = Clock()
    limit = RateLimit(100, clock=clock, sleep=clock.sleep)
    for _ in range(200):
        limit.wait()
    assert 1.98 <= clock.now <= 2.0          # 200 requests at 100/s: two seconds, not less
    limit.slow_down()
    assert limit.rate == 50
    start = clock.now
    for _ in range(50):
        limit.wait()
    assert clock.now - start >= 0.98         # at half the rate...
    for _ in range(400):
        limit.wait()
    assert limit.rate == 100                 # ...then back to the cap, never above it


def test_slowdown_from_s3_is_retried_and_slows_this_process_down(monkeypatch, capsys):
    """S3's 503 SlowDown (which SeaweedFS does not send): the read is retried after a back-off,
    this process's request rate halves, and the warning says why, not 'not answering'."""
    import io
    import threading

    from botocore.exceptions import ClientError

    from pipeline import retry as retry_module
    from pipeline.storage import S3Settings

    slept = []
    here, real_sleep = threading.current_thread(), retry_module.time.sleep
    # time.sleep is the process's: another test's thread may be sleeping too
    monkeypatch.setattr(retry_module.time, "sleep", lambda s: slept.append(s)
                        if threading.current_thread() is here else real_sleep(s))

    class Client:
        calls = 0

        def get_object(self, **kwargs):
            Client.calls += 1
            if Client.calls <= 2:
                raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your "
                                             "request rate."}}, "GetObject")
            return {"Body": io.BytesIO(b"data")}

    s = Storage(S3Settings(endpoint_url="http://127.0.0.1:1", outage_seconds=60)).limited(1000)
    s._client = Client()
    assert s.read_bytes("s3://b/k", 0, 4) == b"data"
    assert Client.calls == 3 and slept == [0.5]   # the second try waits, and both halve the rate
    assert s._limit.rate == 250
    err = capsys.readouterr().err
    assert "slow down (SlowDown); backing off" in err and "not answering" not in err


def test_an_outage_is_said_once_per_call_however_often_it_is_retried(monkeypatch, capsys):
    """The endpoint refuses each call's first three tries: every call is retried until it
    answers, and says `[s3] warning` once (the README's fault table: one line per call)."""
    import io

    from botocore.exceptions import EndpointConnectionError

    from pipeline import retry as retry_module
    from pipeline.storage import S3Settings

    monkeypatch.setattr(retry_module.time, "sleep", lambda seconds: None)

    class Client:
        tries = 0

        def get_object(self, **kwargs):
            Client.tries += 1
            if Client.tries % 4:
                raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
            return {"Body": io.BytesIO(b"data")}

    s = Storage(S3Settings(endpoint_url="http://127.0.0.1:1", outage_seconds=60))
    s._client = Client()
    assert s.read_bytes("s3://b/k", 0, 4) == b"data"
    assert s.read_bytes("s3://b/k", 0, 4) == b"data"
    assert Client.tries == 8
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[s3] warning")]
    assert len(lines) == 2 and all("http://127.0.0.1:1 is not answering" in x for x in lines), lines
