"""Test holds: a process that reaches a named point waits there until a file exists, so a test
can interrupt or change the cluster at a known point however fast the machine. Each hold is
switched on by an environment variable the tests set (PIPELINE_TEST_*); unset, nothing waits."""
from __future__ import annotations

import os
import time

MAX_S = 600.0   # a hold never outlives a test that forgot to release it by much


def hold(path: str, line: str | None = None) -> None:
    """Wait until `path` exists (at most MAX_S). `line`, when given, is appended to PATH.held
    first, so the test knows this point was reached (one O_APPEND write: a reader sees whole
    lines, never a torn one); None waits without saying so (ranks other than 0)."""
    if line is not None:
        fd = os.open(path + ".held", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)
    deadline = time.monotonic() + MAX_S
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)


def task_env() -> dict[str, str]:
    """The PIPELINE_TEST_* variables of this process, for the runtime_env of the Ray tasks it
    starts: a task runs with its node's environment, not the driver's."""
    return {k: v for k, v in os.environ.items() if k.startswith("PIPELINE_TEST_")}
