"""Timestamped events of a training run (starts, failures, first steps), kept beside its checkpoints.

Each event is one small object, so this works on S3 as on a local disk. They give the figures
users ask for after a bad night: how often the run restarted, from which epoch, and how long each
recovery took (failure seen -> first training step after the restart).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from ..storage import Storage, join


class Reached:
    """How far this rank's group trained: (epoch in progress, steps done in it) after every step,
    in a small file on the node's local disk (one atomic rewrite of ~100 bytes a step: no
    network, bounded cost). The ranks of one group move in lock-step (DDP), so the file of any
    rank whose node outlives a failure says how far the group got, to the step; the next group
    reads them when it starts (`latest`), before writing its own.

    Files are kept per group (`attempt`, rank 0's start time) and only the latest group's
    count: a rank of an earlier, larger group says nothing about the last one."""

    def __init__(self, folder: str | Path, rank: int, attempt: int):
        self.folder, self.rank, self.attempt = Path(folder), rank, attempt
        self.path = self.folder / f"rank-{rank:05d}.json"

    def write(self, epoch: int, step: int, epoch_steps: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"attempt": self.attempt, "epoch": epoch, "step": step,
                                   "epoch_steps": epoch_steps}))
        os.replace(tmp, self.path)

    @staticmethod
    def latest(folder: str | Path) -> tuple | None:
        """(attempt, epoch, step, epoch_steps) of the latest group this node saw, at its
        furthest step; None when none."""
        best = None
        for path in Path(folder).glob("rank-*.json"):
            try:
                r = json.loads(path.read_text())
                got = (int(r["attempt"]), int(r["epoch"]), int(r["step"]), int(r["epoch_steps"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            best = got if best is None or got > best else best
        return best

    @staticmethod
    def folder_for(cache_root: str | Path, run_dir: str) -> Path:
        return Path(cache_root, "reached", hashlib.sha256(run_dir.encode()).hexdigest()[:16])


class RunEvents:
    def __init__(self, storage: Storage, run_dir: str):
        self.storage, self.folder = storage, join(run_dir, "events")

    def add(self, kind: str, **fields) -> None:
        now = time.time()
        name = f"{time.time_ns():020d}-{kind}-{uuid.uuid4().hex[:6]}.json"
        self.storage.write_bytes(join(self.folder, name),
                                 json.dumps({"kind": kind, "time": now, "pid": os.getpid(),
                                             **fields}).encode())

    def all(self) -> list[dict]:
        events = []
        for rel, _ in self.storage.list(self.folder):
            try:
                events.append(json.loads(self.storage.read_bytes(join(self.folder, rel))))
            except ValueError:
                continue
        return sorted(events, key=lambda e: e["time"])


def recoveries(events: list[dict]) -> list[dict]:
    """Each interruption (a worker failure, a driver started again on an unfinished run, a group
    restarted larger when nodes joined), the seconds until training stepped again, where it
    resumed and the steps it lost: trained (`reached`, what the group's ranks recorded at their
    last step, see Reached) but not kept. Preemptions handed over are in `preemptions`."""
    out, pending = [], None
    steps_seen = handed = False
    for i, e in enumerate(events):
        kind = e["kind"]
        if kind == "failure" and pending is None:
            pending = {"cause": "worker failure", "error": e.get("error", ""), "at": e["time"],
                       "reached": _reached(events[:i])}
        elif kind == "driver_start" and steps_seen and pending is None:
            pending = {"cause": "driver restarted", "error": "", "at": e["time"],
                       "reached": _reached(events[:i])}
        elif kind == "handover":
            if e.get("reason") == "grow" and pending is None:
                pending = {"cause": "nodes joined", "error": "", "at": e["time"],
                           "reached": _reached(events[:i])}
            handed = e.get("reason") != "grow"
        elif kind == "preemption_checkpoint" and not e.get("notice"):
            handed = True   # before handover events were written
        elif kind == "start":
            if pending is None and steps_seen and not handed:
                pending = {"cause": "restarted", "error": "", "at": e["time"],
                           "reached": _reached(events[:i])}
            if pending is not None:
                pending["resumed"] = (e.get("resumed_from_epoch") or 0,
                                      e.get("resumed_from_step") or 0)
                if e.get("reached"):
                    pending["reached"] = tuple(e["reached"])
            handed = False
        elif kind == "first_step":
            if pending is not None:
                resumed = pending.pop("resumed", None)
                reached = pending.pop("reached")
                out.append({**pending, "seconds": round(e["time"] - pending["at"], 1),
                            "resumed_at": list(resumed) if resumed else None,
                            "steps_lost": steps_lost(reached, resumed)})
                pending = None
            steps_seen = True
    return [{k: v for k, v in r.items() if k != "at"} for r in out]


def _reached(events: list[dict]) -> tuple[int, int] | None:
    """The furthest (epoch in progress, steps done in it) these events show the run reached
    (runs without Reached records: checkpoints and progress lines only)."""
    marks = [(e["epoch"], e["step"]) for e in events if e["kind"] in ("progress", "checkpoint")]
    return max(marks) if marks else None


def steps_lost(reached: tuple | None, resumed: tuple[int, int] | None) -> int | None:
    """Steps trained but not kept: from the resume point to the furthest step reached before
    the interruption. `reached` is (epoch, steps) or (epoch, steps, steps per epoch); without
    the epoch's length, None when they lie in different epochs; None when either is unknown."""
    if reached is None or resumed is None:
        return None
    if len(reached) > 2 and reached[2]:
        return max(0, (reached[0] - resumed[0]) * reached[2] + reached[1] - resumed[1])
    if reached[0] != resumed[0]:
        return 0 if tuple(reached[:2]) < tuple(resumed) else None
    return max(0, reached[1] - resumed[1])


def preemptions(events: list[dict]) -> list[dict]:
    """Each preemption notice the run met, from the moment a rank saw it (recorded then, before
    any checkpoint: a notice whose checkpoint never completed is here too): node(s), ranks,
    deadline (an earlier one from a later notice replaces it), where it checkpointed on the
    notice and how long that took, its last checkpoint (just before the deadline, after which
    the group handed over to the nodes that remain: `handed_over`), where the run resumed and on
    how many workers, the steps lost (trained but not kept; the goal is 0) and the seconds from
    the notice to the first step after it. Positions are [epochs done, steps into the next]."""
    out = []
    for i, e in enumerate(events):
        legacy = e["kind"] == "preemption_checkpoint" and e.get("notice") and not any(
            x["kind"] == "notice" for x in events[:i])
        if not (e["kind"] == "notice" and not e.get("update")) and not legacy:
            continue
        p = {"nodes": e["nodes"], "ranks": e["ranks"], "notice_at": e["seen"],
             "deadline": e["deadline"], "checkpoint": None, "checkpoint_seconds": None,
             "last_checkpoint": None, "handed_over": False}
        later = events[i + 1:] if not legacy else events[i:]
        restart = next((j for j, x in enumerate(later) if x["kind"] == "start"), None)
        before = later if restart is None else later[:restart]
        for x in before:
            if x["kind"] == "notice" and x.get("update") and x["nodes"] == e["nodes"]:
                p["deadline"] = x["deadline"]
            elif x["kind"] == "notice" and x is not e:
                break   # another notice (other nodes): its own entry from here
            elif x["kind"] == "preemption_checkpoint":
                if p["checkpoint"] is None:
                    p.update(checkpoint=[x["epoch"], x["step"]], checkpoint_seconds=x["seconds"])
                p["last_checkpoint"] = [x["epoch"], x["step"]]
                p["handed_over"] = p["handed_over"] or not x.get("notice")
            elif x["kind"] == "handover" and x.get("reason") != "grow":
                p["handed_over"] = True
        if restart is not None:
            start = later[restart]
            resumed = (start.get("resumed_from_epoch") or 0, start.get("resumed_from_step") or 0)
            reached = tuple(start["reached"]) if start.get("reached") else \
                _reached(events[:i + 1] + before)
            p.update(resumed_at=list(resumed), world_size_after=start.get("world_size"),
                     steps_lost=steps_lost(reached, resumed))
            step = next((x for x in later[restart:] if x["kind"] == "first_step"), None)
            if step is not None:
                p["seconds_to_first_step"] = round(step["time"] - e["seen"], 1)
        out.append(p)
    return out
