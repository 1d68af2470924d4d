"""`pipeline bench loader`: our train pipeline vs bare FFCV vs ImageFolder vs the JPEG decode limit."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def _rate(batches, warmup: int = 2) -> float:
    """Images/s after the first `warmup` batches (FFCV compiles its pipeline on the first)."""
    n, start = 0, None
    for i, (x, _) in enumerate(batches):
        if i == warmup:
            start, n = time.perf_counter(), 0
        n += len(x)
    if start is None:
        raise ValueError("too few batches to measure: use more images or a smaller batch")
    return n / (time.perf_counter() - start)


def ours(path: str, res: int, batch: int, threads: int, epochs: int) -> float:
    from ..data.loaders import Reads, TrainLoader

    reads = Reads.whole_file(path, batch_size=batch)
    loader = TrainLoader(reads, batch, res, threads, seed=0, device=torch.device("cpu"))
    orders = [reads.local[reads.epoch(e, seed=0).gids] for e in range(epochs)]
    return max(_rate(loader.epoch(e, res, orders[e])) for e in range(epochs))


def bare_ffcv(path: str, res: int, batch: int, threads: int, epochs: int) -> float:
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    from ..data.loaders import IMAGENET_MEAN, IMAGENET_STD

    loader = Loader(path, batch_size=batch, num_workers=threads, order=OrderOption.RANDOM,
                    drop_last=True, os_cache=True, seed=0,
                    pipelines={"image": [RandomResizedCropRGBImageDecoder((res, res)),
                                         RandomHorizontalFlip(),
                                         NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32),
                                         ToTensor(), ToTorchImage()],
                               "label": [IntDecoder(), ToTensor(), Squeeze()]})
    return max(_rate(iter(loader)) for _ in range(epochs))


def image_folder(root: str, res: int, batch: int, threads: int, epochs: int) -> float:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(res), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(root, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=threads,
                                         drop_last=True, persistent_workers=True)
    return max(_rate(iter(loader)) for _ in range(epochs))


def decode_limit(files: list[str], threads: int) -> float:
    """Full decodes of the source JPEG bytes with libjpeg-turbo (OpenCV), `threads` at a time."""
    import cv2

    blobs = [open(f, "rb").read() for f in files]
    cv2.setNumThreads(1)

    def decode(b):
        return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) is not None

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, blobs[:32]))
        start = time.perf_counter()
        ok = sum(pool.map(decode, blobs))
    return ok / (time.perf_counter() - start)


def run(args) -> list[dict]:
    import tempfile

    from . import node_copy, staged_sample

    threads = args.threads or os.cpu_count()
    work = tempfile.mkdtemp(prefix="pipeline-bench-loader-")
    source, staged = staged_sample(work, source=args.source, classes=args.classes,
                                   train_per_class=args.train_per_class, val_per_class=1,
                                   max_resolution=args.max_resolution)
    path = node_copy(staged, "train", os.path.join(work, "cache"))
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(source, "train")) for f in fs]
    common = dict(res=args.res, batch=args.batch_size, threads=threads, epochs=args.epochs)
    rows = []
    for _ in range(args.repeats):   # interleaved, best of each kept
        rows.append(("pipeline TrainLoader (node cache file)", ours(path, **common)))
        rows.append(("bare FFCV Loader (same .beton)", bare_ffcv(path, **common)))
        rows.append(("torchvision ImageFolder + DataLoader", image_folder(os.path.join(source, "train"), **common)))
        rows.append(("full JPEG decode, no augmentation", decode_limit(files, threads)))
    best: dict[str, float] = {}
    for name, rate in rows:
        best[name] = max(best.get(name, 0.0), rate)
    return [{"loader": k, "images_per_s": round(v, 1)} for k, v in best.items()], threads
