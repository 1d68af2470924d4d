"""Every Ray internal the tests rely on, in one place: the next Ray upgrade changes this file.

Ray's public API does not show what the tests check (which checkpoints the Train controller has
registered, a node's drain and how it died, the actors Ray Train and Tune run, ASHA's rungs, the
Train controller's policies), so each such look goes through a function here. Ray is imported
inside the functions: the fast tests that do not use them pay nothing.
"""
from __future__ import annotations

from pathlib import Path

# Ray Train V2's actor classes (as the State API names them)
TRAIN_WORKER = "RayTrainWorker"
TRAIN_CONTROLLER = "TrainController"
PLACEMENT_GROUP_CLEANER = "PlacementGroupCleaner"
# The Ray task stage() runs per shard (our function, named as the State API lists it)
STAGE_SHARD_TASK = "_stage_shard_task"


# -- Ray Train's run folder --------------------------------------------------------------------------
def registered_checkpoint(run_dir: Path, epoch: int) -> bool:
    """The checkpoint of `epoch` is written and Ray Train's controller has recorded it in its
    snapshot (only then can a new driver resume from it)."""
    try:
        return f'"epoch-{epoch:04d}-' in (run_dir / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return False


# -- the State API, filtered on Ray's class names -----------------------------------------------------
def actor_ids(address: str, class_name: str) -> set[str]:
    """Every actor of this class the cluster at `address` has had, alive or dead."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=address, limit=10_000,
                                            filters=[("class_name", "=", class_name)])}


def alive_actors(address: str, class_name: str) -> list:
    from ray.util.state import list_actors

    return list_actors(address=address, limit=10_000, filters=[
        ("class_name", "=", class_name), ("state", "=", "ALIVE")])


def train_workers(address: str) -> list[int]:
    """The pids of the live Ray Train workers of the cluster at `address` (its State API, not a
    scan of every process: another suite's cluster on this machine has workers too)."""
    return [a.pid for a in alive_actors(address, TRAIN_WORKER) if a.pid]


def pending_placement_groups(address: str) -> set[str]:
    """Placement groups of the cluster at `address` still waiting for room."""
    from ray.util.state import list_placement_groups

    return {p.placement_group_id for p in list_placement_groups(
        address=address, limit=10_000, filters=[("state", "=", "PENDING")])}


def stage_shard_tasks(address: str, state: str | None = None, detail: bool = False) -> list:
    from ray.util.state import list_tasks

    filters = [("func_or_class_name", "=", STAGE_SHARD_TASK)]
    if state:
        filters.append(("state", "=", state))
    return list_tasks(address=address, limit=10_000, detail=detail, filters=filters)


# -- draining nodes (what the spot agent asks of the GCS) ---------------------------------------------
def drain_for_preemption(address: str, node_id: str, deadline_ms: int,
                         why: str = "spot notice (test)") -> tuple[bool, str]:
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    return GcsClient(address=address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION, why, deadline_ms,
        timeout=10)


def grow_flag_raised(address: str) -> bool:
    """Whether the Train controller's elastic policy has raised a run's grow flag (our own key
    in Ray's key-value store, failures.set_grow), read through the GCS client as a worker does."""
    from ray._raylet import GcsClient

    from pipeline.training.failures import GROW_NAMESPACE

    return bool(GcsClient(address=address).internal_kv_keys(
        b"", namespace=GROW_NAMESPACE.encode(), timeout=10))


def draining_nodes() -> dict[str, int]:
    """Node id -> drain deadline (ms) of the cluster this process is connected to."""
    import ray

    return ray._private.state.state.get_draining_nodes()


def died_of_preemption_drain(address: str, node_id: str) -> bool:
    """The node is dead, and Ray says a drain for preemption took it."""
    from ray._raylet import GcsClient
    from ray.core.generated import common_pb2, gcs_pb2

    nodes = GcsClient(address=address).get_all_node_info(timeout=10)
    info = next(i for n, i in nodes.items() if n.hex() == node_id)
    return info.state == gcs_pb2.GcsNodeInfo.GcsNodeState.DEAD and \
        info.death_info.reason == common_pb2.NodeDeathInfo.Reason.AUTOSCALER_DRAIN_PREEMPTED


# -- Tune's ASHA ---------------------------------------------------------------------------------------
def ray_asha_rungs(grace: int, max_t: int, factor: int) -> list[int]:
    """The milestones Ray's own ASHA bracket sets for these settings."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    return sorted(m for m, _ in _Bracket(grace, max_t, factor, 0)._rungs)


def scheduler_rungs(scheduler) -> list[int]:
    """The milestones of an ASHA scheduler's first bracket ([] for another scheduler)."""
    return [m for m, _ in scheduler._brackets[0]._rungs] if hasattr(scheduler, "_brackets") else []


# -- Ray Train V2's controller policies ---------------------------------------------------------------
def failure_policy_classes():
    """(DefaultFailurePolicy, FailureDecision)."""
    from ray.train.v2._internal.execution.failure_handling import (DefaultFailurePolicy,
                                                                   FailureDecision)
    return DefaultFailurePolicy, FailureDecision


def resize_decision_classes():
    """(NoopDecision, ResizeDecision)."""
    from ray.train.v2._internal.execution.scaling_policy import NoopDecision, ResizeDecision

    return NoopDecision, ResizeDecision


def monitor_now(policy) -> None:
    """Make an elastic policy look at the cluster on its next call (not after its interval)."""
    policy._latest_monitor_time = float("-inf")
