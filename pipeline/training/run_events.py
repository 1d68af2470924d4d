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
    """Each interruption (a worker failure, or a driver started again on an unfinished run) and
    the seconds until training stepped again."""
    out, pending = [], None
    steps_seen = False
    for e in events:
        if e["kind"] == "failure":
            pending = {"cause": "worker failure", "error": e.get("error", ""), "at": e["time"]}
        elif e["kind"] == "driver_start" and steps_seen and pending is None:
            pending = {"cause": "driver restarted", "error": "", "at": e["time"]}
        elif e["kind"] == "first_step":
            if pending is not None:
                out.append({**pending, "seconds": round(e["time"] - pending["at"], 1)})
                pending = None
            steps_seen = True
    return [{k: v for k, v in r.items() if k != "at"} for r in out]
