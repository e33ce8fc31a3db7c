"""Rate limiting for apply: a token bucket on the injected clock, and rate parsing (``20/min``, ``unlimited``).

The bucket starts empty and holds at most one batch of tokens, so no window of the run, its start included, goes
faster than the rate: 39 sessions at 20/min take 117 s, which is also what the measured rate then reports (20/min).
A bucket that started full would let the first batch through at once and report a rate above the one asked for.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from gatefill.clock import Clock, sleep_unless
from gatefill.errors import UsageError

__all__ = ["Rate", "TokenBucket", "parse_rate"]

_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True)
class Rate:
    """Units per second, or None for unlimited; ``text`` is how the user wrote it."""

    per_second: float | None
    text: str

    @property
    def unlimited(self) -> bool:
        return self.per_second is None

    def seconds_for(self, units: int) -> float:
        """How long ``units`` take at this rate (0 when unlimited)."""
        return 0.0 if self.per_second is None else units / self.per_second


def parse_rate(text: str) -> Rate:
    """Parses ``20/min``, ``0.5/s``, ``1200/h`` or ``unlimited``; a ``UsageError`` otherwise."""
    cleaned = text.strip().lower()
    if cleaned in ("unlimited", "none", "0"):
        return Rate(None, "unlimited")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*([a-z]+)", cleaned)
    if not match or match.group(2) not in _PER or float(match.group(1)) <= 0:
        raise UsageError(f"not a rate: {text!r} (use e.g. 20/min, 2/s, 1200/h or unlimited)")
    return Rate(float(match.group(1)) / _PER[match.group(2)], cleaned)


class TokenBucket:
    """Hands out tokens at a fixed rate; ``acquire(n)`` waits (on the clock) until ``n`` tokens have accrued."""

    def __init__(self, rate: Rate, clock: Clock, capacity: int = 1) -> None:
        self.rate = rate
        self.clock = clock
        self.capacity = max(1, capacity)
        self._tokens = 0.0
        self._last = clock.monotonic()
        self.waited = 0.0

    def _refill(self) -> None:
        now = self.clock.monotonic()
        if self.rate.per_second is not None:
            self._tokens = min(float(self.capacity), self._tokens + (now - self._last) * self.rate.per_second)
        self._last = now

    def acquire(self, n: int = 1, stop: threading.Event | None = None) -> float:
        """Blocks until ``n`` tokens are available and takes them; returns the seconds it waited.

        If ``stop`` is set during the wait, the wait ends at once and no token is taken (the caller stops)."""
        if self.rate.per_second is None or n <= 0:
            return 0.0
        if n > self.capacity:
            raise ValueError(f"cannot take {n} tokens from a bucket of {self.capacity}")
        self._refill()
        missing = n - self._tokens
        waited = 0.0
        if missing > 1e-12:
            waited = missing / self.rate.per_second
            if stop is None:
                self.clock.sleep(waited)
            else:
                began = self.clock.monotonic()
                if not sleep_unless(self.clock, waited, stop):
                    self._refill()
                    interrupted = self.clock.monotonic() - began
                    self.waited += interrupted
                    return interrupted
            self._refill()
        # Floating point can leave a hair under n after the exact wait; the wait itself was exact.
        self._tokens = max(0.0, self._tokens - n)
        self.waited += waited
        return waited
