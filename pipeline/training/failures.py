"""How a failed worker group is recorded, retried or turned into words."""
from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
from ray.train.v2.api.callback import UserCallback

from ..config import TrainConfig
from ..errors import UserError
from ..storage import Storage
from .run_events import RunEvents


class FailureRecorder(UserCallback):
    """Ray Train controller callback: note each worker-group failure as a run event."""

    def __init__(self, storage: Storage, run_dir: str):
        self.storage, self.run_dir = storage, run_dir

    def after_exception(self, run_context, worker_exceptions):
        errors = "; ".join(f"rank {r}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                           for r, e in sorted(worker_exceptions.items()))
        RunEvents(self.storage, self.run_dir).add("failure", error=errors[:500])


def explain_failure(exc: Exception, cfg: TrainConfig) -> Exception:
    """Turn a Ray Train failure caused by the user's setup into a UserError."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError) and user_error_in(exc) is not None:
        return user_error_in(exc)
    if isinstance(exc, WorkerGroupError):
        # retried until the failure policy gave up: max_failures restarts were spent
        n = cfg.run.max_failures
        last = "; ".join(f"rank {r}: {type(getattr(e, 'cause', e)).__name__}: "
                         f"{(str(getattr(e, 'cause', e)).splitlines() or [''])[0][:200]}"
                         for r, e in sorted(exc.worker_failures.items()))
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


class StopOnUserError(FailurePolicy):
    """Ray Train's failure policy, except that a worker failing with a UserError (a corrupt
    shard, a batch larger than the data) ends the run at once: restarting cannot fix it, and
    every restart would cost a worker-group start (and `max_failures`)."""

    def __init__(self, inner: FailurePolicy):
        super().__init__(inner.failure_config)
        self.inner = inner

    def make_decision(self, training_failed_error) -> FailureDecision:
        if user_error_in(training_failed_error) is not None:
            return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)


class SkipDrainingNodes(ElasticScalingPolicy):
    """Ray Train's elastic policy, counting only nodes that can take a worker now: not a
    draining node (a spot node under a preemption notice), nor one the cluster already lost.
    Ray counts both while its resource view catches up, and a restart (or a resize of a
    running group) then waited 30-60 s for a worker such a node would never take."""

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

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


class Trainer(TorchTrainer):
    """TorchTrainer with the StopOnUserError policy (Ray 2.60 builds the policy in fit() and
    hands it to the controller here), an elastic policy that skips draining nodes, and without
    Ray's Ctrl-C handler."""

    def _initialize_and_run_controller(self, **kwargs):
        kwargs["failure_policy"] = StopOnUserError(kwargs["failure_policy"])
        if isinstance(kwargs.get("scaling_policy"), ElasticScalingPolicy):
            kwargs["scaling_policy"] = SkipDrainingNodes(self.scaling_config)
        return super()._initialize_and_run_controller(**kwargs)

    def _register_sigint_handler(self, controller):
        """Ray's handler aborts the controller and then ends the process with exit 1 and not a
        word. Ctrl-C stays the command's: it exits 130 saying how to resume (cli.main), and
        the driver's exit ends the controller and its workers, which it owns."""
