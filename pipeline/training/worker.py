"""The entry point of each Ray Train worker: Ray at the edges (`get_context`, `get_checkpoint`,
`report`, `get_preemption_info`) around the plain PyTorch trainer (trainer.py).

When its worker group starts, a worker gets its node's data ready (data/node_data.py), builds
the trainer, resumes from the latest checkpoint (at an epoch's end or at a step inside one), then
trains epoch by epoch; between steps, control.py decides the checkpoints inside epochs and what a
preemption notice needs; each epoch ends with validation and one report.
"""
from __future__ import annotations

import json
import tempfile
import time
import uuid

import torch
import torch.distributed as dist

from ..config import TrainConfig
from ..data.placement import Cursor, Segment, digest_hex, read_before
from . import checkpoint
from .summary import checkpoint_uri
from .trainer import ImageNetTrainer, epoch_line, gather

def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO from each worker (one of its loggers is
    named by file path, out of reach of LoggingConfig); our one line per epoch says it better."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    for name in (context.__file__, storage.__name__, "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_worker(config: dict) -> None:
    """Entry point of each Ray Train worker: the node's data, the trainer, then epochs of steps
    with checkpoints at step boundaries (control.py) and one report per epoch."""
    import ray.train
    import ray.train.torch

    _quiet_ray_train_logs()
    from ..data.manifest import ShardManifest
    from ..data.node_data import prepare
    from ..tracking import RunLog
    from .control import RunControl, epoch_checkpoint_due
    from .probe import check_largest_step
    from .run_events import RunEvents

    started = time.time()
    cfg = TrainConfig(**config["train"])
    manifest = ShardManifest.model_validate(config["manifest"])
    storage, events = config["storage"], RunEvents(config["storage"], config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    label = config.get("label", "train")

    def say(line: str) -> None:
        print(line, flush=True)

    # Each node measured where it runs (nodes that joined late too); every rank then makes the
    # same decisions, and each node fetches its share while the ranks wait in short collectives.
    node = ray.get_runtime_context().get_node_id()
    reads, plan, facts, fetched = prepare(
        storage, cfg.data, manifest, cfg.loader, rank, node, cfg.recipe.seed, cfg.global_batch,
        gather=lambda value: gather(value, world),
        any_pending=lambda pending: any_true(pending, world, device))
    rank_nodes = [g for g in gather(node, world)]
    # by node id: Ray's local rank goes by IP, which nodes sharing a machine also share
    local_rank = rank_nodes[:rank].count(node)
    every_fetch = gather(fetched, world)
    if rank == 0:
        say(f"[{label}] {plan.line(facts)}")
        events.add("layout", placement=plan.placement, world_size=world,
                   train=plan.layouts["train"].to_dict())
    if local_rank == 0:   # what this node holds: for the summary and `bench data`
        for split, stats in fetched.splits.items():
            group, _, _ = plan.layouts[split].place(rank)
            sizes = {s.path: s for s in manifest.splits[split].shards}
            events.add("node_data", node=node, placement=plan.placement, world_size=world,
                       stream=plan.streams[node], memory=facts[node].memory,
                       disk_free=facts[node].disk_free, shards=len(group.shards),
                       share_bytes=sum(sizes[p].bytes for p in group.shards),
                       node_samples=sum(sizes[p].samples for p in group.shards), **stats)

    # Where to resume, before the trainer is built: its loader can then start on the first
    # epoch's samples while the model is built (rank 0 picks the furthest complete checkpoint:
    # Ray's latest, or one on storage Ray had not recorded yet when a node died)
    ckpt = ray.train.get_checkpoint()
    given = checkpoint_uri(ckpt.path, config["run_dir"]) if ckpt is not None else None
    chosen = gather(checkpoint.furthest(storage, config["run_dir"], given) if rank == 0 else None,
                    world)[0]
    meta, state = checkpoint.load(storage, chosen) if chosen is not None else ({}, None)
    final_metrics = meta.get("metrics")
    start_epoch = int(state["epoch"]) if state else 0
    cursor = Cursor.from_dict(json.loads(state["cursor"])) if state and state.get("cursor") else None
    if cursor is not None:
        start_epoch = cursor.epoch
    first = epoch_plan(reads["train"], cfg, start_epoch, cursor) \
        if start_epoch < cfg.recipe.epochs else None

    classes = [c.model_dump() for c in manifest.classes]
    trainer = ImageNetTrainer(cfg, reads["train"], reads["val"], classes, rank, world, device,
                              first=(start_epoch, first[2]) if first else None)
    trainer.lineage = config.get("lineage", {})
    if rank == 0:
        say(f"[{label}] precision: {trainer.precision.description}")
    fits = check_largest_step(trainer)   # an OOM at max_res ends the run now, not at epoch 13
    if rank == 0 and fits:
        say(f"[{label}] memory: {fits}")
    mlflow = None
    if rank == 0 and config.get("tracking"):   # only rank 0 talks to MLflow
        t = config["tracking"]
        mlflow = RunLog(t["uri"], t["run_id"], storage, t["outbox"], say=say)

    resumed = trainer.load(state) if state is not None else None
    if resumed is not None and rank == 0 and chosen != given:
        say(f"[{label}] resuming from {chosen}, written after the latest checkpoint Ray had "
            f"recorded ({given})")
    if resumed is None and config.get("init_state") is not None:
        note = trainer.init_weights(config["init_state"])
        if rank == 0:
            say(f"[{label}] init from {cfg.run.init_from}: {note}")
    epoch_samples = resumed["epoch_samples"] if resumed else []
    counts = reads["train"].layout.place(rank)
    if rank == 0:
        events.add("start", resumed_from_epoch=start_epoch if resumed else None,
                   resumed_from_step=cursor.steps if cursor else 0, world_size=world,
                   global_batch=trainer.global_batch)
        if resumed:
            where = f"epoch {start_epoch + 1} step {cursor.steps}" if cursor else \
                f"the end of epoch {start_epoch}"
            say(f"[{label}] resumed from {where}, on {world} worker(s): global batch "
                f"{trainer.global_batch}, {counts[2]} per worker per step in "
                f"{-(-counts[2] // cfg.recipe.batch_size)} micro-batch(es)")

    epochs = cfg.recipe.epochs
    if start_epoch >= epochs and final_metrics:
        # The run had finished its last epoch when it was interrupted (its driver died before
        # wrapping up): say the final result again, so whoever waits for reports (Tune) gets it.
        ray.train.report(final_metrics)
        return

    control = RunControl(cfg, rank, world, device, label, get_notice=ray.train.get_preemption_info,
                         mlflow=mlflow, say=say,
                         on_progress=lambda e, k: events.add("progress", epoch=e, step=k))

    def save_and_report(metrics: dict, done_epochs: int, cur: Cursor | None, name: str) -> float:
        """A checkpoint on every rank's word (a collective); returns its seconds."""
        began = time.monotonic()
        rng = trainer.rng_states()
        with tempfile.TemporaryDirectory() as folder:
            report_ckpt = None
            if rank == 0:
                trainer.save(folder, done_epochs, metrics, rng, cur.to_dict() if cur else None,
                             epoch_samples)
                report_ckpt = ray.train.Checkpoint.from_directory(folder)
            # unique per attempt: a re-done step never lands in a half-written folder
            ray.train.report(metrics, checkpoint=report_ckpt,
                             checkpoint_dir_name=f"{name}-{uuid.uuid4().hex[:6]}")
        seconds = time.monotonic() - began
        control.checkpointed(seconds)
        if rank == 0:
            at = (cur.epoch, cur.steps) if cur else (done_epochs, 0)
            events.add("checkpoint", epoch=at[0], step=at[1], seconds=round(seconds, 2))
        return seconds

    pending = {"first_step": True}
    for epoch in range(start_epoch, epochs):
        cursor, segment, plan_reads = first if epoch == start_epoch else \
            epoch_plan(reads["train"], cfg, epoch, None)
        steps_before = cursor.steps - segment.steps
        epoch_steps = steps_before + plan_reads.steps
        base = (cursor.samples, cursor.digest)
        control.start_epoch(epoch_steps)
        epoch_began = time.monotonic()

        def after_step(step: int, step_s: float, wait_s: float, loss) -> None:
            if pending["first_step"]:
                pending["first_step"] = False
                first_step_done(events, rank, local_rank, node, label, started, every_fetch, say)
            segment.steps = step + 1 - steps_before
            action = control.after_step(epoch, step, epoch_steps, step_s, wait_s, loss,
                                        epoch * epoch_steps + step + 1)
            if action is None:
                return
            count, digest = trainer.read_digest(plan_reads, segment.steps)
            cursor.samples, cursor.digest = base[0] + count, (base[1] + digest) % 2**64
            metrics = {"epoch": epoch, "step": step + 1, "mid_epoch": True,
                       "checkpoint_score": -1.0}
            seconds = save_and_report(metrics, epoch, cursor, f"step-{epoch + 1:04d}-{step + 1:06d}")
            if action in ("notice", "final") and rank == 0:
                n = control.notice
                left_s = f"{n.deadline - time.time():.0f} s" if n.deadline else "no deadline"
                say(f"[{label}] preemption notice: node(s) {', '.join(x[:8] for x in n.nodes)} "
                    f"(ranks {n.ranks}) go in {left_s}; checkpointed epoch {epoch + 1} step "
                    f"{step + 1} in {seconds:.1f} s" + (", the last before the deadline: "
                                                        "handing over to the nodes that remain"
                                                        if action == "final" else ""))
                events.add("preemption_checkpoint", notice=action == "notice", nodes=n.nodes,
                           ranks=n.ranks, deadline=n.deadline, seen=n.seen, epoch=epoch,
                           step=step + 1, seconds=round(seconds, 2))
            if action == "final":
                control.hand_over()

        train_stats = trainer.train_loop(epoch, plan_reads, steps_before, after_step)
        segment.steps = plan_reads.steps
        count, digest = trainer.read_digest(plan_reads, plan_reads.steps)
        record = {"epoch": epoch + 1, "samples": base[0] + count,
                  "digest": digest_hex(base[1] + digest)}
        epoch_samples = [e for e in epoch_samples if e["epoch"] != epoch + 1] + [record]
        cursor = None
        metrics = {"epoch": epoch + 1, **train_stats, **trainer.val_loop(),
                   "world_size": world, "resumed_from_epoch": start_epoch if resumed else None,
                   "epoch_samples": record["samples"]}
        metrics["checkpoint_score"] = metrics["val_top1"]
        control.epoch_s_estimate = time.monotonic() - epoch_began   # for the run's ETA
        # Said and logged before the report: a trial that ASHA stops is ended inside report(),
        # and its last epoch would otherwise reach neither the terminal nor MLflow.
        if mlflow is not None:
            mlflow.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))
                        and not isinstance(v, bool)}, epoch + 1)
        if rank == 0:
            say(epoch_line(label, epoch + 1, epochs, metrics))
        if epoch_checkpoint_due(epoch, epochs, control.amount, control.unit):
            save_and_report(metrics, epoch + 1, None, f"epoch-{epoch + 1:04d}")
        else:
            ray.train.report(metrics)


