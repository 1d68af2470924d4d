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
    from ..errors import UserError
    from ..tracking import RunLog
    from .control import RunControl, epoch_checkpoint_due
    from .gpu_env import check_worker_gpu, driver_version, one_gpu_type, use_device
    from .probe import check_largest_step
    from .run_events import RunEvents

    started = time.time()
    cfg = TrainConfig(**config["train"])
    manifest = ShardManifest.model_validate(config["manifest"])
    storage, events = config["storage"], RunEvents(config["storage"], config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # a driver too old for torch's CUDA leaves torch without CUDA: the run ends in one line
    # here, not by training on the CPU
    gpus = cfg.resources.gpus_per_worker > 0
    check_worker_gpu(torch.version.cuda, driver_version() if gpus else None, gpus)
    device = ray.train.torch.get_device()
    use_device(device)   # before the loaders: nothing of this worker lands on GPU 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # one GPU type per run unless asked: a mix ends the run here, before any data is fetched
    mixed = one_gpu_type(gather(torch.cuda.get_device_name(device) if device.type == "cuda"
                                else "cpu", world), cfg.resources.accelerator_type)
    if mixed:
        raise UserError(mixed)
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
    # how far the group before this one trained (Reached): read on every node before any rank
    # of this group writes its own record (the gather between is a collective)
    from ..data.node_cache import cache_root
    from .run_events import Reached

    reached_dir = Reached.folder_for(cache_root(cfg.loader.cache_dir), config["run_dir"])
    shared = gather((node, Reached.latest(reached_dir), time.time_ns()), world)
    rank_nodes = [n for n, _, _ in shared]
    seen_before = [r for _, r, _ in shared if r is not None]
    reached_before = max(seen_before)[1:] if seen_before else None
    reached = Reached(reached_dir, rank, shared[0][2])
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
        check_cursor(cursor, cfg, chosen)
        start_epoch = cursor.epoch
    first = epoch_plan(reads["train"], cfg, start_epoch, cursor) \
        if start_epoch < cfg.recipe.epochs else None
    if local_rank != 0:
        reached = None   # one record per node: the ranks move in lock-step
    elif first is not None:   # this group's record from its start: it has trained nothing yet
        before = first[0].steps
        reached.write(start_epoch, before, before + first[2].steps)

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

    resumed = trainer.load(state, checkpoint.load_rng(storage, chosen, state, rank, world)) \
        if state is not None else None
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
                   global_batch=trainer.global_batch,
                   reached=list(reached_before) if reached_before else None)
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

    from .failures import grow_key, grow_wanted

    elastic = cfg.workers_range[0] != cfg.workers_range[1]
    control = RunControl(cfg, rank, world, device, label, get_notice=ray.train.get_preemption_info,
                         mlflow=mlflow, say=say,
                         on_progress=lambda e, k: events.add("progress", epoch=e, step=k),
                         get_grow=(lambda: grow_wanted(grow_key(config["run_dir"])))
                         if elastic and rank == 0 else None)

    def save_and_report(metrics: dict, done_epochs: int, cur: Cursor | None, name: str) -> float:
        """A checkpoint on every rank's word (a collective); returns its seconds."""
        began = time.monotonic()
        with tempfile.TemporaryDirectory() as folder:
            # every rank uploads its own RNG file into the one folder (Ray gives every rank
            # rank 0's folder name); only rank 0 writes the weights and the cursor
            checkpoint.save_rng(folder, rank, checkpoint.rng_state())
            if rank == 0:
                trainer.save(folder, done_epochs, metrics, cur.to_dict() if cur else None,
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
        base = (cursor.samples, cursor.digest, cursor.views)
        control.start_epoch(epoch_steps)
        epoch_began = time.monotonic()

        def after_step(step: int, step_s: float, wait_s: float, loss) -> None:
            if pending["first_step"]:
                pending["first_step"] = False
                first_step_done(events, rank, local_rank, node, label, started, every_fetch, say)
            segment.steps = step + 1 - steps_before
            action = control.after_step(epoch, step, epoch_steps, step_s, wait_s, loss,
                                        epoch * epoch_steps + step + 1)
            if control.notice_change and rank == 0:   # recorded when seen, before any checkpoint
                n = control.notice
                events.add("notice", update=control.notice_change == "earlier", nodes=n.nodes,
                           ranks=n.ranks, deadline=n.deadline, seen=n.seen, epoch=epoch,
                           step=step + 1)
            if action is None:
                return
            count, digest, views = trainer.read_digest(plan_reads, segment.steps, epoch)
            cursor.samples, cursor.digest = base[0] + count, (base[1] + digest) % 2**64
            cursor.views = (base[2] + views) % 2**64
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
            if action == "grow" and rank == 0:
                say(f"[{label}] nodes joined: checkpointed epoch {epoch + 1} step {step + 1} in "
                    f"{seconds:.1f} s; the run restarts on them")
            if action in ("final", "grow"):
                if rank == 0:
                    events.add("handover", reason="grow" if action == "grow" else "preemption",
                               epoch=epoch, step=step + 1)
                control.hand_over("grow" if action == "grow" else "preemption")

        train_stats = trainer.train_loop(epoch, plan_reads, steps_before, after_step,
                                         trained=reached and (
                                             lambda k: reached.write(epoch, k, epoch_steps)))
        epoch_end_began = time.monotonic()
        segment.steps = plan_reads.steps
        count, digest, views = trainer.read_digest(plan_reads, plan_reads.steps, epoch)
        record = {"epoch": epoch + 1, "samples": base[0] + count,
                  "digest": digest_hex(base[1] + digest), "views": digest_hex(base[2] + views)}
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
        # the next deadline's decision counts an epoch end: its validation and checkpoint
        control.epoch_end_s = time.monotonic() - epoch_end_began


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


def check_cursor(cursor: Cursor, cfg: TrainConfig, where: str) -> None:
    """A checkpoint inside an epoch holds the global batch its steps were counted in; another
    would change the lr schedule and the rest of the epoch's order."""
    from ..errors import UserError

    if cursor.global_batch != cfg.global_batch:
        raise UserError(f"{where}: taken with a global batch of {cursor.global_batch}; this run's "
                        f"is {cfg.global_batch} (batch_size {cfg.recipe.batch_size} x at most "
                        f"{cfg.workers_range[1]} workers): resume with --num-workers whose most "
                        f"gives {cursor.global_batch}, or start over with --restart")


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
