"""Decisions taken between training steps, the same on every rank: when to checkpoint inside an
epoch (every N steps or minutes), what to do on a preemption notice, when to say where a long
epoch stands (a progress line, in-epoch metrics to MLflow).

A decision that only one clock can make (minutes, a deadline) is rank 0's, handed to the others
in one small all-reduce every few steps; a preemption notice comes from Ray (a drained node, see
`ray.train.get_preemption_info`, itself a collective that every rank calls equally often). So
all ranks checkpoint at the same step boundary, and none waits in a collective the others
skipped.

On a notice every rank checkpoints at the next step boundary (synchronously: it is on storage
before the deadline), then keeps training; shortly before the deadline it checkpoints once more
and the group hands over (every rank raises HandOver), so no step trained is lost and the
restart on the nodes that remain starts before the node goes, not after Ray has seen it go
(6-14 s later here, and then sometimes as a failed health check, charged to `max_failures`).
The failure policy retries a hand-over without counting it (failures.StopOnUserError).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import checkpoint_interval

CONTROL_EVERY = {"cpu": 1, "cuda": 10}   # steps between two rounds of decisions (GPU: fewer syncs)


class HandOver(Exception):
    """Raised by every rank once the last checkpoint before a preemption deadline is on
    storage: the worker group ends so that the run restarts on the nodes that remain."""


@dataclass
class Notice:
    """A preemption notice as a run sees it."""

    nodes: list[str]
    ranks: list[int]
    deadline: float | None      # UNIX seconds
    seen: float                 # when this rank saw it (UNIX seconds)

    @classmethod
    def from_ray(cls, info) -> "Notice":
        deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        return cls(list(info.preempted_node_ids), list(info.preempted_ranks), deadline, time.time())


def final_checkpoint_due(now: float, deadline: float | None, checkpoint_s: float,
                         step_s: float, control_every: int, steps_left: int | None = None,
                         epoch_end_s: float = 0.0) -> bool:
    """Whether the last checkpoint before a deadline must start now: the next chance (after
    `control_every` more steps, or, when the epoch ends first, after its last steps, its
    validation and its checkpoint: `epoch_end_s`) would leave less than twice the time a
    checkpoint takes, plus a margin of a few seconds for Ray to record it. A drain without a
    deadline (`ray drain-node` without one, a scale-down) is due at once: Ray kills the
    group when its grace period ends, with no time given."""
    if deadline is None:
        return True
    until_next = control_every * step_s
    if steps_left is not None and steps_left <= control_every:
        until_next = steps_left * step_s + epoch_end_s
    return deadline - now <= 2 * checkpoint_s + until_next + step_s + 5.0


def notice_change(current: "Notice | None", new: "Notice | None") -> str | None:
    """How a notice read at a control round changes the one the run holds: "new" (first seen,
    or other nodes), "earlier" (the same nodes, a deadline that came forward: it replaces the
    one held), or None."""
    if new is None:
        return None
    if current is None or set(new.nodes) != set(current.nodes):
        return "new"
    if new.deadline is not None and (current.deadline is None or new.deadline < current.deadline):
        return "earlier"
    return None


def checkpoint_due_by_steps(step_in_epoch: int, every_steps: int) -> bool:
    return every_steps > 0 and (step_in_epoch + 1) % every_steps == 0


def epoch_checkpoint_due(epoch: int, epochs: int, amount: float, unit: str) -> bool:
    """At the end of epoch `epoch` (0-based): every N epochs and the last; with a step or time
    interval, every epoch (its checkpoint carries the validation score)."""
    last = epoch + 1 == epochs
    return last or unit != "epochs" or (epoch + 1) % int(amount) == 0


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(label: str, epoch: int, epochs: int, step: int, steps: int, images_per_s: float,
                  data_wait: float, step_s: float, epoch_s_estimate: float) -> str:
    """One line on where a long epoch stands (step counted from 1)."""
    epoch_left = (steps - step) * step_s
    run_left = epoch_left + (epochs - epoch - 1) * epoch_s_estimate
    return (f"[{label}] epoch {epoch + 1}/{epochs} step {step}/{steps} {images_per_s:.0f} img/s, "
            f"waiting for data {100 * data_wait:.0f}% of step time, epoch ETA "
            f"{duration(epoch_left)}, run ETA {duration(run_left)}")


class BackgroundLog:
    """In-epoch metrics to MLflow from a thread: a slow or absent tracking server never holds
    up a step (RunLog keeps what it cannot send in the run's outbox)."""

    def __init__(self, runlog):
        self.runlog = runlog
        self.queue: queue.Queue = queue.Queue(maxsize=1000)
        self.thread = threading.Thread(target=self._run, name="mlflow-steps", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            metrics, step = self.queue.get()
            try:
                self.runlog.log(metrics, step)
            except Exception:   # noqa: BLE001 - metrics inside an epoch are best effort
                pass

    def log(self, metrics: dict, step: int) -> None:
        try:
            self.queue.put_nowait((metrics, step))
        except queue.Full:
            pass


@dataclass
class StepTimes:
    """Wall time per step and the part of it spent waiting for the loader, since a mark."""

    steps: int = 0
    seconds: float = 0.0
    waiting: float = 0.0
    loss: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def add(self, step_s: float, wait_s: float, loss: float) -> None:
        self.steps += 1
        self.seconds += step_s
        self.waiting += wait_s
        self.loss += loss

    @property
    def step_s(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0

    @property
    def data_wait(self) -> float:
        return self.waiting / self.seconds if self.seconds else 0.0


class RunControl:
    """One per worker: call `after_step` after every training step of every rank; it says
    whether to checkpoint now, and waits out a deadline after the last one."""

    def __init__(self, cfg, rank: int, world: int, device: torch.device, label: str,
                 get_notice=None, mlflow=None, say=print, on_progress=None, get_grow=None):
        self.amount, self.unit = checkpoint_interval(cfg.run.checkpoint_every)
        self.rank, self.world, self.device, self.label = rank, world, device, label
        self.control_every = CONTROL_EVERY.get(device.type, 10)
        self.progress_s, self.log_every = cfg.run.progress_seconds, cfg.run.log_every_steps
        self.epochs, self.global_batch = cfg.recipe.epochs, cfg.global_batch
        self.get_notice, self.say, self.on_progress = get_notice, say, on_progress
        self.mlflow = BackgroundLog(mlflow) if mlflow is not None else None
        self.last_checkpoint = time.monotonic()
        self.checkpoint_s = 0.0          # how long the last checkpoint took
        self.get_grow = get_grow         # rank 0's: whether the elastic policy waits to grow
        self.notice: Notice | None = None
        self.notice_change: str | None = None   # at the last round: "new", "earlier" or None
        self.final_done = False
        self.epoch_end_s = 0.0           # the last epoch end's validation and checkpoint
        self.times = StepTimes()         # since the last progress line
        self.window = StepTimes()        # since the last MLflow entry
        self.epoch_s_estimate = 0.0

    # -- called by the loop ------------------------------------------------------------------
    def start_epoch(self, steps: int) -> None:
        self.times, self.window = StepTimes(), StepTimes()

    def after_step(self, epoch: int, step: int, steps: int, step_s: float, wait_s: float,
                   loss: float, global_step: int) -> str | None:
        """`step` is the epoch's step just done (0-based), of `steps`. Returns None, "checkpoint",
        "notice" (checkpoint: a preemption notice came), "final" (checkpoint, then call
        hand_over: the deadline is near, or the drain has none) or "grow" (checkpoint, then
        hand_over: nodes joined an elastic run, which restarts larger). `notice_change` says
        whether this round brought a notice (rank 0 records it at once)."""
        self.times.add(step_s, wait_s, loss)
        self.window.add(step_s, wait_s, loss)
        self.notice_change = None
        if self.rank == 0:
            self._say_progress(epoch, step, steps)
            self._log_steps(global_step)
        if step + 1 == steps:   # the epoch's end has its own checkpoint
            return None
        due_steps = self.unit == "steps" and checkpoint_due_by_steps(step, int(self.amount))
        if (step + 1) % self.control_every:
            return "checkpoint" if due_steps else None
        if self.get_notice is not None and not self.final_done:
            # read every round, not once: a second notice may bring an earlier deadline
            info = self.get_notice()   # a collective: every rank calls it at the same steps
            seen = Notice.from_ray(info) if info is not None else None
            self.notice_change = notice_change(self.notice, seen)
            if self.notice_change == "new":
                self.notice = seen
            elif self.notice_change == "earlier":
                self.notice.deadline = seen.deadline
        now = time.time()
        by_time = self.unit == "minutes" and time.monotonic() - self.last_checkpoint >= 60 * self.amount
        final = (self.notice is not None and not self.final_done and
                 final_checkpoint_due(now, self.notice.deadline, self.checkpoint_s,
                                      self.times.step_s or step_s, self.control_every,
                                      steps - step - 1, max(self.epoch_end_s, self.checkpoint_s)))
        grow = self.rank == 0 and self.get_grow is not None and not self.final_done and \
            bool(self.get_grow())
        by_time, final, grow = self._agree(by_time, final, grow)
        if final:
            self.final_done = True
            return "final"
        if self.notice_change == "new":
            return "notice"
        if grow:
            self.final_done = True
            return "grow"
        return "checkpoint" if (due_steps or by_time) else None

    def checkpointed(self, seconds: float) -> None:
        self.last_checkpoint = time.monotonic()
        self.checkpoint_s = seconds

    def hand_over(self, why: str = "preemption") -> None:
        """After the last checkpoint before a deadline (or before growing): train no further
        (nothing would be kept); end the group now, on every rank, so the restart need not
        wait for the node.

        Every rank first waits for all (a collective): Ray's report() returns at once on the
        ranks that upload nothing, and their HandOver would reach the controller while rank 0
        still uploads; the controller then ends the group, rank 0 with it, mid-upload."""
        self._agree(True)
        if why == "grow":
            raise HandOver("checkpointed for the nodes that joined: the run restarts on them")
        deadline = self.notice.deadline if self.notice else None
        left = f"{deadline - time.time():.0f} s before the deadline" if deadline else "no deadline"
        raise HandOver(f"the last checkpoint before the preemption is on storage ({left}): "
                       "handing over to the nodes that remain")

    # -- helpers -------------------------------------------------------------------------------
    def _agree(self, *flags: bool) -> list[bool]:
        """Rank 0's clock decides; every rank learns it in one small all-reduce."""
        if self.world == 1 or not dist.is_initialized():
            return list(flags)
        t = torch.tensor([float(f) if self.rank == 0 else 0.0 for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def _say_progress(self, epoch: int, step: int, steps: int) -> None:
        if time.monotonic() - self.times.started < self.progress_s or step + 1 == steps:
            return
        rate = self.global_batch / self.times.step_s if self.times.step_s else 0.0
        if not self.epoch_s_estimate:
            self.epoch_s_estimate = steps * self.times.step_s
        self.say(progress_line(self.label, epoch, self.epochs, step + 1, steps, rate,
                               self.times.data_wait, self.times.step_s, self.epoch_s_estimate))
        if self.on_progress is not None:
            self.on_progress(epoch, step + 1)
        self.times = StepTimes()

    def _log_steps(self, global_step: int) -> None:
        if self.mlflow is None or self.window.steps < self.log_every:
            return
        w = self.window
        self.mlflow.log({"step_train_loss": float(w.loss) / w.steps,
                         "step_images_per_s": self.global_batch / w.step_s if w.step_s else 0.0,
                         "step_data_wait": w.data_wait}, global_step)
        self.window = StepTimes()
