"""The exceptions the CLI turns into one line and an exit status: 2 for a user's mistake, 128+N
for signal N (130 for Ctrl-C, 143 for SIGTERM)."""
from __future__ import annotations

import signal


class UserError(Exception):
    """A mistake the user can fix (bad path, bad key, bad option). Printed without a traceback."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: the work stopped, nothing was marked finished."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum
