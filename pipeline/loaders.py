"""FFCV Loaders for the recipe: RandomResizedCrop + flip for training, centre crop for validation."""
from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (np.array([0.485, 0.456, 0.406]) * 255).astype(np.float32)
IMAGENET_STD = (np.array([0.229, 0.224, 0.225]) * 255).astype(np.float32)
CROP_RATIO = 224 / 256


def _image_tail(device: torch.device):
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    if device.type == "cuda":
        return [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float16)]
    # On CPU, NormalizeImage must come before ToTorchImage: the other order makes FFCV's graph
    # grouping spin forever (seen with ffcv 1.0.2).
    return [NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32), ToTensor(), ToTorchImage()]


def _label_pipeline(device: torch.device):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    ops = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


def num_samples(path: str) -> int:
    from ffcv.reader import Reader

    return int(Reader(path).num_samples)


class TrainLoader:
    """One FFCV Loader over the node's merged train split, reused for every epoch.

    With several workers each rank gets its part of a fresh permutation of the whole split every
    epoch (FFCV's distributed RANDOM order, seeded by seed + epoch), so every sample is seen once
    per epoch. The split is trimmed to a multiple of the world size so that the sampler never pads
    with duplicates; equal per-rank counts also keep DDP's all-reduces in step.
    """

    def __init__(self, path: str, batch_size: int, res: int, threads: int, world: int, seed: int,
                 device: torch.device, max_steps: int = 0):
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip

        n = num_samples(path)
        usable = n - n % world
        if max_steps:
            usable = min(usable, max_steps * batch_size * world)
        if usable // world < batch_size:
            raise ValueError(f"{n} training images give each of {world} workers fewer than one "
                             f"batch of {batch_size}; lower batch_size")
        self.decoder = RandomResizedCropRGBImageDecoder((res, res))
        self.res = res
        self.loader = Loader(
            path, batch_size=batch_size, num_workers=threads, order=OrderOption.RANDOM,
            drop_last=True, distributed=world > 1, seed=seed, indices=np.arange(usable),
            os_cache=True,
            pipelines={"image": [self.decoder, RandomHorizontalFlip(), *_image_tail(device)],
                       "label": _label_pipeline(device)})

    def epoch(self, epoch: int, res: int):
        """Batches of one epoch at resolution res (recompiling the pipeline only when res changes)."""
        self.loader.recompile = res != self.res
        if res != self.res:
            self.decoder.output_size = (res, res)
            self.res = res
        self.loader.next_epoch = epoch   # the permutation depends on the epoch: same after a resume
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def val_loader(path: str, batch_size: int, res: int, threads: int, world: int, rank: int,
               device: torch.device):
    """This rank's share of the validation split, in order, nothing dropped or repeated."""
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    indices = np.arange(num_samples(path))[rank::world]
    return Loader(path, batch_size=batch_size, num_workers=threads, order=OrderOption.SEQUENTIAL,
                  drop_last=False, indices=indices, os_cache=True,
                  pipelines={"image": [CenterCropRGBImageDecoder((res, res), ratio=CROP_RATIO),
                                       *_image_tail(device)],
                             "label": _label_pipeline(device)})
