"""How a failed worker group is recorded, retried or turned into words."""
from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
from ray.train.v2.api.callback import UserCallback

from ..config import TrainConfig
from ..errors import UserError
from ..storage import Storage
from .control import HandOver
from .run_events import RunEvents


class FailureRecorder(UserCallback):
    """Ray Train controller callback: note each worker-group failure as a run event (once per
    failure: Ray calls this on each of its polls while the group it failed waits to stop)."""

    def __init__(self, storage: Storage, run_dir: str):
        self.storage, self.run_dir = storage, run_dir
        self.last: str | None = None

    def after_exception(self, run_context, worker_exceptions):
        if all(handed_over(e) for e in worker_exceptions.values()):
            return   # a preemption: its events are the checkpoints before the deadline
        error = describe_failures(worker_exceptions, 160)[:500]
        if error == self.last:   # the same failure, polled again (each poll brings new objects)
            return
        self.last = error
        RunEvents(self.storage, self.run_dir).add("failure", error=error)

    def after_report(self, run_context, metrics, checkpoint):
        self.last = None   # a group that reports has trained since: a failure now is another


# An elastic run does not resize a running group (a restart without a checkpoint): the policy
# raises this flag in Ray's key-value store, rank 0 reads it at its control rounds, and the group
# checkpoints and hands over (control.RunControl: "grow"); its restart takes the new nodes.
GROW_NAMESPACE = "pipeline-grow"


def grow_key(run_dir: str) -> bytes:
    return run_dir.encode()


def set_grow(key: bytes, wanted: bool) -> None:
    from ray.experimental import internal_kv

    if wanted:
        internal_kv._internal_kv_put(key, b"1", overwrite=True, namespace=GROW_NAMESPACE)
    else:
        internal_kv._internal_kv_del(key, namespace=GROW_NAMESPACE)


def grow_wanted(key: bytes) -> bool:
    from ray.experimental import internal_kv

    try:
        return internal_kv._internal_kv_get(key, namespace=GROW_NAMESPACE) is not None
    except Exception:   # noqa: BLE001 - the GCS busy: grow at a later round
        return False


def describe_failures(worker_failures: dict, width: int) -> str:
    """`rank R: Type: first line of its message; ...` for each failed rank (the exception a
    worker raised, not Ray's wrapper of it)."""
    parts = []
    for rank, error in sorted(worker_failures.items()):
        cause = getattr(error, "cause", error)
        parts.append(f"rank {rank}: {type(cause).__name__}: "
                     f"{(str(cause).splitlines() or [''])[0][:width]}")
    return "; ".join(parts)


