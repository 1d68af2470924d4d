"""Progress for long jobs: bars on a terminal, plain timestamped lines otherwise (CI, Ray jobs)."""
from __future__ import annotations

import time
from typing import Callable

from . import console


class Progress:
    """Counts towards totals, e.g. {"shards": 20, "files": 20000}. title names what is counted
    (`[stage] listing: 3/1000 class tars`); detail() adds figures to each line (bytes, rates)."""

    def __init__(self, label: str, totals: dict[str, int], stream=None, interval: float = 5.0,
                 title: str = "", detail: Callable[[], str] | None = None):
        self.label, self.totals, self.stream = label, totals, stream or console.err()
        self.title, self.detail = title, detail
        self.done = {k: 0 for k in totals}
        self.start = self.last = time.monotonic()
        self.interval = interval
        self.bars = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bars = {k: tqdm(total=v, desc=f"{label} {title} {k}".replace("  ", " "),
                                 unit=k[:-1] if k.endswith("s") else k,
                                 position=i, file=self.stream, leave=True)
                         for i, (k, v) in enumerate(totals.items())}

    def update(self, **counts: int) -> None:
        for k, n in counts.items():
            self.done[k] += n
            if self.bars:
                self.bars[k].update(n)
                if self.detail:
                    self.bars[k].set_postfix_str(self.detail(), refresh=False)
        now = time.monotonic()
        if not self.bars and (now - self.last >= self.interval or self.finished):
            self.last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    @property
    def finished(self) -> bool:
        return all(self.done[k] >= self.totals[k] for k in self.totals)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.done[k]}/{self.totals[k]} {k}" for k in self.totals]
        title = f"{self.title}: " if self.title else ""
        detail = f"; {self.detail()}" if self.detail else ""
        return f"[{self.label}] {title}" + ", ".join(parts) + f" ({elapsed:.0f} s){detail}"

    def close(self) -> None:
        if self.bars:
            for bar in self.bars.values():
                bar.close()
