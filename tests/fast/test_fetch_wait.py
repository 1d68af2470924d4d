"""Ranks wait for the slowest node's fetch in short collectives (node_data.fetch_while_waiting):
a warm rank neither goes on alone nor sits in one collective for the whole fetch. Two real gloo
ranks; rank 1's fetch is held (a file it waits for, the fault a real slow node gives)."""
from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path

from helpers import wait_for

POLL = 0.05   # node_data.POLL_SECONDS, shortened: a collective every 50 ms


def test_a_warm_rank_waits_for_a_cold_fetch_in_short_collectives(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    release = tmp_path / "release"
    procs = [ctx.Process(target=_rank, args=(r, port, str(tmp_path)), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        rounds = tmp_path / "rounds-0"
        # the warm rank keeps taking part in collectives while rank 1 still fetches ...
        wait_for(lambda: (rounds.exists() and len(rounds.read_text()) >= 5)
                 or (tmp_path / "done-0").exists(), "five collectives on the warm rank", 120)
        # ... and has not gone on without it
        assert not (tmp_path / "done-0").exists(), "the warm rank went on during the fetch"
        assert not (tmp_path / "done-1").exists()
        release.touch()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0]
        # each returned with its own fetch's result, after the last collective said "none pending"
        assert (tmp_path / "done-0").read_text() == "train val"
        assert (tmp_path / "done-1").read_text() == "train val"
        cold = (tmp_path / "rounds-1").read_text()
        assert cold.startswith("1") and cold.endswith("0")   # pending, then the last round
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def _rank(rank: int, port: int, folder: str) -> None:
    import time
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from pipeline.data import node_data
    from pipeline.data.node_cache import FetchStats
    from pipeline.training.worker import any_true

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    node_data.POLL_SECONDS = POLL
    release = Path(folder) / "release"

    class HeldSplit:
        """A node's file: rank 1's node is cold, its fetch lasts until the test releases it."""

        def __init__(self, storage, data_uri, manifest, split, cache_dir):
            self.split = split

        def ensure(self, shards):
            while rank == 1 and not release.exists():
                time.sleep(0.01)
            return self.split, FetchStats(self.split)

    node_data.NodeSplit = HeldSplit
    layout = SimpleNamespace(place=lambda r: (SimpleNamespace(shards=[]), None, None))
    plan = SimpleNamespace(layouts={"train": layout, "val": layout})

    def any_pending(pending: bool) -> bool:
        with open(Path(folder) / f"rounds-{rank}", "a") as f:
            f.write(str(int(pending)))
        return any_true(pending, 2, torch.device("cpu"))

    states, _ = node_data.fetch_while_waiting(None, "", None, plan, rank, f"node-{rank}", "",
                                              any_pending)
    (Path(folder) / f"done-{rank}").write_text(" ".join(states.values()))
    dist.destroy_process_group()
