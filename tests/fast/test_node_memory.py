"""A node's memory as the data placement counts it: the RAM, or a container's cgroup memory cap
when lower (a pod sees the host's RAM), or PIPELINE_NODE_MEMORY."""
from __future__ import annotations

import io

import psutil
import pytest

from pipeline.data import node_data

V2, V1 = "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"


def cgroup_files(monkeypatch, files: dict[str, str]) -> None:
    """The cgroup files this node's code reads, as a container would show them."""
    def fake_open(path, *args, **kwargs):
        if path in files:
            return io.StringIO(files[path])
        raise FileNotFoundError(path)
    monkeypatch.setattr(node_data, "open", fake_open, raising=False)


@pytest.mark.parametrize("files, limit", [
    ({V2: "4294967296\n"}, 4294967296.0),                  # cgroup v2 with a cap
    ({V2: "max\n"}, None),                                  # v2 without one
    ({V1: "2147483648\n"}, 2147483648.0),                  # cgroup v1 with a cap
    ({V1: "9223372036854771712\n"}, None),                  # v1's "no limit"
    ({V2: "max\n", V1: "1073741824\n"}, 1073741824.0),     # v2 says none: v1 is asked
    ({}, None),                                             # not in a container
])
def test_the_cgroup_cap_is_read_from_v2_then_v1(monkeypatch, files, limit):
    cgroup_files(monkeypatch, files)
    assert node_data.cgroup_memory_limit() == limit


def test_a_container_counts_its_cap_not_the_hosts_ram(monkeypatch):
    monkeypatch.delenv(node_data.NODE_MEMORY_ENV, raising=False)
    ram = float(psutil.virtual_memory().total)
    cgroup_files(monkeypatch, {V2: f"{int(ram // 4)}\n"})
    assert node_data.node_memory_bytes() == float(int(ram // 4))
    cgroup_files(monkeypatch, {V2: f"{int(ram * 4)}\n"})   # a cap above the RAM: the RAM
    assert node_data.node_memory_bytes() == ram
    monkeypatch.setenv(node_data.NODE_MEMORY_ENV, "40000000")   # the operator's word wins
    assert node_data.node_memory_bytes() == 40_000_000.0
