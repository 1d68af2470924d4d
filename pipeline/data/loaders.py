"""FFCV Loaders for the recipe: RandomResizedCrop + flip for training (seeded per sample: views.py),
centre crop for validation."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .manifest import ShardInfo
from .placement import (EpochReads, Group, Layout, SampleIds, epoch_reads, rank_counts,
                        val_part)

IMAGENET_MEAN = (np.array([0.485, 0.456, 0.406]) * 255).astype(np.float32)
IMAGENET_STD = (np.array([0.229, 0.224, 0.225]) * 255).astype(np.float32)
CROP_RATIO = 224 / 256


def scaled_crop_decoder(output_size: tuple[int, int], views=None):
    """RandomResizedCrop and a left-right flip, seeded (views.py): each sample's crop and flip a
    pure function of (seed, epoch, sample id) and its stored size, read from `views`
    (views.ViewState: the seed, the epoch in progress, the node file's sample ids; by default
    seed 0, epoch 0, ids = positions in the file). It decodes only the part of a JPEG the crop
    needs, at 1/2, 1/4 or 1/8 scale whenever the crop, so reduced, is still at least the output
    size.

    FFCV's own decoder draws crops from numba's per-thread np.random (seeded from OS entropy) and
    always decodes the whole image at full scale, then area-resizes the crop down. libjpeg-turbo
    can skip the IDCT and colour conversion of the rows and columns outside the crop and stop
    after its last row (pipeline/data/jpeg_crop.c), and a crop of 350 px going to 160 px needs
    only half the pixels: half-scale decoding costs about a quarter of the IDCT work. The output
    keeps at least as many source pixels per output pixel as before (never upsampled). Without
    the compiled helper it still decodes at reduced scale, whole images. Raw samples are as FFCV.
    """
    from ffcv.fields.rgb_image import IMAGE_MODES, RandomResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    from . import views as seeded
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
            crop_decode_c = Compiler.compile(crop_decode)
            # not through Compiler.compile (fastmath): the views figure calls the same code
            view_c, flip_c, int64_array = seeded.view, seeded.flip_left_right, seeded.int64_array
            if self.views is None:
                self.views = seeded.ViewState(0, np.arange(len(self.metadata)))
            state_at, ids_at, n_ids = self.views.addresses
            scale0, scale1 = float(self.scale[0]), float(self.scale[1])
            ratio0, ratio1 = float(self.ratio[0]), float(self.ratio[1])
            out_h, out_w = np.int64(self.output_size[0]), np.int64(self.output_size[1])

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                state, gid_of = int64_array(state_at, 2), int64_array(ids_at, n_ids)
                seed, epoch = state[0], state[1]
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = np.int64(batch_indices[dst_ix])
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    gid = gid_of[source_ix] if source_ix < n_ids else np.int64(-1)
                    # signed 64-bit throughout: numba turns mixed signed/unsigned into floats
                    i, j, h, w, flip = view_c(seed, epoch, gid, np.int64(height),
                                              np.int64(width), scale0, scale1, ratio0, ratio1)
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
                    if flip:
                        flip_c(destination[dst_ix])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    decoder = ScaledRandomResizedCrop(output_size, scale=seeded.SCALE, ratio=seeded.RATIO)
    decoder.views = views
    return decoder


def device_normalize(device: torch.device, dtype=np.float32):
    """FFCV operation: uint8 channels-last images already on `device` -> (x - mean) / std in
    `dtype`, channels-last, in torch.

    FFCV's own NormalizeImage imports cupy (and pytorch_pfn_extras) for its GPU kernel, which the
    install does not provide: every rank would fail building its loader. One fused torch kernel
    (addcmul, computed in float32, written in `dtype`) does the same on any device, in FFCV's
    loader thread and CUDA stream, into a buffer FFCV allocates like its own (same device bytes,
    probe.loader_device_bytes)."""
    from dataclasses import replace

    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

    out_dtype = torch.from_numpy(np.zeros(1, dtype=dtype)).dtype

    class DeviceNormalize(Operation):
        def generate_code(self):
            scale = torch.from_numpy(1 / IMAGENET_STD).view(1, 3, 1, 1).to(device)
            shift = torch.from_numpy(-IMAGENET_MEAN / IMAGENET_STD).view(1, 3, 1, 1).to(device)
            return lambda images, result: normalize_into(images, result, scale, shift)

        def declare_state_and_memory(self, previous_state):
            c, h, w = previous_state.shape
            # (H, W, C) per image: the (B, C, H, W) view of it is channels-last
            return (replace(previous_state, dtype=out_dtype),
                    AllocationQuery((h, w, c), dtype=out_dtype, device=device))

    return DeviceNormalize()


def normalize_into(images: torch.Tensor, result: torch.Tensor, scale: torch.Tensor,
                   shift: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) uint8 -> images * scale + shift written into result (>= B, H, W, C),
    returned as its (B, C, H, W) channels-last view."""
    out = result[:len(images)].permute(0, 3, 1, 2)
    return torch.addcmul(shift, images, scale, out=out)


