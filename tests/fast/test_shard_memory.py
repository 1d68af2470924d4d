"""What a shard task asks Ray for: the memory it holds at its peak, so a stager node runs as many
tasks as its memory holds (not one per CPU, which Ray's memory monitor then kills)."""
from __future__ import annotations

import pytest

from pipeline.config import WriterSettings
from pipeline.data.shards import (DECODE_BYTES_PER_PIXEL, TASK_BASE_BYTES, ShardPlan,
                                  check_memory_fits, shard_task_memory)
from pipeline.data.source import SourceImage
from pipeline.errors import UserError

GiB = 2 ** 30


def plan(n: int, size: int = 110_000) -> ShardPlan:
    images = tuple(SourceImage(f"train/n1/{i}.JPEG", "n1", "x.tar", i * size, size) for i in range(n))
    return ShardPlan("train", 0, images, (0,) * n, "f" * 64)


def test_the_estimate_is_the_worker_the_decoded_shard_the_fetched_files_and_one_decode():
    w = WriterSettings(max_resolution=256, max_image_pixels=1_000_000)
    assert shard_task_memory(plan(10, 5000), w) == \
        TASK_BASE_BYTES + 10 * 256 * 256 * 3 + 10 * 5000 + DECODE_BYTES_PER_PIXEL * 1_000_000


def test_it_grows_with_the_shard_and_the_resolution():
    w = WriterSettings()
    assert shard_task_memory(plan(2048), w) > shard_task_memory(plan(1024), w)
    assert shard_task_memory(plan(1024), WriterSettings(max_resolution=256)) < \
        shard_task_memory(plan(1024), w)
    assert shard_task_memory(plan(1024), WriterSettings(max_image_pixels=10_000_000)) < \
        shard_task_memory(plan(1024), w)


def test_a_file_over_the_decoding_bound_is_never_fetched_so_not_counted():
    w = WriterSettings(max_image_pixels=1_000_000)   # files over ~4 MB are skipped unread
    assert shard_task_memory(plan(4, 50 * 2 ** 20), w) == shard_task_memory(plan(4, 0), w)


def test_imagenet_defaults_on_the_stager_of_cluster_yaml():
    """c6i.8xlarge: 32 vCPUs, 64 GiB, of which Ray offers tasks about 70 %. One task per CPU
    (what 'num_cpus=1' alone asked) held ~2 GB each: more than the node has."""
    need = shard_task_memory(plan(1024), WriterSettings())   # 1024 images of ~110 KB, 512 px
    assert 1.5 * GiB < need < 2.5 * GiB
    ray_memory = 0.7 * 64 * GiB
    assert 32 * need > ray_memory > 16 * need   # memory, not CPUs, bounds it: 16-22 at once


def test_a_shard_no_node_can_hold_is_refused_in_words():
    check_memory_fits(2 * GiB, [1 * GiB, 3 * GiB], 1024)
    with pytest.raises(UserError, match=r"needs about 8.0 GiB .* largest node offers Ray 3.0 GiB: "
                                        r"lower --shard-size or --max-resolution"):
        check_memory_fits(8 * GiB, [1 * GiB, 3 * GiB], 4096)
    with pytest.raises(UserError, match="largest node offers Ray 0.0 GiB"):
        check_memory_fits(1, [], 1)
