"""The spot agent's decisions (a notice -> a deadline, which provider, which node, what to say
when the metadata server fails), its HTTP against a fake metadata server on 127.0.0.1, and its
loop. No Ray here: tests/test_spot_agent.py drains a real node."""
from __future__ import annotations

import io
import json
import time
import uuid
from datetime import datetime

import pytest

from pipeline import cli, console
from pipeline.ops import spot_agent as sa

SEEN = 1_800_000_000_000     # a poll's wall-clock time, ms
NODE = "ab" * 28


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


# -- notices -> deadlines -------------------------------------------------------------------------
@pytest.mark.parametrize("body, action, deadline", [
    ('{"action": "terminate", "time": "2026-11-29T11:45:00Z"}', "terminate", ms("2026-11-29T11:45:00Z")),
    ('{"action": "stop", "time": "2026-11-29T11:45:07Z"}', "stop", ms("2026-11-29T11:45:07Z")),
    ('{"action": "hibernate", "time": "2026-11-29T11:45:00"}', "hibernate", ms("2026-11-29T11:45:00Z")),
    # a 200 is a notice even when its body cannot be read: AWS's 2 minutes from the poll
    ('{"action": "terminate", "time": "soon"}', "terminate", SEEN + 120_000),
    ("<html>not json</html>", "terminate", SEEN + 120_000),
    ('["terminate"]', "terminate", SEEN + 120_000),
    ("", "terminate", SEEN + 120_000),
])
def test_aws_notice_deadline_is_its_time(body, action, deadline):
    assert sa.aws_notice(body, SEEN) == sa.Notice("aws", action, deadline)


@pytest.mark.parametrize("body, poll, deadline", [
    ("TRUE", 5, SEEN + 25_000),       # 30 s from when it turned TRUE, at worst one poll ago
    ("true\n", 2, SEEN + 28_000),
    ("TRUE", 60, SEEN + 1_000),
    ("FALSE", 5, None),
    ("", 5, None),
])
def test_gcp_preempted_is_a_notice_30_s_ahead(body, poll, deadline):
    notice = sa.gcp_notice(body, SEEN, poll)
    assert (notice and notice.deadline_ms) == deadline
    assert notice is None or (notice.provider, notice.action) == ("gcp", "preempted")


def test_times_round_trip_and_bad_times_are_none():
    assert sa.ms_iso(ms("2026-11-29T11:45:00Z")) == "2026-11-29T11:45:00Z"
    assert sa.iso_ms("2026-11-29T11:45:00+01:00") == ms("2026-11-29T10:45:00Z")
    assert sa.iso_ms("yesterday") is None and sa.iso_ms("") is None


# -- which provider, which node, which endpoint ---------------------------------------------------
@pytest.mark.parametrize("aws, gcp, flavor, provider", [
    (200, None, None, "aws"),
    (200, 200, "Google", "aws"),
    (404, 200, "Google", "gcp"),
    (None, 200, "google", "gcp"),
    (None, 200, None, None),          # something answers, but not a GCP metadata server
    (405, 404, "Google", None),
    (None, None, None, None),         # no metadata server: not a cloud VM, or not up yet
])
def test_provider_is_whoever_answers_as_itself(aws, gcp, flavor, provider):
    assert sa.provider_of(aws, gcp, flavor) == provider


@pytest.mark.parametrize("explicit, local, at_ip, node, why", [
    ("n1", ["n2"], ["n3"], "n1", ""),
    (None, ["n2"], ["n2", "n3"], "n2", ""),       # the raylet running here wins over the IP
    (None, [], ["n3"], "n3", ""),                 # raylet in another PID namespace: by IP
    (None, ["n1", "n2"], ["n1", "n2"], None, "2 Ray nodes run on this machine: pass --node-id"),
    (None, [], ["n1", "n2"], None, "2 Ray nodes have this machine's IP: pass --node-id"),
    (None, [], [], None, "no Ray node runs on this machine (yet)"),
])
def test_the_node_drained_is_this_machines(explicit, local, at_ip, node, why):
    assert sa.choose_node(explicit, local, at_ip) == (node, why)


