"""`pipeline stage`: ImageNet in any layout -> FFCV shards + manifest.json, one Ray task per shard."""
from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import StageConfig
from ..errors import UserError
from ..holds import hold, task_env
from ..progress import Progress
from ..ray_connect import connect
from ..storage import Storage, absolute, join
from .lease import Lease
from .manifest import MANIFEST, ClassInfo, ShardInfo, ShardManifest, SplitInfo, read_manifest
from .shards import (PARTS, check_memory_fits, plan_digest, plan_shards, shard_task_memory,
                     stage_shard)
from .source import discover


@dataclass
class StageResult:
    manifest: ShardManifest
    shards_written: int = 0
    shards_reused: int = 0
    images: int = 0        # images written into shards this run (skipped files not counted)
    seconds: float = 0.0
    nodes: set = field(default_factory=set)
    source_bytes: int = 0        # the source's files, all together
    source_bytes_read: int = 0   # read from the source by this run: listing + images
    listing_seconds: float = 0.0
    listing_gets: int = 0        # reads of the source to list it (tar headers, label files)
    source_gets: int = 0         # all reads of the source: listing + images
    source_heads: int = 0        # size/ETag checks of the source's files
    source_lists: int = 0        # listing pages of the source (1,000 files each on S3)
    already_staged: bool = False  # the source and settings are those of the manifest: no work

    def summary(self) -> dict:
        return {"shards_written": self.shards_written, "shards_reused": self.shards_reused,
                "images": self.images, "seconds": round(self.seconds, 2),
                "images_per_s": round(self.images / self.seconds, 1) if self.seconds else None,
                "nodes": len(self.nodes),
                "skipped": len(self.manifest.skipped),
                "splits": {k: v.samples for k, v in self.manifest.splits.items()},
                "listing_seconds": round(self.listing_seconds, 2),
                "source_bytes": self.source_bytes, "source_bytes_read": self.source_bytes_read,
                "source_read_ratio": round(self.source_bytes_read / self.source_bytes, 4)
                if self.source_bytes else None,
                "listing_gets": self.listing_gets, "source_gets": self.source_gets,
                "source_heads": self.source_heads, "source_lists": self.source_lists,
                "already_staged": self.already_staged}


def _ray_imap(fn, items, ray_address=None):
    """discover()'s run_parallel: fn(item) as Ray tasks (a few in flight per CPU: listing
    waits on reads), each result as soon as it is in."""
    import ray

    connect(ray_address)
    task = ray.remote(num_cpus=1)(fn)
    todo, pending = list(items), []
    in_flight = _listing_jobs(ray_address)
    while todo or pending:
        while todo and len(pending) < in_flight:
            pending.append(task.remote(todo.pop(0)))
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def _listing_jobs(ray_address=None) -> int:
    """Listing jobs in flight at once: a few per CPU, since listing waits on reads."""
    import ray

    connect(ray_address)
    return 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))


def already_staged(storage: Storage, cfg, source_uri: str, dest_uri: str) -> StageResult | None:
    """The result of a stage with nothing to do, found without listing the source, or None
    when there may be something to do: dest's manifest was made from this source with these
    settings, and every archive it names still has its size and ETag (one HEAD each; a local
    file its size and mtime), and every shard is there at its size. A source of loose files is
    compared by one listing of its folder (pages of 1,000 files, no reads)."""
    from .source import listing_digest

    if storage.size(join(dest_uri, MANIFEST)) is None:
        return None
    try:
        manifest = read_manifest(storage, dest_uri)
    except UserError:
        return None   # the full path says what is wrong with it
    src = manifest.source
    if (src.get("uri") != source_uri or manifest.writer != cfg.writer
            or src.get("shard_size") != cfg.shard_size or set(manifest.splits) != set(cfg.splits)
            or cfg.layout not in ("auto", src.get("layout"))):
        return None
    probe = storage.tally()
    if src.get("files"):
        for rel, (size, version) in sorted(src["files"].items()):
            if probe.stat(join(source_uri, rel)) != (size, version):
                return None
    elif listing_digest(probe.list_detailed(source_uri)) != src.get("listing_sha256"):
        return None
    # a shard gone or cut short is redone by the full path (one HEAD each, on dest); one of the
    # right size but other bytes only a full check finds (--replace)
    shards = [s for split in manifest.splits.values() for s in split.shards]
    with ThreadPoolExecutor(16) as pool:
        sizes = list(pool.map(lambda s: storage.size(join(dest_uri, s.path)), shards))
    if any(size != s.bytes for size, s in zip(sizes, shards)):
        return None
    return StageResult(manifest, shards_reused=len(shards), source_bytes=src.get("bytes", 0),
                       source_gets=probe.requests["get"], source_heads=probe.requests["head"],
                       source_lists=probe.requests["list"], already_staged=True)


