"""Timestamped events of a training run (starts, failures, first steps), kept beside its checkpoints.

Each event is one small object, so this works on S3 as on a local disk. They give the figures
users ask for after a bad night: how often the run restarted, from which epoch, and how long each
recovery took (failure seen -> first training step after the restart).
"""
from __future__ import annotations

import json
import os
import time
import uuid

from ..storage import Storage, join


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
    """Each interruption (a worker failure, or a driver started again on an unfinished run), the
    seconds until training stepped again, where it resumed and the steps it lost (trained after
    the last checkpoint it resumed from: at most one checkpoint interval)."""
    out, pending = [], None
    steps_seen = False
    for i, e in enumerate(events):
        if e["kind"] == "failure":
            pending = {"cause": "worker failure", "error": e.get("error", ""), "at": e["time"],
                       "reached": _reached(events[:i])}
        elif e["kind"] == "driver_start" and steps_seen and pending is None:
            pending = {"cause": "driver restarted", "error": "", "at": e["time"],
                       "reached": _reached(events[:i])}
        elif e["kind"] == "start" and pending is not None:
            pending["resumed"] = (e.get("resumed_from_epoch") or 0, e.get("resumed_from_step") or 0)
        elif e["kind"] == "first_step":
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
    """The furthest (epoch in progress, steps done in it) these events show the run reached."""
    marks = [(e["epoch"], e["step"]) for e in events if e["kind"] in ("progress", "checkpoint")]
    return max(marks) if marks else None


def steps_lost(reached: tuple[int, int] | None, resumed: tuple[int, int] | None) -> int | None:
    """Steps trained but not kept: from the resume point to the furthest step reached before
    the interruption (None when they lie in different epochs, or are not known)."""
    if reached is None or resumed is None or reached[0] != resumed[0]:
        return 0 if reached is not None and resumed is not None and reached < resumed else None
    return max(0, reached[1] - resumed[1])


def preemptions(events: list[dict]) -> list[dict]:
    """Each preemption notice the run met: node(s), ranks, deadline, where it checkpointed on the
    notice and how long that took, its last checkpoint (just before the deadline, after which the
    group handed over to the nodes that remain: `handed_over`), where the run resumed and on how
    many workers, the steps lost (trained but not kept; the goal is 0) and the seconds from the
    notice to the first step after it. Positions are [epochs done, steps into the next]."""
    out = []
    for i, e in enumerate(events):
        if e["kind"] != "preemption_checkpoint" or not e.get("notice"):
            continue
        p = {"nodes": e["nodes"], "ranks": e["ranks"], "notice_at": e["seen"],
             "deadline": e["deadline"], "checkpoint": [e["epoch"], e["step"]],
             "checkpoint_seconds": e["seconds"], "last_checkpoint": [e["epoch"], e["step"]],
             "handed_over": False}
        later = events[i + 1:]
        restart = next((j for j, x in enumerate(later) if x["kind"] == "start"), None)
        before = later if restart is None else later[:restart]
        for x in before:
            if x["kind"] == "preemption_checkpoint":
                p.update(last_checkpoint=[x["epoch"], x["step"]], handed_over=True)
        if restart is not None:
            start = later[restart]
            resumed = (start.get("resumed_from_epoch") or 0, start.get("resumed_from_step") or 0)
            p.update(resumed_at=list(resumed), world_size_after=start.get("world_size"),
                     steps_lost=steps_lost(_reached(events[:i + 1] + before), resumed))
            step = next((x for x in later[restart:] if x["kind"] == "first_step"), None)
            if step is not None:
                p["seconds_to_first_step"] = round(step["time"] - e["seen"], 1)
        out.append(p)
    return out
