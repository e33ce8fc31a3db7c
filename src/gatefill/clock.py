"""The injected clock: every component that reads the time or waits takes a ``Clock``, so a 6-hour soak or a
20-sessions-per-minute apply can run in seconds under ``SimulatedClock`` in tests and in the demo.

``RealClock`` reads the wall clock (aware UTC) and sleeps for real; ``monotonic`` is for measuring durations.
``SimulatedClock`` starts at a given instant and only moves when someone sleeps or advances it; it is thread-safe so
that a server thread and a test thread can share it.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

__all__ = ["Clock", "OffsetClock", "RealClock", "SimulatedClock", "parse_duration", "sleep_unless", "utc"]


class Clock(Protocol):
    """What time it is, and how to wait."""

    def now(self) -> datetime:
        """The current instant, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for durations and rates)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Waits ``seconds`` (a simulated clock just moves forward)."""
        ...


class RealClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class SimulatedClock:
    """A clock that moves only when slept on or advanced; ``sleep`` returns at once."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = utc(start) if start is not None else datetime.now(UTC)
        self._elapsed = 0.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        with self._lock:
            return self._elapsed

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        """Moves the clock forward (never backwards)."""
        if seconds > 0:
            with self._lock:
                self._elapsed += seconds


class OffsetClock:
    """Real time shifted to start at a given instant: waits are real, timestamps carry the scenario's dates.

    The demo replays 2025-09-17 this way, so its apply really runs at 20 sessions/minute while every row it writes
    is stamped as on that day.
    """

    def __init__(self, start: datetime) -> None:
        self._offset = utc(start) - datetime.now(UTC)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def advance_to(self, instant: datetime) -> None:
        """Moves the clock forward so that ``now()`` is at least ``instant`` (never backwards): the demo's pipeline
        resumes when the six hours it soaked under a simulated clock are over, not before they began."""
        ahead = utc(instant) - self.now()
        if ahead > timedelta(0):
            self._offset += ahead


#: How often a real wait looks at its stop flag (a signal handler sets it).
_STOP_CHECK_SECONDS = 0.1


def sleep_unless(clock: Clock, seconds: float, stop: threading.Event) -> bool:
    """Waits ``seconds`` on ``clock`` unless ``stop`` is set first; True when the whole wait passed.

    A real wait ends within a tenth of a second of ``stop`` being set; a simulated one moves the clock at once, as
    its ``sleep`` does."""
    if isinstance(clock, SimulatedClock):
        clock.sleep(seconds)
        return not stop.is_set()
    end = clock.monotonic() + seconds
    while not stop.is_set():
        left = end - clock.monotonic()
        if left <= 0:
            return True
        clock.sleep(min(left, _STOP_CHECK_SECONDS))
    return False


def utc(value: datetime) -> datetime:
    """The same instant as an aware UTC datetime (naive values are taken to be UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``6h``, ``5m``, ``90s``, ``1h30m`` or ``250ms``; raises ValueError otherwise."""
    import re

    rest = text.strip().lower()
    if not rest:
        raise ValueError("empty duration")
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|d)", rest):
        total += float(number) * _UNITS[unit]
    if re.sub(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|d)", "", rest).strip():
        raise ValueError(f"not a duration: {text!r} (use e.g. 6h, 5m, 90s)")
    return total
