"""What a finished run says about itself: summary.json, written last in the run's folder."""
from __future__ import annotations

import json

from ..storage import Storage, is_s3, join
from . import checkpoint
from .run_events import preemptions, recoveries

SUMMARY_FILE = "summary.json"   # written last, once a run has finished


def finished_summary(storage: Storage, run_dir: str) -> dict | None:
    """The summary a run writes once it has finished; None while it has not."""
    uri = join(run_dir, SUMMARY_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def checkpoint_uri(path: str | None, storage_uri: str) -> str | None:
    """A URI for a path as Ray reports it (without the s3:// of its filesystem)."""
    if path is None:
        return None
    return f"s3://{path}" if is_s3(storage_uri) else path


def best_checkpoint(best_checkpoints: list, metric: str = "val_top1"):
    """The checkpoint with the highest `metric` among Ray's kept (checkpoint, metrics) pairs.
    Ray keeps them in no order that says which is best; on a tie the later one wins."""
    scored = [(m.get(metric), i, c) for i, (c, m) in enumerate(best_checkpoints)
              if m.get(metric) is not None]
    return max(scored, key=lambda t: (t[0], t[1]))[2] if scored else None


def scored_checkpoints(result, storage_uri: str) -> list[tuple[str, dict]]:
    """(URI, metrics) of the checkpoints Ray kept."""
    return [(checkpoint_uri(c.path, storage_uri), m) for c, m in (result.best_checkpoints or [])]


def node_data(history: list[dict]) -> list[dict]:
    """What each node held at the end: the last record per node and split."""
    last = {}
    for e in history:
        if e["kind"] == "node_data":
            last[(e["node"], e["split"])] = {k: v for k, v in e.items() if k not in ("kind", "pid")}
    return list(last.values())


def build_summary(name: str, result, storage: Storage, storage_uri: str, run_dir: str,
                  history: list[dict], mlflow_run_id: str | None) -> dict:
    # the furthest complete checkpoint on storage: a group restarted (a resize, a hand-over)
    # after its last epoch's checkpoint but before Ray recorded it has trained nothing since,
    # and Ray's latest is then an earlier one, mid-epoch, without a validation score
    last = checkpoint.furthest(storage, run_dir,
                               checkpoint_uri(result.checkpoint and result.checkpoint.path,
                                              storage_uri))
    meta = checkpoint.read_meta(storage, last) if last else {}
    metrics = meta.get("metrics", {})
    kept = scored_checkpoints(result, storage_uri)
    if last and all(uri != last for uri, _ in kept):
        kept.append((last, metrics))
    best = best_checkpoint(kept)
    starts = [e for e in history if e["kind"] == "start"]
    return {
        "name": name,
        "val_top1": metrics.get("val_top1"),
        "val_top5": metrics.get("val_top5"),
        "epochs_completed": meta.get("epoch", 0),
        "checkpoint": last,
        "best_checkpoint": best or last,
        "restarts": max(0, len(starts) - 1),
        "world_sizes": [e.get("world_size") for e in starts],
        "resumed_from_epoch": starts[-1].get("resumed_from_epoch") if starts else None,
        "recoveries": recoveries(history),
        "preemptions": preemptions(history),
        "epoch_samples": meta.get("epoch_samples", []),
        "node_data": node_data(history),
        "run_dir": run_dir,
        "mlflow_run_id": mlflow_run_id,
    }


def write_summary(storage: Storage, run_dir: str, summary: dict) -> None:
    storage.write_bytes(join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=1).encode())
