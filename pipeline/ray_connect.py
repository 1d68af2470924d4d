"""Connecting to Ray the same way from every command."""
from __future__ import annotations

import logging
import os


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` or RAY_ADDRESS; with neither, start a fresh local instance.

    address="local" is explicit on purpose: a bare ray.init() would also pick up a stale
    /tmp/ray/ray_current_cluster left by a crashed run and fail in confusing ways.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True,
                  configure_logging=True)
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:
        # The dashboard serves the State API that Ray Train's controller polls; keep it, on loopback.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", **kwargs)
