"""Training: the model, the per-worker trainer (plain PyTorch), the worker entry and the driver
(Ray Train at the edges), the checkpoint format, and what a run records about itself.

launch (the driver) -> cluster (capacity, the data's checks) -> worker (each Ray Train worker:
data, resume, steps, reports) -> trainer (ImageNetTrainer: the recipe, one step, the loops) ->
control (checkpoints inside epochs, preemption notices, progress) -> checkpoint (the format) ->
summary / run_events (what the run leaves beside its checkpoints); failures (how a failure is
judged, a hand-over before a preemption deadline, elastic restarts that count only nodes that
can take a worker); precision, probe, model.
"""
