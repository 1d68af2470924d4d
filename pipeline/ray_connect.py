"""Connecting to Ray the same way from every command."""
from __future__ import annotations

import logging
import os


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` or RAY_ADDRESS; with neither, start a fresh local instance.

    address="local" is explicit on purpose: a bare ray.init() would also pick up a stale
    /tmp/ray/ray_current_cluster left by a crashed run and fail in confusing ways.
    """
    import signal
    import threading

    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True,
                  configure_logging=True)
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:
        # The dashboard serves the State API that Ray Train's controller polls; keep it, on loopback.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", **kwargs)
    # Ray's core worker installs a SIGTERM handler that aborts the process (exit 134, a stack
    # dump): the command's own handling (exit 143, how to resume) is put back.
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def pin_cluster_address() -> None:
    """Name the connected cluster in RAY_ADDRESS, and have Ray Train pass it from the driver to
    its controller (whose child actors inherit it).

    Ray Train's placement-group cleaner asks the State API whether the run's controller still
    lives. Without RAY_ADDRESS it asks the Ray instance started last on this machine
    (/tmp/ray/ray_current_cluster), which may be another one: there the controller is unknown,
    so the cleaner removes the healthy run's placement group and its workers are killed (a
    restart nothing explains, or a failed run with max_failures 0)."""
    import ray
    from ray.train.v2._internal import constants

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")
