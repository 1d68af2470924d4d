"""What the cluster can hold, and getting each node's data ready before the workers start."""
from __future__ import annotations

from ..config import Resources, TrainConfig
from ..errors import UserError
from ..storage import Storage


def worker_bundle(resources: Resources) -> dict[str, float]:
    bundle = {"CPU": float(resources.cpus_per_worker), **resources.worker_resources}
    if resources.gpus_per_worker:
        bundle["GPU"] = resources.gpus_per_worker
    return bundle


def workers_that_fit(bundle: dict[str, float]) -> tuple[int, list[str]]:
    """How many workers the live nodes can hold at once, and which nodes can hold one."""
    import ray

    total, nodes = 0, []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        fit = min((int(res.get(k, 0) // v) if v else 10**6) for k, v in bundle.items())
        if fit > 0:
            nodes.append(node["NodeID"])
        total += fit
    return total, nodes


def check_capacity(cfg: TrainConfig, say=print) -> list[str]:
    """Refuse, in words, workers that the cluster can never hold; on an autoscaling cluster the
    nodes may still come, so only say that the run waits for them. Returns the nodes that can
    hold a worker."""
    res = cfg.resources
    bundle = worker_bundle(res)
    lo, _ = res.workers_range
    fits, nodes = workers_that_fit(bundle)
    if fits < lo and res.autoscaling:
        say(f"[train] the cluster holds {fits} of {lo} workers now; waiting up to "
            f"{res.resource_wait_minutes:g} min for the autoscaler to add nodes")
    elif fits < lo:
        need = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
        raise UserError(f"--num-workers {res.num_workers}: each worker needs {need}, and the "
                        f"cluster's nodes can hold {fits} such workers; lower --num-workers or "
                        "--cpus-per-worker/--gpus-per-worker, or add nodes")
    return nodes


def check_data(storage: Storage, cfg: TrainConfig, manifest) -> None:
    """What can be checked before any worker starts: every shard is there with its size, and
    each worker gets at least one batch. (Contents are checked by sha256 as nodes fetch them.)"""
    from concurrent.futures import ThreadPoolExecutor

    from ..storage import join

    lo, _ = cfg.workers_range
    train = manifest.splits["train"].samples
    if train // lo < cfg.recipe.batch_size:
        raise UserError(f"--batch-size {cfg.recipe.batch_size}: {train} training images give each "
                        f"of {lo} workers {train // lo}, fewer than one batch; lower --batch-size "
                        "or --num-workers")
    shards = [s for split in manifest.splits.values() for s in split.shards]

    def size(shard):
        return shard, storage.size(join(cfg.data, shard.path))

    with ThreadPoolExecutor(16) as pool:
        for shard, found in pool.map(size, shards):
            if found != shard.bytes:
                what = "is missing" if found is None else f"has {found} bytes, the manifest says {shard.bytes}"
                raise UserError(f"{join(cfg.data, shard.path)} {what}: the dataset is damaged; "
                                "re-run `pipeline stage` with the same settings to repair it")
