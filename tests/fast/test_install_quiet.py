"""`make install` prints its own lines: each step's output (apt's, pip's) goes to the install log
and shows only when the step fails, with the log's path. Checked on the Makefile's own `logged`
macro, with stand-in steps (the real ones take minutes and the network)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = """\
quiet-ok:
\t@$(call logged,a step,echo NOISE-OK; echo more-noise)
quiet-fail:
\t@$(call logged,a failing step,echo NOISE-FAIL; exit 3)
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def make(tmp_path, target):
    steps = tmp_path / "steps.mk"
    steps.write_text(STEPS)
    log = tmp_path / "build" / "install.log"
    proc = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "-f", str(steps),
                           f"INSTALL_LOG={log}", target], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    return proc, log


def test_a_step_that_succeeds_prints_one_line_and_logs_its_output(tmp_path):
    proc, log = make(tmp_path, "quiet-ok")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["install: a step"]
    assert "NOISE" not in proc.stdout + proc.stderr
    assert "NOISE-OK\nmore-noise" in log.read_text()


def test_a_step_that_fails_shows_its_output_and_the_log_path(tmp_path):
    proc, log = make(tmp_path, "quiet-fail")
    assert proc.returncode != 0
    assert "NOISE-FAIL" in proc.stdout   # the log's tail, now that it matters
    assert (f"error: install: a failing step failed (exit 3); the whole output: {log}"
            in proc.stdout)
