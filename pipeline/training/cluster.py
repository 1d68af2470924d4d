"""What the cluster can hold, and getting each node's data ready before the workers start."""
from __future__ import annotations

from ..config import Resources, TrainConfig
from ..errors import UserError
from ..storage import Storage


def worker_bundle(resources: Resources) -> dict[str, float]:
    bundle = {"CPU": float(resources.cpus_per_worker), **resources.worker_resources}
    if resources.gpus_per_worker:
        bundle["GPU"] = resources.gpus_per_worker
        if resources.accelerator_type not in ("", "any"):
            # as ScalingConfig(accelerator_type=...) asks for it (ray.air.config): a sliver of
            # the resource every node with such GPUs has, so workers_that_fit counts those alone
            bundle[f"accelerator_type:{resources.accelerator_type}"] = 0.001
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


def batch_refusal(train_samples: int, batch_size: int, workers: int) -> str | None:
    """Why no epoch could have a step, in one line with the figures: the global batch (a
    constant of the run: batch_size x the most workers) is larger than the split. Every
    placement gives each node a share in proportion to its part of the global batch, so this is
    also the case where a node's share is smaller than its part of one global batch."""
    global_batch = batch_size * workers
    if train_samples >= global_batch:
        return None
    return (f"--batch-size {batch_size} on {workers} worker(s) is a global batch of "
            f"{global_batch} images, and the {train_samples} training images are fewer than one "
            f"batch: an epoch would have 0 steps (each worker's share, {train_samples // workers} "
            f"images, is under its {batch_size} per step); lower --batch-size or --num-workers")


def check_data(storage: Storage, cfg: TrainConfig, manifest) -> None:
    """What can be checked before any worker starts: an epoch has at least one step, and every
    shard is there with its size. (Contents are checked by sha256 as nodes fetch them.)"""
    from concurrent.futures import ThreadPoolExecutor

    from ..storage import join

    refusal = batch_refusal(manifest.splits["train"].samples, cfg.recipe.batch_size,
                            cfg.workers_range[1])
    if refusal:
        raise UserError(refusal)
    shards = [s for split in manifest.splits.values() for s in split.shards]

    def size(shard):
        return shard, storage.size(join(cfg.data, shard.path))

    with ThreadPoolExecutor(16) as pool:
        for shard, found in pool.map(size, shards):
            if found != shard.bytes:
                what = "is missing" if found is None else f"has {found} bytes, the manifest says {shard.bytes}"
                raise UserError(f"{join(cfg.data, shard.path)} {what}: the dataset is damaged; "
                                "re-run `pipeline stage` with the same settings to repair it")
