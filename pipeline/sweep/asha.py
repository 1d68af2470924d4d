"""Where ASHA compares trials ("rungs"), as Ray's ASHAScheduler computes them, and the max_t
that keeps every rung before a run's last epoch.

A rung on the last epoch stops a trial below the cut-off inside its final report: its run
writes no summary, and by its epoch count it looks finished (not stopped early). Ray stops a
trial that reaches max_t too (stop_last_trials), so max_t cannot simply be the last epoch:
the scheduler is built with stop_last_trials=False and a max_t below the last epoch.
"""
from __future__ import annotations

import numpy as np


def asha_rungs(max_t: float, grace_period: float, reduction_factor: float,
               bracket: int = 0) -> list[float]:
    """The milestones of one ASHA bracket, ascending: Ray 2.60's _Bracket.__init__
    (ray/tune/schedulers/async_hyperband.py), same arithmetic."""
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) - bracket + 1)
    return [grace_period * reduction_factor ** (k + bracket) for k in range(count)]


def asha_max_t(epochs: int, grace_period: int, reduction_factor: int) -> int | None:
    """max_t for a run of `epochs` epochs whose rungs all fall before its last epoch; None when
    none can (grace_period >= epochs): then nothing is ever stopped early."""
    if grace_period >= epochs:
        return None
    max_t = epochs - 1
    assert max(asha_rungs(max_t, grace_period, reduction_factor)) < epochs
    return max_t
