"""Progress for long jobs: bars on a terminal, plain timestamped lines otherwise (CI, Ray jobs)."""
from __future__ import annotations

import time

from . import console


class Progress:
    def __init__(self, label: str, totals: dict[str, int], stream=None, interval: float = 5.0):
        self.label, self.totals, self.stream = label, totals, stream or console.err()
        self.done = {k: 0 for k in totals}
        self.start = self.last = time.monotonic()
        self.interval = interval
        self.bars = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bars = {k: tqdm(total=v, desc=f"{label} {k}", unit=k[:-1] if k.endswith("s") else k,
                                 position=i, file=self.stream, leave=True)
                         for i, (k, v) in enumerate(totals.items())}

    def update(self, **counts: int) -> None:
        for k, n in counts.items():
            self.done[k] += n
            if self.bars:
                self.bars[k].update(n)
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
        return f"[{self.label}] " + ", ".join(parts) + f" ({elapsed:.0f} s)"

    def close(self) -> None:
        if self.bars:
            for bar in self.bars.values():
                bar.close()