def _image_tail(device: torch.device, dtype=np.float32):
    """Normalisation into `dtype`, the loader dtype of the run's precision (precision.py): half
    images into a float32 model without autocast fail at the first convolution."""
    from ffcv.transforms import NormalizeImage, ToDevice, ToTensor, ToTorchImage

    if device.type != "cpu":
        return [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(),
                device_normalize(device, dtype)]
    # On CPU, NormalizeImage must come before ToTorchImage: the other order makes FFCV's graph
    # grouping spin forever (seen with ffcv 1.0.2).
    return [NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, dtype), ToTensor(), ToTorchImage()]


def _label_pipeline(device: torch.device):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    # (B, 1) -> (B,): only the label's own dimension; Squeeze() would also drop the batch
    # dimension of a last batch of one image, leaving a 0-d target
    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type != "cpu":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


def set_thread_device(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (nothing elsewhere). CUDA's current
    device is per thread and starts at 0: a thread that touches CUDA without this creates a
    context (~0.3-0.5 GB) on GPU 0, whatever device its tensors are on."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def device_loader(path: str, device: torch.device, **kwargs):
    """An FFCV Loader whose loader thread works on `device`. FFCV's thread enters
    torch.cuda.stream() on the thread's current device, GPU 0 (ffcv#114): every worker but the
    first on a node would hold a CUDA context on GPU 0."""
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator

    class DeviceEpochIterator(EpochIterator):
        def run(self):
            set_thread_device(device)
            super().run()

    class DeviceLoader(Loader):
        def __iter__(self):   # Loader.__iter__ of ffcv 1.0.2, with the iterator above
            from ffcv.pipeline.compiler import Compiler

            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected_order = order[:len(self) * self.batch_size]
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return DeviceEpochIterator(self, selected_order)

    return DeviceLoader(path, **kwargs)


def num_samples(path: str) -> int:
    from ffcv.reader import Reader

    return int(Reader(path).num_samples)


@dataclass(frozen=True)
class Reads:
    """What one rank reads of one split: `layout` says which global sample ids it reads each
    step (placement.py); `local[id]` is where sample `id` is in the node file at `path` (-1: not
    on this node). `stream`: read through FFCV's process cache, whole pages in order."""

    path: str
    ids: SampleIds
    local: np.ndarray
    layout: Layout
    rank: int = 0
    stream: bool = False

    @classmethod
    def whole_file(cls, path: str, rank: int = 0, world: int = 1, batch_size: int = 1,
                   stream: bool = False) -> "Reads":
        """One file read by `world` ranks of `batch_size` each (benchmarks, tests)."""
        n = num_samples(path)
        ids = SampleIds([ShardInfo(path="file", samples=n, bytes=1, sha256="0" * 64)])
        layout = Layout((Group(("file",), tuple(range(world)),
                               tuple(rank_counts(batch_size * world, world))),),
                        "stream" if stream else "random")
        return cls(str(path), ids, np.arange(n), layout, rank, stream)

    @property
    def count(self) -> int:
        """Samples this rank reads per step."""
        return self.layout.place(self.rank)[2]

    def epoch(self, epoch: int, seed: int, done: np.ndarray | None = None,
              max_steps: int = 0) -> EpochReads:
        return epoch_reads(self.ids, self.layout, self.rank, seed, epoch, done, max_steps)

    def val_indices(self) -> np.ndarray:
        """This rank's part of the validation samples, as node-file indices, in order."""
        return self.local[val_part(self.ids, self.layout, self.rank)]


def file_ids(local) -> np.ndarray:
    """Per position in the node file, its global sample id (-1: none), from a rank's `local`
    map: node_data.LocalMap on a run, an id -> position array for a whole file."""
    if hasattr(local, "file_ids"):
        return local.file_ids()
    out = np.full(int(local.max(initial=-1)) + 1, -1, np.int64)
    held = np.flatnonzero(local >= 0)
    out[local[held]] = held
    return out


def given_order():
    """An FFCV traversal order that yields whatever order it was last given (`.current`).
    FFCV takes a custom order as an instance that it calls with the loader."""
    from ffcv.traversal_order.base import TraversalOrder

    class GivenOrder(TraversalOrder):
        def __init__(self):   # bound to its loader in __call__
            self.current = np.zeros(0, np.int64)

        def __call__(self, loader):
            self.loader, self.indices, self.seed, self.distributed = loader, None, 0, False
            return self

        def sample_order(self, epoch: int):
            return self.current

    return GivenOrder()


class TrainLoader:
    """One FFCV Loader over this rank's node file, reused every epoch.

    Each epoch reads the node-file indices it is given (placement.epoch_reads mapped through
    Reads.local), `batch_size` of them per step: this rank's part of each global batch. In
    stream mode (os_cache off) FFCV's process cache reads the pages itself, whole pages in
    order, so a node's share need not fit in its page cache.
    """

    def __init__(self, reads: Reads, batch_size: int, res: int, threads: int, seed: int,
                 device: torch.device, dtype=np.float32):

        from .views import ViewState

        # crops and flips from (seed, epoch, sample id): the decoder maps file positions to ids
        self.views = ViewState(seed, file_ids(reads.local))
        self.decoder = scaled_crop_decoder((res, res), self.views)
        self.reads, self.seed = reads, seed
        self.res, self.batch_size = res, batch_size
        self.order = given_order()
        self.loader = device_loader(
            reads.path, device, batch_size=batch_size, num_workers=threads, order=self.order,
            drop_last=True, seed=seed, os_cache=not reads.stream,
            pipelines={"image": [self.decoder, *_image_tail(device, dtype)],
                       "label": _label_pipeline(device)})

    def epoch(self, epoch: int, res: int, indices: np.ndarray):
        """Batches of `indices` (node-file indices, batch_size per step) at resolution res,
        recompiling the pipeline only when res changes."""
        self.loader.recompile = res != self.res
        if res != self.res:
            self.decoder.output_size = (res, res)
            self.res = res
        self.order.current = np.asarray(indices, np.int64)
        # FFCV sizes an epoch by the order it saw first: this epoch's is the one
        self.loader.first_traversal_order = self.order.current
        self.loader.next_epoch = epoch
        self.views.set_epoch(epoch)   # the crops and flips: the same after a resume
        return iter(self.loader)

    def sample_views(self, epoch: int, gids: np.ndarray) -> np.ndarray:
        """Rows (y, x, h, w, flip) of these samples in `epoch`: the crops (in the stored image's
        pixels) and flips the decoder gives them, from the file's recorded image sizes."""
        from .views import views

        images = self.loader.reader.metadata[f"f{self.loader.field_name_to_f_ix['image']}"]
        local = self.reads.local[gids]
        return views(self.seed, epoch, gids, images["height"][local], images["width"][local],
                     self.decoder.scale, self.decoder.ratio)


def val_loader(reads: Reads, batch_size: int, res: int, threads: int, device: torch.device,
               dtype=np.float32):
    """A rank's part of the validation split, in order, nothing dropped or repeated (nothing at
    all for a rank whose group holds no validation shard)."""
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import OrderOption

    indices = reads.val_indices()
    if not len(indices):
        return []
    return device_loader(reads.path, device, batch_size=batch_size, num_workers=threads,
                         order=OrderOption.SEQUENTIAL, drop_last=False, indices=indices,
                         os_cache=not reads.stream,
                         pipelines={"image": [CenterCropRGBImageDecoder((res, res),
                                                                        ratio=CROP_RATIO),
                                              *_image_tail(device, dtype)],
                                    "label": _label_pipeline(device)})