def epoch_plan(reads, cfg: TrainConfig, epoch: int, cursor: Cursor | None):
    """(cursor, its new segment, this rank's reads) for `epoch`: the whole epoch, or with a
    cursor from a checkpoint inside it, the rest of its order under today's layout."""
    if cursor is None or cursor.epoch != epoch:
        cursor = Cursor(epoch, cfg.recipe.seed, cfg.global_batch)
    done = read_before(reads.ids, cursor) if cursor.segments else None
    steps_before = cursor.steps
    segment = Segment(reads.layout)
    cursor.segments.append(segment)
    cap = cfg.loader.max_steps_per_epoch
    left = max(0, cap - steps_before) if cap else 0
    return cursor, segment, reads.epoch(epoch, cfg.recipe.seed, done, left)


def any_true(flag: bool, world: int, device: torch.device) -> bool:
    """Whether any rank says True (a collective)."""
    if world == 1 or not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def first_step_done(events, rank: int, local_rank: int, node: str, label: str, started: float,
                    every_fetch: list, say) -> None:
    """Events of the first step, and on rank 0 one line: how long the workers took to step,
    and the slowest node's fetch (the wait every rank shared)."""
    if rank == 0:
        events.add("first_step")
        nodes: dict[str, list] = {}   # ranks of one node share its fetch: the one that did it
        for f in every_fetch:
            got = nodes.setdefault(f.node, [0.0, 0])
            got[0], got[1] = max(got[0], f.seconds), max(got[1], f.bytes_downloaded)
        node_id, (seconds, size) = max(nodes.items(), key=lambda kv: kv[1][0])
        total = sum(b for _, b in nodes.values())
        rate = f" ({size / seconds / 1e6:.1f} MB/s)" if seconds and size else ""
        data = (f"{total / 1e6:.0f} MB fetched by {len(nodes)} node(s), the slowest "
                f"({node_id[:8]}) {size / 1e6:.0f} MB in {seconds:.1f} s{rate}" if total else
                f"already on its {len(nodes)} node(s)")
        say(f"[{label}] first step {time.time() - started:.1f} s after the workers started; "
            f"data: {data}")
    if local_rank == 0:
        events.add("node_first_step", node=node)
