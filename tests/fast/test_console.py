"""The quiet terminal: our tagged lines reach it, also forwarded from Ray workers; the rest goes
to the log only."""
from __future__ import annotations

import io

from pipeline.console import _Router


def test_only_our_lines_reach_the_terminal_and_everything_the_log():
    terminal, log = io.StringIO(), io.StringIO()
    router = _Router(terminal, log)
    router.write("\x1b[36m(RayTrainWorker pid=20633)\x1b[0m [train] epoch 1/3 loss 1.2\n")
    router.write("(ImplicitFunc pid=7, ip=10.0.0.2) [trial 1a_00001] epoch 2/3 top1 0.9\n")
    router.write("2026-11-26 00:00:01,000 WARNING core_worker.cc:123 -- PreemptionWatcher\n")
    router.write("== Status ==\nTrial status: 1 RUNNING\n")
    router.write("Traceback (most recent call last):\n  KeyError: 12\n")
    router.write("[stage] 3/5 shards")       # no newline yet: held until the line ends
    assert terminal.getvalue() == ("[train] epoch 1/3 loss 1.2\n"
                                   "[trial 1a_00001] epoch 2/3 top1 0.9\n")
    router.write(", 30/50 files (4 s)\n")
    assert terminal.getvalue().endswith("[stage] 3/5 shards, 30/50 files (4 s)\n")
    assert "PreemptionWatcher" in log.getvalue() and "KeyError" in log.getvalue()
    assert "[train] epoch 1/3" in log.getvalue()
