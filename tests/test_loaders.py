"""The reduced-scale JPEG decoder gives what FFCV's full-scale decoder gives."""
from __future__ import annotations

import numpy as np

from pipeline.manifest import WriterSettings
from pipeline.shards import write_beton


def _decode_all(path, decoder):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(path), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [decoder, ToTensor()],
                                                "label": [IntDecoder(), ToTensor()]})
    return np.concatenate([x.numpy().copy() for x, _ in loader]).astype(np.float32)


def test_scaled_decode_matches_full_decode(tmp_path):
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder

    from pipeline.loaders import scaled_crop_decoder

    yy, xx = np.mgrid[0:600, 0:800].astype(np.float32)
    images = [np.stack([xx / 800 * 255, yy / 600 * 255, np.full_like(xx, 40.0 * k)], -1)
              .astype(np.uint8) for k in range(6)]
    path = tmp_path / "big.beton"
    # every image stored as JPEG, 800x600: a 64 px output lets libjpeg-turbo decode at 1/8
    write_beton(path, images, list(range(6)),
                WriterSettings(max_resolution=800, compress_probability=1.0), seed=0)
    whole = dict(scale=(1.0, 1.0), ratio=(800 / 600, 800 / 600))   # the crop is the image
    ours = scaled_crop_decoder((64, 64))
    ours.scale, ours.ratio = whole["scale"], whole["ratio"]
    reference = RandomResizedCropRGBImageDecoder((64, 64), **whole)
    a, b = _decode_all(path, ours), _decode_all(path, reference)
    assert a.shape == b.shape == (6, 64, 64, 3)
    assert np.abs(a - b).mean() < 2.0 and np.abs(a - b).max() < 24
