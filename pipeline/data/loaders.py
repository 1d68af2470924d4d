"""FFCV Loaders for the recipe: RandomResizedCrop + flip for training, centre crop for validation."""
from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (np.array([0.485, 0.456, 0.406]) * 255).astype(np.float32)
IMAGENET_STD = (np.array([0.229, 0.224, 0.225]) * 255).astype(np.float32)
CROP_RATIO = 224 / 256


def scaled_crop_decoder(output_size: tuple[int, int]):
    """RandomResizedCrop that decodes only the part of a JPEG the random crop needs, at 1/2, 1/4
    or 1/8 scale whenever the crop, so reduced, is still at least the output size.

    FFCV's own decoder always decodes the whole image at full scale, then area-resizes the crop
    down. libjpeg-turbo can skip the IDCT and colour conversion of the rows and columns outside
    the crop and stop after its last row (pipeline/data/jpeg_crop.c), and a crop of 350 px going to
    160 px needs only half the pixels: half-scale decoding costs about a quarter of the IDCT
    work. The output keeps at least as many source pixels per output pixel as before (never
    upsampled). Without the compiled helper it still decodes at reduced scale, whole images.
    Raw samples are as FFCV.
    """
    from ffcv.fields.rgb_image import (IMAGE_MODES, RandomResizedCropRGBImageDecoder,
                                       get_random_crop)
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    from .jpeg_crop import AVAILABLE, crop_decode

    if not AVAILABLE:
        import warnings

        warnings.warn("pipeline/data/_jpeg_crop is not built here (run `make install` or "
                      "`pip install -e .` where the code runs): JPEGs are decoded whole, slower")
    class ScaledRandomResizedCrop(RandomResizedCropRGBImageDecoder):
        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            crop_decode_c = Compiler.compile(crop_decode)
            scale, ratio = np.array(self.scale), np.array(self.ratio)
            out_h, out_w = np.int64(self.output_size[0]), np.int64(self.output_size[1])

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    ci, cj, ch, cw = get_crop_c(height, width, scale, ratio)
                    # signed 64-bit throughout: numba turns mixed signed/unsigned into floats
                    i, j, h, w = np.int64(ci), np.int64(cj), np.int64(ch), np.int64(cw)
                    if field["mode"] == jpg:
                        d = np.int64(1)
                        for cand in (8, 4, 2):
                            if d == 1 and h // cand >= out_h and w // cand >= out_w:
                                d = np.int64(cand)
                        flat = temp_storage[dst_ix].reshape(-1)
                        dims = np.zeros(4, np.int64)
                        if crop_decode_c(image_data, flat, i, j, h, w, d, dims) == 0:
                            rows, row_w = dims[0], dims[1]
                            temp_buffer = flat[:3 * rows * row_w].reshape(rows, row_w, 3)
                            i, j, h, w = np.int64(0), dims[2], rows, dims[3]
                        else:
                            sh = (np.int64(height) + d - 1) // d
                            sw = (np.int64(width) + d - 1) // d
                            imdecode_c(image_data, flat, height, width, height, width,
                                       0, 0, 1, np.uint32(d), False, False)
                            temp_buffer = flat[:3 * sh * sw].reshape(sh, sw, 3)
                            i, j = i // d, j // d
                            h = max(np.int64(1), min(h // d, sh - i))
                            w = max(np.int64(1), min(w // d, sw - j))
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return ScaledRandomResizedCrop(output_size)


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
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import RandomHorizontalFlip

        n = num_samples(path)
        usable = n - n % world
        if max_steps:
            usable = min(usable, max_steps * batch_size * world)
        if usable // world < batch_size:
            raise ValueError(f"{n} training images give each of {world} workers fewer than one "
                             f"batch of {batch_size}; lower batch_size")
        self.decoder = scaled_crop_decoder((res, res))
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
