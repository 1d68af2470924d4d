"""What the user sees: our own lines on the terminal, everything else in a log file.

Ray, Tune, numba and the C++ parts of Ray write a lot to the terminal of the process that drives
them: trial tables, raylet warnings, tracebacks of harmless finalizers. A newcomer cannot find the
result in it. In quiet mode (the default for the long commands) the process's stdout and stderr
file descriptors go to a log file, so children (raylet, GCS) and C++ logging land there too; our
own lines, which start with a tag such as `[train]`, still reach the terminal, also when Ray
forwards them from a worker (`(RayTrainWorker pid=12) [train] epoch 1/3 ...`).
"""
from __future__ import annotations

import getpass
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

TAGS = r"stage|train|tune|trial [^\]]+|register|promote|predict|run|demo|submit|s3|mlflow|cache|pipeline"
OURS = re.compile(rf"^\[({TAGS})\]")
RAY_PREFIX = re.compile(r"^\((?:[^()]*?\s)?pid=\d+[^)]*\)\s")
ANSI = re.compile(r"\x1b\[[0-9;]*m")   # Ray colours the prefix of forwarded lines


class _Terminal:
    out = sys.stdout
    err = sys.stderr
    log_path: Path | None = None


def out():
    return _Terminal.out


def err():
    return _Terminal.err


def say(text: str = "") -> None:
    """A line for the user, on the terminal whatever mode the output is in."""
    _Terminal.out.write(text + "\n")
    _Terminal.out.flush()


def warn(text: str) -> None:
    _Terminal.err.write(text + "\n")
    _Terminal.err.flush()


def log_path() -> Path | None:
    return _Terminal.log_path


class _Router(io.TextIOBase):
    """sys.stdout / sys.stderr in quiet mode: every line goes to the log, ours also to the terminal."""

    def __init__(self, terminal, log):
        self.terminal, self.log, self.partial = terminal, log, ""

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, text: str) -> int:
        self.log.write(text)
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            bare = RAY_PREFIX.sub("", ANSI.sub("", line))
            if OURS.match(bare):
                self.terminal.write(bare + "\n")
        return len(text)

    def flush(self):
        self.log.flush()
        self.terminal.flush()

    def fileno(self):
        return self.log.fileno()


def default_log_dir() -> Path:
    return Path(os.environ.get("PIPELINE_LOG_DIR") or
                Path(tempfile.gettempdir()) / f"pipeline-{getpass.getuser()}" / "logs")


def quiet(command: str, log_dir: str | Path | None = None) -> Path:
    """Send this process's (and its children's) output to a log file; keep the terminal for our
    lines. Returns the log's path."""
    folder = (Path(log_dir) if log_dir else default_log_dir()).resolve()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_out = os.fdopen(os.dup(1), "w", buffering=1)
    terminal_err = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    log = os.fdopen(fd, "a", buffering=1)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _Terminal.out, _Terminal.err, _Terminal.log_path = terminal_out, terminal_err, path
    sys.stdout = _Router(terminal_out, log)
    sys.stderr = _Router(terminal_err, log)
    return path