def _stage_shard_task(*args):
    import ray

    return stage_shard(*args), ray.get_runtime_context().get_node_id()


LEASE = ".lease.json"
HOLD_ENV = "PIPELINE_TEST_STAGE_HOLD"


def _maybe_hold(written: int) -> None:
    """Test hook: "N:FILE" holds the driver, once this run has written N shards, until FILE
    exists (at most 10 min; FILE.held says it is waiting), so a test can interrupt a stage at a
    known shard however fast the machine. With --workers 1 nothing is in flight meanwhile."""
    spec = os.environ.get(HOLD_ENV)
    if not spec or int(spec.split(":", 1)[0]) != written:
        return
    hold(spec.split(":", 1)[1], str(written))


def stage(cfg: StageConfig, storage: Storage | None = None, ray_address: str | None = None,
          progress: bool = True, say=print) -> StageResult:
    """Make cfg.dest hold the staged dataset of cfg.source; only missing or corrupt shards are
    written, and manifest.json comes last. One stage at a time per destination (a lease)."""
    if not cfg.source or not cfg.dest:
        raise UserError("--source and --dest are required")
    source_uri, dest_uri = absolute(cfg.source), absolute(cfg.dest)
    if source_uri.rstrip("/") == dest_uri.rstrip("/"):
        raise UserError("--dest must differ from --source")
    storage = storage or Storage()
    storage.check_bucket(dest_uri)
    with Lease(storage, join(dest_uri, LEASE), f"pipeline stage from {source_uri}") as lease:
        aborted = storage.abort_uploads(dest_uri)
        if aborted:
            say(f"[stage] aborted {aborted} unfinished upload(s) an interrupted run left in {dest_uri}")
        return _stage(cfg, source_uri, dest_uri, storage, ray_address, progress, say, lease)


def _stage(cfg, source_uri, dest_uri, storage, ray_address, progress, say, lease) -> StageResult:
    import ray

    started = time.monotonic()
    if not cfg.replace:
        done = already_staged(storage, cfg, source_uri, dest_uri)
        if done is not None:
            say(f"[stage] {dest_uri} already holds this source, staged with these settings, and "
                "the source is unchanged: nothing to do (--replace checks every shard again)")
            done.seconds = time.monotonic() - started
            return done
    layout = None if cfg.layout == "auto" else cfg.layout
    writer = cfg.writer
    source = discover(storage, source_uri, layout, cfg.splits,
                      run_parallel=functools.partial(_ray_imap, ray_address=ray_address),
                      progress=progress, parallel=functools.partial(_listing_jobs, ray_address))
    plans = plan_shards(source, writer, cfg.shard_size)
    digest = plan_digest(plans, source.classes)
    manifest_uri = join(dest_uri, MANIFEST)
    replaced = False
    if storage.exists(manifest_uri):
        try:
            old_plan = read_manifest(storage, dest_uri).plan
        except UserError:
            if not cfg.replace:
                raise
            old_plan = None   # unreadable: replaced like any other dataset
        if old_plan != digest:
            old = f"a dataset staged from {read_source(storage, manifest_uri)}"
            if not cfg.replace:
                raise UserError(f"{dest_uri} already holds {old} with other images or settings; "
                                "stage into a new --dest, or pass --replace to stage this one again")
            say(f"[stage] {dest_uri} holds a dataset of other images or settings: staging it again")
            storage.delete(manifest_uri)   # from here on the dest is not a staged dataset
            replaced = True

    connect(ray_address)
    hooks = task_env()
    task = ray.remote(num_cpus=1, max_retries=3,
                      **({"runtime_env": {"env_vars": hooks}} if hooks else {}))(_stage_shard_task)
    in_flight_max = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    memory = {p.path: shard_task_memory(p, writer) for p in plans}
    if plans:
        check_memory_fits(max(memory.values()), _node_memory(), cfg.shard_size)
    todo = list(plans)
    pending: dict = {}
    results: dict[str, dict] = {}
    result = StageResult(manifest=None, source_bytes=source.bytes,  # type: ignore[arg-type]
                         source_bytes_read=source.bytes_read,
                         listing_seconds=source.listing_seconds, listing_gets=source.gets,
                         source_gets=source.gets, source_lists=source.lists)
    bar = Progress("stage", {"shards": len(plans),
                             "files": sum(len(p.images) for p in plans)}) if progress else None
    try:
        while todo or pending:
            while todo and len(pending) < in_flight_max:
                p = todo.pop(0)
                # the memory it holds at its peak: Ray runs on each node as many as it holds
                ref = task.options(scheduling_strategy="SPREAD", memory=memory[p.path]).remote(
                    p, source_uri, dest_uri, writer, storage)
                pending[ref] = p
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                p = pending.pop(ref)
                out, node = ray.get(ref)
                results[p.path] = out["record"]
                result.nodes.add(node)
                if out["written"]:
                    result.shards_written += 1
                    result.images += out["record"]["samples"]
                    result.source_bytes_read += out["record"]["source_bytes"]
                    result.source_gets += out.get("source_gets", 0)
                else:
                    result.shards_reused += 1
                if bar:
                    bar.update(shards=1, files=len(p.images))
                if out["written"]:
                    _maybe_hold(result.shards_written)
    finally:
        # Shard tasks still in flight are not cancelled: ray.cancel racing a task that is just
        # finishing crashes the driver inside Ray (task_manager.cc "Tried to complete task that
        # was not pending"), turning Ctrl-C or a clear error into exit 1. They end with this
        # command's Ray job, and a shard is only ever taken for written once its record is.
        if bar:
            bar.close()
    result.seconds = time.monotonic() - started

    manifest = build_manifest(source, plans, results, writer, digest, cfg.shard_size)
    text = manifest.to_json().encode()
    lease.confirm()
    if not storage.exists(manifest_uri) or storage.read_bytes(manifest_uri) != text:
        storage.write_bytes(manifest_uri, text)   # last: only now is the dataset staged
    if replaced:
        _remove_leftovers(storage, dest_uri, {p.path for p in plans} | {p.record_path for p in plans})
    result.manifest = manifest
    return result


