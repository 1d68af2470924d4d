"""The data path: ImageNet as users have it -> FFCV shards + manifest on storage -> each node's
cache -> the loaders a worker reads.

source (find images and labels) -> images (decode safely) -> shards (plan, write one) -> stage
(Ray tasks, manifest last; lease: one stage per destination) -> manifest (what a dataset holds,
checked on read) -> placement (which node holds which shards) -> node_cache (a node's local
copy) -> loaders (FFCV pipelines; jpeg_crop decodes only what a crop needs).
"""
