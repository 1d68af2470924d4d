"""The one way this project waits for something or retries it: bounded, backing off, in words."""
from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def retry(fn: Callable[[], T], *, timeout: float, transient: Callable[[BaseException], bool],
          first_delay: float = 0.5, max_delay: float = 15.0,
          on_retry: Callable[[BaseException, float], None] | None = None) -> T:
    """fn(), again after each transient failure (backing off) until `timeout` seconds have gone;
    then, or on any other failure, the exception propagates."""
    deadline = time.monotonic() + timeout
    delay = first_delay
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            time.sleep(delay)
            delay = min(max_delay, delay * 2)


def wait_until(check: Callable[[], T], *, timeout: float, what: str, interval: float = 0.2,
               give_up: Callable[[], str | None] | None = None) -> T:
    """Poll check() until it returns something truthy; TimeoutError naming `what` after `timeout`
    seconds, or at once with give_up()'s reason when that returns one."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        reason = give_up() if give_up is not None else None
        if reason:
            raise TimeoutError(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


class RateLimit:
    """At most `rate` requests per second from this process, spaced evenly; halved on each
    SlowDown, and back up by a quarter after each second's worth of requests without one."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep):
        self.cap = self.rate = float(rate)
        self.clock, self.sleep = clock, sleep
        self.next, self.calm = 0.0, 0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self.clock()
            at = max(now, self.next)
            self.next = at + 1.0 / self.rate
            self.calm += 1
            if self.calm >= self.rate and self.rate < self.cap:
                self.rate, self.calm = min(self.cap, self.rate * 1.25), 0
        if at > now:
            self.sleep(at - now)

    def slow_down(self) -> None:
        with self._lock:
            self.rate, self.calm = max(1.0, self.rate / 2), 0