@pytest.mark.parametrize("endpoint, base", [
    ("169.254.169.254", "http://169.254.169.254"),
    ("127.0.0.1:8080/", "http://127.0.0.1:8080"),
    ("http://metadata.google.internal", "http://metadata.google.internal"),
])
def test_endpoint_forms(endpoint, base):
    assert sa.metadata_base(endpoint) == base


def test_a_failing_server_is_said_once_and_its_return_once():
    exc = sa.MetadataUnavailable("timed out")
    assert sa.trouble_line(0, exc, "http://x") == ("[spot] instance metadata at http://x not "
                                                   "answering (timed out); polling on")
    assert sa.trouble_line(1, exc, "http://x") is None and sa.trouble_line(40, exc, "x") is None
    assert sa.back_line(0, "http://x") is None
    assert "answers again (after 3 failed polls)" in sa.back_line(3, "http://x")
    assert sa.words(TimeoutError()) == "TimeoutError"


# -- HTTP against a fake metadata server ----------------------------------------------------------
def test_aws_imdsv2_token_then_404_until_a_notice(fake_metadata):
    watch = sa.AwsWatch(sa.Metadata(fake_metadata.url), 5)
    assert watch.check() is None and watch.check() is None
    methods = [(m, p) for m, p, _ in fake_metadata.requests]
    assert methods == [("PUT", sa.AWS_TOKEN_PATH), ("GET", sa.AWS_NOTICE_PATH),
                       ("GET", sa.AWS_NOTICE_PATH)]          # one token, kept
    assert fake_metadata.requests[0][2]["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    fake_metadata.revoke()                                    # the server no longer takes it
    assert watch.check() is None
    fake_metadata.notice = json.dumps({"action": "terminate", "time": "2026-11-29T11:45:00Z"})
    assert watch.check() == sa.Notice("aws", "terminate", ms("2026-11-29T11:45:00Z"))


def test_gcp_preempted_with_its_header(fake_metadata):
    fake_metadata.provider = "gcp"
    watch = sa.make_watch(sa.Metadata(fake_metadata.url), "auto", 5)
    assert isinstance(watch, sa.GcpWatch) and watch.check() is None
    fake_metadata.notice = "TRUE"
    before = int(time.time() * 1000)
    notice = watch.check()
    assert before + 25_000 <= notice.deadline_ms <= int(time.time() * 1000) + 25_000
    gets = [h for m, _, h in fake_metadata.requests if m == "GET"]
    assert gets and all(h.get("metadata-flavor") == "Google" for h in gets)


def test_auto_finds_aws(fake_metadata):
    assert isinstance(sa.make_watch(sa.Metadata(fake_metadata.url), "auto", 5), sa.AwsWatch)


@pytest.mark.parametrize("fail", [500, 403, "close", "hang"])
def test_server_errors_and_timeouts_are_metadata_unavailable(fake_metadata, fail):
    fake_metadata.fail = fail
    md = sa.Metadata(fake_metadata.url, timeout=0.3)
    for watch in (sa.AwsWatch(md, 5), sa.GcpWatch(md, 5)):
        with pytest.raises(sa.MetadataUnavailable) as caught:
            watch.check()
        if fail == "hang":   # the client's own timeout ended the call: the server still hangs
            assert "timed out" in str(caught.value) and fake_metadata.hangs_ended == 0
    with pytest.raises(sa.MetadataUnavailable):
        sa.make_watch(md, "auto", 5)


def test_nothing_listening_is_metadata_unavailable():
    with pytest.raises(sa.MetadataUnavailable, match="refused"):
        sa.AwsWatch(sa.Metadata("127.0.0.1:1", timeout=0.3), 5).check()


def test_requests_never_go_through_a_proxy(fake_metadata, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    assert sa.AwsWatch(sa.Metadata(fake_metadata.url), 5).check() is None


# -- the loop ----------------------------------------------------------------------------------------
class Node:
    """Stands in for the Ray node (the real drain: tests/test_spot_agent.py), with faults to
    inject: a GCS that does not answer."""

    def __init__(self, fail: int = 0):
        self.drains, self.fail = [], fail

    def find(self):
        return NODE, ""

    def drain(self, node_id, notice):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("GCS at 10.0.0.1:6379 unreachable")
        self.drains.append((node_id, notice.deadline_ms))
        return True, ""


def test_agent_polls_through_an_outage_then_drains_once(fake_metadata):
    lines, node = [], Node(fail=2)
    agent = sa.Agent(sa.Metadata(fake_metadata.url, timeout=0.3), node, "aws", 5, lines.append)
    agent.start()
    assert agent.step() is None
    fake_metadata.fail = 500
    assert [agent.step() for _ in range(3)] == [None] * 3
    fake_metadata.fail = None
    assert agent.step() is None
    deadline = sa.ms_iso(int(time.time() + 120) * 1000)
    fake_metadata.notice = json.dumps({"action": "terminate", "time": deadline})
    assert agent.step() is None and agent.step() is None      # the GCS does not answer twice
    assert agent.step() == 0
    assert node.drains == [(NODE, ms(deadline))]
    assert lines[0].startswith("[spot] watching the instance metadata at " + fake_metadata.url)
    assert NODE in lines[0]
    assert "not answering" in lines[1] and "answers again (after 3 failed polls)" in lines[2]
    assert "cannot drain yet (GCS at 10.0.0.1:6379 unreachable); retrying" in lines[3]
    assert lines[4].startswith(f"[spot] aws notice: terminate at {deadline}; drained Ray node {NODE}")
    assert len(lines) == 5


def test_agent_gives_up_once_the_deadline_passed():
    lines = []
    agent = sa.Agent(sa.Metadata("127.0.0.1:1"), Node(fail=99), "aws", 5, lines.append)
    agent.notice = sa.Notice("aws", "terminate", int(time.time() * 1000) - 1000)
    assert agent.step() == 1
    assert "passed without a drain" in lines[-1]


def test_prestop_drain_waits_until_the_deadline_and_says_so(monkeypatch):
    class Clock:   # a fake clock: time passes only in sleep()
        now = 1_800_000_000.0

        def time(self):
            return self.now

        monotonic = time

        def sleep(self, seconds):
            self.now += seconds

    clock = Clock()
    monkeypatch.setattr(sa, "time", clock)
    alive_at = []

    class Busy(Node):
        def alive(self, node_id):
            alive_at.append(clock.now)
            return True

    lines, node = [], Busy()
    start = clock.now
    assert sa.drain_now(node, 0.6, lines.append) == 0
    # it asked until the deadline and returned once the deadline had passed, not before
    assert alive_at[0] == start and max(alive_at) < start + 0.6 <= clock.now
    assert lines[0].startswith(f"[spot] drained Ray node {NODE} with a deadline 0.6 s away")
    assert lines[1] == f"[spot] Ray node {NODE} still had work at its deadline"


def test_prestop_without_a_cluster_is_said_and_not_an_error():
    lines = []
    assert sa.drain_now(Node(fail=1), 30, lines.append) == 0
    assert lines == ["[spot] could not drain this node (GCS at 10.0.0.1:6379 unreachable)"]


def test_one_agent_per_node():
    node = uuid.uuid4().hex * 2
    assert sa.hold_lock(node) is None
    try:
        import os
        assert sa.hold_lock(node) == os.getpid()
    finally:
        os.close(sa._HELD.pop())


@pytest.mark.parametrize("argv, words", [
    (["--node-id", "xyz"], "--node-id xyz: not a Ray node id"),
    (["--poll-seconds", "0"], "above 0"),
    (["--drain-now", "-5"], "above 0"),
])
def test_bad_flags_are_one_line(argv, words, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(console._Terminal, "err", err)
    assert cli.main(["spot-agent", *argv]) == 2
    assert words in err.getvalue() and len(err.getvalue().splitlines()) == 1