def read_source(storage: Storage, manifest_uri: str) -> str:
    """Where an existing manifest says its dataset came from (for a message), whatever its shape."""
    import json

    try:
        return json.loads(storage.read_bytes(manifest_uri)).get("source", {}).get("uri", "elsewhere")
    except (ValueError, AttributeError):
        return "elsewhere"


def _remove_leftovers(storage: Storage, dest_uri: str, keep: set[str]) -> None:
    """Shards (and their records) of the dataset that was replaced and that the new one lacks."""
    for rel, _ in list(storage.list(dest_uri)):
        if rel.startswith(("train/", "val/", PARTS + "/")) and rel not in keep:
            storage.delete(join(dest_uri, rel))


def _bytes_read(source, plans, records) -> dict:
    """What staging this dataset reads from its source: listing it, and each shard's images once
    (as each shard's record counted them when it was written). The same for every run over the
    same source, however many runs it took; a run's own figure is in its summary."""
    per_shard = [records[p.path].get("source_bytes") for p in plans]
    if None in per_shard:   # a shard written before records counted it
        return {"bytes": source.bytes}
    return {"bytes": source.bytes, "bytes_read": source.bytes_read + sum(per_shard)}


def _node_memory() -> list[float]:
    import ray

    return [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]


def build_manifest(source, plans, records, writer, digest, shard_size) -> ShardManifest:
    splits: dict[str, SplitInfo] = {}
    skipped = list(source.skipped)
    for p in plans:
        rec = records[p.path]
        split = splits.setdefault(p.split, SplitInfo())
        skipped.extend(rec["skipped"])
        if rec["samples"]:
            split.shards.append(ShardInfo(path=p.path, samples=rec["samples"], bytes=rec["bytes"],
                                          sha256=rec["sha256"]))
            split.samples += rec["samples"]
    return ShardManifest(
        classes=[ClassInfo(index=i, wnid=w, name=source.names.get(w, ""))
                 for i, w in enumerate(source.classes)],
        splits=splits, writer=writer,
        source={"uri": source.uri, "layout": source.layout, "listing_sha256": source.listing,
                "shard_size": shard_size, **_bytes_read(source, plans, records),
                **({"files": source.files} if source.files else {})},
        skipped=sorted(skipped, key=lambda s: s["path"]), plan=digest)
