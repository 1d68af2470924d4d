"""The data path: ImageNet as users have it -> FFCV shards + manifest on storage -> each node's
cache -> the loaders a worker reads.

source (find images and labels; archives: list the original tars by their headers, each byte
read once) -> images (decode safely) -> shards (plan, write one) -> stage (Ray tasks, manifest
last; lease: one stage per destination) -> manifest (what a dataset holds, checked on read) ->
shares (each node's exact share: whole shards and at most two cut ones) -> placement (who
reads what; the order of every epoch over global sample ids, the cursor inside an epoch) -> node_data (each worker group's nodes measured, the choices, the fetch)
-> node_cache (a node's local copy) -> loaders (FFCV pipelines; jpeg_crop decodes only what a
crop needs).
"""
