"""The token bucket on a simulated clock, and rate parsing."""

from __future__ import annotations

import pytest

from gatefill.clock import SimulatedClock
from gatefill.errors import UsageError
from gatefill.throttle import TokenBucket, parse_rate


@pytest.mark.parametrize(
    ("text", "per_second"), [("20/min", 20 / 60), ("2/s", 2.0), ("1200/h", 1 / 3), (" 20 / minute", 1 / 3)]
)
def test_parse_rate(text: str, per_second: float) -> None:
    assert parse_rate(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["fast", "20", "-1/min", "0/min", "20/fortnight", "20/min/s"])
def test_bad_rate_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="not a rate"):
        parse_rate(text)


def test_unlimited_never_waits() -> None:
    clock = SimulatedClock()
    bucket = TokenBucket(parse_rate("unlimited"), clock, capacity=5)
    for _ in range(100):
        assert bucket.acquire(5) == 0.0
    assert clock.monotonic() == 0.0


@pytest.mark.parametrize("batch", [1, 5, 7, 39])
def test_39_sessions_at_20_per_minute_take_117_seconds(batch: int) -> None:
    clock = SimulatedClock()
    bucket = TokenBucket(parse_rate("20/min"), clock, capacity=batch)
    remaining = 39
    while remaining:
        n = min(batch, remaining)
        bucket.acquire(n)
        clock.advance(0.05 * n)  # work itself takes time; the bucket keeps accruing meanwhile
        remaining -= n
    assert clock.monotonic() == pytest.approx(117.0, rel=0.02)
    assert 39 / clock.monotonic() * 60 == pytest.approx(20.0, rel=0.02)


def test_no_window_exceeds_the_rate() -> None:
    clock = SimulatedClock()
    bucket = TokenBucket(parse_rate("2/s"), clock, capacity=4)
    stamps = []
    for _ in range(40):
        bucket.acquire(1)
        stamps.append(clock.monotonic())
    for i, start in enumerate(stamps):
        within = [t for t in stamps[i:] if t < start + 1.0]
        assert len(within) <= 2