def explain_failure(exc: Exception, cfg: TrainConfig) -> Exception:
    """Turn a Ray Train failure caused by the user's setup into a UserError."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError) and user_error_in(exc) is not None:
        return user_error_in(exc)
    if isinstance(getattr(exc, "controller_failure", None), UserError):
        return exc.controller_failure   # SkipDrainingNodes: waited too long below the minimum
    if isinstance(exc, WorkerGroupError):
        # retried until the failure policy gave up: max_failures restarts were spent
        n = cfg.run.max_failures
        last = describe_failures(exc.worker_failures, 200)
        return UserError(f"the training workers failed {n + 1} times, more than --max-failures "
                         f"{n} allows; the last failure: {last[:400]}; fix its cause, then re-run "
                         f"with --name {cfg.run.name} to resume from the last checkpoint")
    if isinstance(exc, ControllerError):
        name = type(exc.controller_failure).__name__
        if "StartupTimeout" in name or "StartupFailed" in name:
            return UserError(f"could not place {cfg.resources.num_workers} training workers for "
                             f"{cfg.resources.resource_wait_minutes:g} minutes (the cluster lost "
                             "nodes, or never had room); add nodes or lower --num-workers")
    return exc


def user_error_in(error) -> UserError | None:
    """The UserError a worker raised, if that is what failed the worker group."""
    for err in getattr(error, "worker_failures", {}).values():
        cause = getattr(err, "cause", err)
        if isinstance(cause, UserError):
            return cause
    return None


def handed_over(error) -> bool:
    return isinstance(getattr(error, "cause", error), HandOver)


class StopOnUserError(FailurePolicy):
    """Ray Train's failure policy, except that a worker failing with a UserError (a corrupt
    shard, a batch larger than the data) ends the run at once: restarting cannot fix it, and
    every restart would cost a worker-group start (and `max_failures`); and that a group whose
    ranks all handed over before a preemption deadline (control.HandOver) restarts, uncounted
    like any preemption (`max_preemption_failures` is unlimited, launch.py)."""

    def __init__(self, inner: FailurePolicy):
        super().__init__(inner.failure_config)
        self.inner = inner

    def make_decision(self, training_failed_error) -> FailureDecision:
        if user_error_in(training_failed_error) is not None or \
                isinstance(getattr(training_failed_error, "controller_failure", None), UserError):
            return FailureDecision.RAISE
        failures = getattr(training_failed_error, "worker_failures", None)
        if failures and all(handed_over(e) for e in failures.values()):
            return FailureDecision.RETRY
        return self.inner.make_decision(training_failed_error)


class SkipDrainingNodes(ElasticScalingPolicy):
    """Ray Train's elastic policy, counting only nodes that can take a worker now: not a
    draining node (a spot node under a preemption notice), nor one the cluster already lost.
    Ray counts both while its resource view catches up (a dead node stays alive in it for
    ~17 s, until its health checks fail): a restart after a node's death, or a running group
    "growing" onto a node being drained, then waited the group's 30 s start timeout for a
    worker that node would never take.

    A running group is never resized here: that would be a restart without a checkpoint (up to
    an interval of steps lost). Not shrunk: the workers' own notice path checkpoints and loses
    none, and a dead node's workers fail and restart the group anyway. Not grown: the policy
    raises the grow flag instead (set_grow), the workers checkpoint at their next control
    round and hand over, and the restart takes the nodes that joined.

    A group that cannot start with its minimum of workers waits at most `wait_s` (Ray's policy
    waits forever), then the run ends in words (a UserError through the controller)."""

    def __init__(self, scaling_config, wait_s: float = float("inf"), grow: bytes | None = None,
                 clock=time.monotonic):
        super().__init__(scaling_config)
        self.wait_s, self.grow, self.clock = wait_s, grow, clock
        self.below_since: float | None = None

    def make_decision_for_non_running_worker_group(self):
        if self.grow is not None:
            try:
                set_grow(self.grow, False)   # the group that was asked to grow has stopped
            except Exception:   # noqa: BLE001 - a stale flag costs one early checkpoint
                pass
        decision = super().make_decision_for_non_running_worker_group()
        if not isinstance(decision, NoopDecision):
            self.below_since = None
            return decision
        now = self.clock()
        if self.below_since is None:
            self.below_since = now
        elif now - self.below_since >= self.wait_s:
            lo = self.scaling_config.min_workers
            raise UserError(f"could not start the minimum of {lo} training worker(s) for "
                            f"{self.wait_s / 60:g} minutes (--resource-wait-minutes): the cluster "
                            "lost nodes and none came back; add nodes or lower --num-workers, "
                            "then re-run with the same --name to resume from the last checkpoint")
        return decision

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        decision = super().make_decision_for_running_worker_group(worker_group_state,
                                                                  worker_group_status)
        if not isinstance(decision, ResizeDecision):
            return decision
        if decision.num_workers > worker_group_state.num_workers and self.grow is not None:
            set_grow(self.grow, True)
        return NoopDecision()

    def _get_reserved_resources(self):
        reserved = super()._get_reserved_resources()
        if not reserved:
            return reserved
        try:
            draining = set(ray_state().get_draining_nodes() or {})
            alive = alive_nodes()
        except Exception:   # noqa: BLE001 - no node information: count every node, as Ray does
            return reserved
        return {node: res for node, res in reserved.items()
                if node in alive and node not in draining}


def ray_state():
    import ray

    return ray._private.state.state


def alive_nodes() -> set[str]:
    import ray

    return answering([n for n in ray.nodes() if n.get("Alive")])


def answering(nodes: list[dict], timeout: float = 1.0) -> set[str]:
    """The nodes (ray.nodes() entries) whose raylet accepts a connection. A node whose raylet
    died refuses at once, a machine that is gone does not answer within the timeout; a busy
    raylet still accepts (the kernel does). Asked in parallel: one slow answer, not one per node."""
    def answers(node: dict) -> bool:
        try:
            with socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]),
                                          timeout=timeout):
                return True
        except OSError:
            return False

    if not nodes:
        return set()
    with ThreadPoolExecutor(max_workers=min(32, len(nodes))) as pool:
        return {n["NodeID"] for n, up in zip(nodes, pool.map(answers, nodes)) if up}


class Trainer(TorchTrainer):
    """TorchTrainer with the StopOnUserError policy (Ray 2.60 builds the policy in fit() and
    hands it to the controller here), an elastic policy that skips draining nodes, and without
    Ray's Ctrl-C handler."""

    wait_s: float = float("inf")     # launch.make_trainer sets both
    grow: bytes | None = None

    def _initialize_and_run_controller(self, **kwargs):
        kwargs["failure_policy"] = StopOnUserError(kwargs["failure_policy"])
        if isinstance(kwargs.get("scaling_policy"), ElasticScalingPolicy):
            kwargs["scaling_policy"] = SkipDrainingNodes(self.scaling_config, self.wait_s,
                                                         self.grow)
        return super()._initialize_and_run_controller(**kwargs)

    def _register_sigint_handler(self, controller):
        """Ray's handler aborts the controller and then ends the process with exit 1 and not a
        word. Ctrl-C stays the command's: it exits 130 saying how to resume (cli.main), and
        the driver's exit ends the controller and its workers, which it owns."""
