"""FFCV Loaders for the recipe: RandomResizedCrop + flip for training, centre crop for validation."""
from __future__ import annotations

from dataclasses import dataclass

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


def _image_tail(device: torch.device, dtype=np.float32):
    """Normalisation into `dtype`, the loader dtype of the run's precision (precision.py): half
    images into a float32 model without autocast fail at the first convolution."""
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    if device.type == "cuda":
        return [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, dtype)]
    # On CPU, NormalizeImage must come before ToTorchImage: the other order makes FFCV's graph
    # grouping spin forever (seen with ffcv 1.0.2).
    return [NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, dtype), ToTensor(), ToTorchImage()]


def _label_pipeline(device: torch.device):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    # (B, 1) -> (B,): only the label's own dimension; Squeeze() would also drop the batch
    # dimension of a last batch of one image, leaving a 0-d target
    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


def num_samples(path: str) -> int:
    from ffcv.reader import Reader

    return int(Reader(path).num_samples)


@dataclass(frozen=True)
class Reads:
    """What one rank reads of one split: samples `indices` of the node file at `path`, shared by
    `parts` ranks of which this is `part`; `per_rank` samples per training epoch."""

    path: str
    indices: np.ndarray
    part: int = 0
    parts: int = 1
    per_rank: int = 0
    stream: bool = False

    @classmethod
    def whole_file(cls, path: str, rank: int = 0, world: int = 1) -> "Reads":
        n = num_samples(path)
        return cls(str(path), np.arange(n), rank, world, n // world)

    def in_order(self) -> np.ndarray:
        """This rank's contiguous part, for validation: every sample read by exactly one rank."""
        return np.array_split(self.indices, self.parts)[self.part]


def share_order(indices: np.ndarray, part: int, parts: int, per_rank: int, seed: int,
                stream: bool):
    """An FFCV traversal order giving this rank its samples of each epoch (placement.epoch_order).
    FFCV takes a custom order as an instance that it calls with the loader."""
    from ffcv.traversal_order.base import TraversalOrder

    from .placement import epoch_order

    class ShareOrder(TraversalOrder):
        def __init__(self):   # bound to its loader in __call__
            self.pages = None

        def __call__(self, loader):
            self.loader, self.indices, self.seed, self.distributed = loader, indices, seed, False
            if stream:   # the page of each sample, so that pages are read whole and in order
                meta = loader.reader.metadata
                field = next(n for n in meta.dtype.names
                             if meta.dtype[n].names and "data_ptr" in meta.dtype[n].names)
                shift = np.uint64(int(loader.reader.page_size).bit_length() - 1)
                self.pages = (meta[field]["data_ptr"][indices] >> shift).astype(np.int64)
            return self

        def sample_order(self, epoch: int):
            return epoch_order(indices, part, parts, per_rank, seed, epoch, self.pages)

    return ShareOrder()


class TrainLoader:
    """One FFCV Loader over this rank's samples of the node's train file, reused every epoch.

    Each epoch's order comes from placement.epoch_order: a fresh shuffle of the samples this
    rank's node holds (or of the whole split), of which this rank reads its equal part. In stream
    mode (os_cache off) FFCV's process cache reads the pages itself, whole pages in order, so a
    node's share need not fit in its page cache.
    """

    def __init__(self, reads: Reads, batch_size: int, res: int, threads: int, seed: int,
                 device: torch.device, dtype=np.float32):
        from ffcv.loader import Loader
        from ffcv.transforms import RandomHorizontalFlip

        if reads.per_rank < batch_size:
            from ..errors import UserError

            raise UserError(f"--batch-size {batch_size}: each worker reads {reads.per_rank} "
                            "training images per epoch, fewer than one batch; lower --batch-size "
                            "or --num-workers")
        self.decoder = scaled_crop_decoder((res, res))
        self.res = res
        self.loader = Loader(
            reads.path, batch_size=batch_size, num_workers=threads,
            order=share_order(reads.indices, reads.part, reads.parts, reads.per_rank, seed,
                              reads.stream),
            drop_last=True, seed=seed, indices=reads.indices, os_cache=not reads.stream,
            pipelines={"image": [self.decoder, RandomHorizontalFlip(), *_image_tail(device, dtype)],
                       "label": _label_pipeline(device)})

    def epoch(self, epoch: int, res: int):
        """Batches of one epoch at resolution res (recompiling the pipeline only when res changes)."""
        self.loader.recompile = res != self.res
        if res != self.res:
            self.decoder.output_size = (res, res)
            self.res = res
        self.loader.next_epoch = epoch   # the order depends on the epoch: same after a resume
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def val_loader(reads: Reads, batch_size: int, res: int, threads: int, device: torch.device,
               dtype=np.float32):
    """A rank's part of the validation split, in order, nothing dropped or repeated (nothing at
    all for a rank whose node holds no validation shard)."""
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    if not len(reads.in_order()):
        return []
    return Loader(reads.path, batch_size=batch_size, num_workers=threads,
                  order=OrderOption.SEQUENTIAL, drop_last=False, indices=reads.in_order(),
                  os_cache=not reads.stream,
                  pipelines={"image": [CenterCropRGBImageDecoder((res, res), ratio=CROP_RATIO),
                                       *_image_tail(device, dtype)],
                             "label": _label_pipeline(device)})
