"""The exceptions the CLI turns into one line and an exit status: 2 for a user's mistake, 128+N
for signal N (130 for Ctrl-C, 143 for SIGTERM)."""
from __future__ import annotations

import signal


class UserError(Exception):
    """A mistake the user can fix (bad path, bad key, bad option). Printed without a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the work stopped, nothing was marked finished.

    A KeyboardInterrupt because Ray's blocking calls (ray.get) stop waiting for that alone: any
    other exception a signal handler raises there is held until the call returns (a whole
    training later) and then surfaces as a SystemError. Ray raises a plain KeyboardInterrupt
    in its place, so the signal is also kept in `last_signal`."""

    last_signal: int | None = None

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @classmethod
    def raise_for(cls, signum: int, frame=None):
        """A signal handler: remember the signal and stop the work."""
        cls.last_signal = signum
        raise cls(signum)

    @classmethod
    def signal_of(cls, exc: KeyboardInterrupt) -> int:
        return exc.signum if isinstance(exc, cls) else cls.last_signal or signal.SIGINT
