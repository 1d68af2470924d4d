"""Training: the model, the per-worker loop (plain PyTorch), the driver (Ray Train at the edges),
the checkpoint format, and what a run records about itself.

launch (the driver) -> cluster (capacity, node data) -> worker (ImageNetTrainer, per rank) ->
checkpoint (the format) -> summary / run_events (what the run leaves beside its checkpoints).
"""
