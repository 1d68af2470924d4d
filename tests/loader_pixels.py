"""Run by test_loaders.py: one process reads one epoch of each .beton (comma-separated, one
process for all: each start costs seconds of imports) through TrainLoader as rank R of W with T
threads and saves, per sample id, the pixels (uint8, as decoded) and its views row."""
import sys

import numpy as np
import torch

from pipeline.data.loaders import IMAGENET_MEAN, IMAGENET_STD, Reads, TrainLoader


def main(path: str, threads: int, rank: int, world: int, epoch: int, out: str) -> None:
    reads = Reads.whole_file(path, rank, world, batch_size=4)
    loader = TrainLoader(reads, batch_size=4, res=24, threads=threads, seed=11,
                         device=torch.device("cpu"))
    gids = reads.epoch(epoch, seed=11).gids
    images = []
    for x, _ in loader.epoch(epoch, 24, reads.local[gids]):
        x = x.permute(0, 2, 3, 1).numpy().astype(np.float64)
        if x.min() < 0:   # normalised (a pixel of 0 is below 0): back to uint8
            x = x * IMAGENET_STD + IMAGENET_MEAN
        images.append(np.rint(x).astype(np.uint8))
    np.savez(out, gids=gids, images=np.concatenate(images), views=loader.sample_views(epoch, gids))


if __name__ == "__main__":
    for path, out in zip(sys.argv[1].split(","), sys.argv[6].split(",")):
        main(path, *map(int, sys.argv[2:6]), out)
