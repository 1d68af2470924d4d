"""One writer per destination: a lease taken with a conditional write, renewed, released."""
from __future__ import annotations

import json

import pytest

from pipeline.data.lease import Lease
from pipeline.errors import UserError
from pipeline.storage import Storage


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path):
    uri = str(tmp_path / "dest" / ".lease.json")
    first = Lease(Storage(), uri, "stage A").acquire()
    with pytest.raises(UserError, match=r"being written by another run \(stage A"):
        Lease(Storage(), uri, "stage B").acquire()
    first.release()
    assert not (tmp_path / "dest" / ".lease.json").exists()
    Lease(Storage(), uri, "stage B").acquire().release()


def test_the_lease_of_a_killed_process_on_this_machine_is_taken_over(tmp_path):
    uri = tmp_path / ".lease.json"
    # above pid_max: certainly no process (a child's PID, once reaped, may be reused at once)
    dead = int(open("/proc/sys/kernel/pid_max").read()) + 1
    lease = Lease(Storage(), str(uri), "stage B")
    uri.write_text(json.dumps({"owner": "x", "host": lease.host, "pid": dead, "token": "t",
                               "what": "stage A", "expires": 4e9}))
    lease.acquire()
    assert json.loads(uri.read_text())["what"] == "stage B"
    lease.release()


def test_a_run_whose_lease_was_taken_over_is_told_before_it_marks_anything_done(tmp_path):
    """Its lease expired while the storage was unreachable and another run took it: the first
    run must not go on to write its manifest as if the destination were still its own."""
    uri = tmp_path / ".lease.json"
    first = Lease(Storage(), str(uri), "stage A").acquire()
    first._stop.set()   # its renewals stop, as in an outage
    first.confirm()     # still its own: renewed
    uri.write_text(json.dumps({**json.loads(uri.read_text()), "expires": 0}))   # it expired
    second = Lease(Storage(), str(uri), "stage B").acquire()
    with pytest.raises(UserError, match=r"lost its lease to another run \(stage B"):
        first.confirm()
    first.release()   # leaves the other run's lease alone
    assert json.loads(uri.read_text())["what"] == "stage B"
    second.release()
