"""Ray Tune sweeps around whole training runs: the search space and the sweep driver."""
