"""How a failed worker group is recorded, retried or turned into words."""
from __future__ import annotations

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

    if isinstance(exc, WorkerGroupError):
        for err in exc.worker_failures.values():
            cause = getattr(err, "cause", err)
            if isinstance(cause, UserError):
                return cause
            if isinstance(cause, ValueError) and "lower batch_size" in str(cause):
                return UserError(f"--batch-size {cfg.recipe.batch_size}: {cause}")
    if isinstance(exc, ControllerError):
        name = type(exc.controller_failure).__name__
        if "StartupTimeout" in name or "StartupFailed" in name:
            return UserError(f"could not place {cfg.resources.num_workers} training workers for "
                             f"{cfg.resources.resource_wait_minutes:g} minutes (the cluster lost "
                             "nodes, or never had room); add nodes or lower --num-workers")
    return exc
