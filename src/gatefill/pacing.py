"""How fast an apply goes: the pacer decides, before each batch, whether it may start (the hold indicators of
``gatefill.holds``), how many candidates it takes, and how long it waits for the rate's tokens; after each batch it
learns from what the batch measured.

Every hold is recorded in the ledger when it begins and when it ends, fenced by the run's lease.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from gatefill import ledger
from gatefill.clock import Clock, sleep_unless
from gatefill.db import Database
from gatefill.holds import Indicator, Reading, first_hold
from gatefill.job import BatchRecord, Fence
from gatefill.throttle import Rate, TokenBucket

__all__ = ["Pacer"]


@dataclass
class Pacer:
    """Paces one apply invocation of run ``run_id``."""

    db: Database
    run_id: str
    clock: Clock
    stop: threading.Event
    fence: Fence
    rate: Rate
    #: Candidates per batch (the plan's, or --batch-size).
    size: int
    indicators: Sequence[Indicator] = ()
    #: Seconds between looks at the indicators while held.
    interval: float = 1.0
    #: Measured: the throttle's waits, and the holds with the time they kept batches from starting.
    throttle_wait_seconds: float = 0.0
    holds: int = 0
    held_seconds: float = 0.0
    _bucket: TokenBucket | None = field(default=None, repr=False)

    def batch_size(self) -> int:
        """How many candidates the next batch takes."""
        return self.size

    def wait_for_tokens(self, n: int) -> None:
        """Waits for ``n`` of the rate's tokens (at once when stopped or unlimited)."""
        if self._bucket is None:
            self._bucket = TokenBucket(self.rate, self.clock, capacity=max(self.size, n))
        self.throttle_wait_seconds += self._bucket.acquire(n, self.stop)

    def after_batch(self, batch: BatchRecord) -> None:
        """Learns from a committed batch (its duration and size)."""
        return None

    def hold_while_held(self, batch_no: int) -> None:
        """Keeps ``batch_no`` from starting while any indicator holds, looking again every interval; records the hold
        when it begins and when it ends (cleared, or cut short by a stop)."""
        reading = first_hold(self.indicators, self.db) if self.indicators and not self.stop.is_set() else None
        if reading is None:
            return
        clock, last, checks = self.clock, reading, 1
        began = clock.monotonic()
        with self.db.begin() as conn:
            self.fence(conn)
            hold_id = ledger.begin_hold(
                conn,
                self.run_id,
                batch_no=batch_no,
                indicator=reading.indicator,
                value=reading.value,
                reason=reading.reason,
                at=clock.now(),
            )
        held: Reading | None = reading
        while held is not None and sleep_unless(clock, self.interval, self.stop):
            held, checks = first_hold(self.indicators, self.db), checks + 1
            last = held or last
        seconds = clock.monotonic() - began
        with self.db.begin() as conn:
            self.fence(conn)
            ledger.end_hold(
                conn,
                hold_id,
                at=clock.now(),
                seconds=seconds,
                checks=checks,
                value=last.value,
                reason=last.reason,
                ended_by="stop" if held is not None else "clear",
            )
        self.holds += 1
        self.held_seconds += seconds
