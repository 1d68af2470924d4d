"""Run by test_train.py: two gloo ranks read one .beton through TrainLoader for two epochs and
rank 0 prints, as JSON, which labels (= sample ids) each rank saw per epoch."""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, path: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from pipeline.data.loaders import Reads, TrainLoader

    reads = Reads.whole_file(path, rank, 2, batch_size=8)
    loader = TrainLoader(reads, batch_size=8, res=32, threads=1, seed=5, device=torch.device("cpu"))
    seen = {}
    for epoch in (0, 1):
        order = reads.local[reads.epoch(epoch, seed=5).gids]
        seen[epoch] = [int(x) for _, y in loader.epoch(epoch, 32, order) for x in y.tolist()]
    queue.put((rank, seen))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from pipeline.ops.local_services import free_ports

    os.environ["TEST_PORT"] = str(free_ports(1)[0])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, sys.argv[1], queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    print(json.dumps({str(e): {str(r): results[r][e] for r in (0, 1)} for e in (0, 1)}))
