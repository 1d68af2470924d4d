"""Progress lines off a terminal (CI, Ray jobs): one every 5 s of the job's own clock, and one
when it is done, never one per update. Checked on a fake clock, not by waiting."""
from __future__ import annotations

import io

from pipeline import progress


class Clock:
    now = 1000.0

    def monotonic(self):
        return self.now


def test_a_line_every_5_s_and_at_the_end(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress, "time", clock)
    out = io.StringIO()   # not a terminal: plain lines
    bar = progress.Progress("stage", {"class tars": 1000, "val tar": 1}, stream=out,
                            title="listing")
    for i in range(1, 1000):
        clock.now += 0.1   # one class tar listed every 0.1 s
        bar.update(**{"class tars": 1})
    lines = out.getvalue().splitlines()
    # 99.9 s: one line each time 5 s had passed since the last (19), none in between
    assert len(lines) == 19, lines
    assert lines[0] == "[stage] listing: 50/1000 class tars, 0/1 val tar (5 s)"
    assert lines[1].startswith("[stage] listing: 100/1000 class tars")
    bar.update(**{"class tars": 1, "val tar": 1})   # done: said at once, 0.0 s after the last
    last = out.getvalue().splitlines()[-1]
    assert len(out.getvalue().splitlines()) == 20
    assert last == "[stage] listing: 1000/1000 class tars, 1/1 val tar (100 s)"
