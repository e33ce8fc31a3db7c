"""How fast an apply goes: the pacer decides, before each batch, whether it may start and how big and how fast it
is, from its indicators (``gatefill.holds``, ``gatefill.indicators``); after each batch it learns from what the
batch measured.

- **Stop** (any indicator): no batch starts until every indicator has read Normal (or N/A) for ``cool_down``
  seconds, looking every ``interval``; the apply then resumes at one Hold step.
- **Hold**: each consecutive look that holds halves the rate and the batch size, down to ``floor`` of them; each
  Normal look doubles them back, a step at a time. With no fixed rate (``unlimited``) the halving starts from the
  throughput measured over the last batches.
- **Normal**: with ``target_batch_time``, batches are sized so that one lasts that long (an EMA of the measured
  seconds per candidate, alpha 0.4 as GitLab's optimizer; growth at most x2 per batch), within ``min_size`` ..
  ``max_size``; a fixed size (``--batch-size``) is never resized, only halved by Holds.

The manual indicators (file, query) are read before every batch; the health ones at most once per ``interval``
(their rates are measured between looks). Every decision that changed something is recorded in the ledger
(``gatefill_decisions``, with each Stop also in ``gatefill_holds``), fenced by the run's lease.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.clock import Clock, sleep_unless
from gatefill.db import Database
from gatefill.holds import Indicator, Reading, read_all, worst
from gatefill.job import BatchRecord, Fence
from gatefill.throttle import Rate, TokenBucket

__all__ = ["Pacer"]

#: Weight of the newest batch in the seconds-per-candidate average (GitLab's batch optimizer uses 0.4).
_EMA_ALPHA = 0.4
#: A fitted size closer than this share to the current one leaves it as it is (no decision for noise).
_DEAD_BAND = 0.15


@dataclass
class Pacer:
    """Paces one apply invocation of run ``run_id``."""

    db: Database
    run_id: str
    clock: Clock
    stop: threading.Event
    fence: Fence
    rate: Rate
    #: Candidates per batch to start with (the plan's, or --batch-size).
    size: int
    indicators: Sequence[Indicator] = ()
    #: Seconds between looks at the health indicators, and at every indicator while a Stop holds.
    interval: float = 1.0
    cool_down: float = 60.0
    #: Seconds a batch should take (None: the size stays as given); ``fixed_size``: the user's --batch-size.
    target_batch_time: float | None = None
    fixed_size: bool = False
    min_size: int = 1
    max_size: int = 1000
    floor: float = 1 / 16
    #: Fresh looks in a row with every indicator Normal before each step back up (one look is too eager: a Hold that
    #: clears because the apply slowed down would come straight back).
    recover_after: int = 3
    #: Told when a Stop begins (True, its reason) and ends (False, how): the worker coordinator publishes it to its
    #: workers, so that batches already queued wait too.
    on_stop: Callable[[bool, str], None] | None = None
    #: Measured: the throttle's waits, the Stops with the time they kept batches from starting, the decisions.
    throttle_wait_seconds: float = 0.0
    holds: int = 0
    held_seconds: float = 0.0
    decisions: list[ledger.PaceDecision] = field(default_factory=list)
    _steps: int = 0
    _normal_looks: int = 0
    _watched: bool = False
    _largest: int = 0
    _reference: float | None = None
    _last_look: float | None = None
    _health: list[Reading] = field(default_factory=list)
    _per_candidate: float | None = None
    _throughput: float | None = None
    _last_end: float | None = None
    _bucket: TokenBucket | None = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------------ what it hands out

    @property
    def factor(self) -> float:
        """The share of the rate and batch size Holds leave (1 when none)."""
        return max(self.floor, 0.5**self._steps)

    def batch_size(self) -> int:
        """How many candidates the next batch takes."""
        return max(min(self.min_size, self.size), math.floor(self.size * self.factor), 1)

    def current_rate(self) -> Rate:
        """The effective rate after Hold slow-downs (the configured one when nothing holds)."""
        if self._steps == 0:
            return self.rate
        reference = self.rate.per_second or self._reference or self._fallback_rate()
        per_second = reference * self.factor
        basis = self.rate.text if self.rate.per_second else f"{reference:.3g}/s measured"
        return Rate(per_second, f"{per_second:.3g}/s ({self.factor:g} of {basis}: Hold)")

    def _fallback_rate(self) -> float:
        """Candidates per second when nothing was measured yet: a batch per target time (or per second)."""
        return self.size / (self.target_batch_time or 1.0)

    def wait_for_tokens(self, n: int) -> None:
        """Waits for ``n`` of the current rate's tokens (at once when stopped or unlimited)."""
        rate = self.current_rate()
        if self._bucket is None or self._bucket.rate != rate or self._bucket.capacity < n:
            self._bucket = TokenBucket(rate, self.clock, capacity=max(self.size, n))
        self.throttle_wait_seconds += self._bucket.acquire(n, self.stop)

    # ------------------------------------------------------------------------------------------------ learning

    def after_batch(self, batch: BatchRecord) -> None:
        """Learns from a committed batch: the throughput (for a Hold with no fixed rate) and, with a target batch
        time, the size of the next batches."""
        n = len(batch.categories) or len(batch.sessions)
        seconds = max(0.0, (batch.finished_at - batch.started_at).total_seconds())
        now = self.clock.monotonic()
        elapsed = now - self._last_end if self._last_end is not None else seconds
        self._last_end = now
        if n and elapsed > 0:
            measured = n / elapsed
            self._throughput = measured if self._throughput is None else 0.5 * self._throughput + 0.5 * measured
        self._largest = max(self._largest, n)
        if n and self.target_batch_time and not self.fixed_size:
            per = seconds / n
            self._per_candidate = per if self._per_candidate is None else (
                _EMA_ALPHA * per + (1 - _EMA_ALPHA) * self._per_candidate
            )  # fmt: skip
            self._fit_size(batch.batch_no + 1, n, seconds)

    def _fit_size(self, next_batch: int, n: int, seconds: float) -> None:
        assert self.target_batch_time and self._per_candidate is not None
        ideal = self.target_batch_time / self._per_candidate if self._per_candidate > 0 else math.inf
        # Growth at most x2 of the largest batch seen: the work list may hand out less than asked (a plan batch's
        # end), and a size far above what batches really are would make a Hold's halving a no-op.
        fitted = int(max(self.min_size, min(self.max_size, 2 * self._largest, ideal)))
        if abs(fitted - self.size) <= _DEAD_BAND * self.size:
            return
        self.size = fitted
        value = f"{seconds:.3f} s for {n} (EMA {self._per_candidate * 1000:.2f} ms each)"
        threshold = f"target {self.target_batch_time:g} s, {self.min_size}..{self.max_size} per batch"
        reason = f"batches sized to {fitted} to last about {self.target_batch_time:g} s"
        self._record([self._decision(next_batch, "size", "batch_time", "normal", value, threshold, reason)])

    # ----------------------------------------------------------------------------------------------- the looks

    def hold_while_held(self, batch_no: int) -> None:
        """Before ``batch_no``: reads the indicators (the health ones when a look is due), slows down on a Hold,
        speeds back up on Normal, and keeps the batch from starting while a Stop lasts (until its cool-down)."""
        if not self.indicators or self.stop.is_set():
            return
        readings, fresh = self._look()
        if not self._watched:  # the first look lists every indicator, its level and its thresholds
            self._watched = True
            self._record([self._watch(batch_no, r) for r in readings])
        top = worst(readings)
        slows = top is not None and (top.holds or top.slows)
        if fresh or slows:
            self._normal_looks = 0 if slows else self._normal_looks + 1
        if top is not None and top.holds:
            self._stop_until_cool(batch_no, top)
        elif fresh and top is not None and top.slows:
            self._step(batch_no, top, +1)
        elif fresh and self._steps > 0 and self._normal_looks >= self.recover_after:
            self._normal_looks = 0
            self._step(batch_no, None, -1)

    def _look(self) -> tuple[list[Reading], bool]:
        """Every per-batch indicator now, and the health ones when a look is due (else their last readings)."""
        now = self.clock.monotonic()
        due = self._last_look is None or now - self._last_look >= self.interval
        every = [i for i in self.indicators if i.per_batch]
        health = [i for i in self.indicators if not i.per_batch]
        if due:
            self._health, self._last_look = read_all(health, self.db), now
        return [*read_all(every, self.db), *self._health], due and bool(health)

    def _step(self, batch_no: int, reading: Reading | None, step: int) -> None:
        """One Hold step down (``reading`` holds) or one Normal step back up."""
        if step > 0 and self._steps == 0:
            self._reference = self._throughput
        most = math.ceil(math.log2(1 / self.floor)) if self.floor < 1 else 0
        steps = min(most, max(0, self._steps + step))
        if steps == self._steps:
            return
        self._steps = steps
        if reading is not None:
            why = f"Hold: rate and batch size at {self.factor:g} ({reading.reason})"
            found = self._decision(batch_no, "slow", reading.indicator, reading.decision.value, reading.value,
                                   reading.threshold, why)  # fmt: skip
        else:
            why = f"every indicator Normal {self.recover_after} looks in a row: rate and batch size back up to "
            why += f"{self.factor:g}"
            found = self._decision(batch_no, "recover", "all", "normal", "normal", "", why)
        self._record([found])

    def _stop_until_cool(self, batch_no: int, reading: Reading) -> None:
        """Keeps ``batch_no`` from starting until every indicator has read Normal for the cool-down (or a signal
        stops the apply); records the Stop when it begins and when it ends."""
        clock, last, checks = self.clock, reading, 1
        began = clock.monotonic()
        with self.db.begin() as conn:
            self.fence(conn)
            hold_id = ledger.begin_hold(conn, self.run_id, batch_no=batch_no, indicator=reading.indicator,
                                        value=reading.value, reason=reading.reason, at=clock.now())  # fmt: skip
            why = f"Stop: no batch starts until every indicator reads Normal for {self.cool_down:g} s"
            stop = self._decision(batch_no, "stop", reading.indicator, "stop", reading.value, reading.threshold, why)
            self._remember(conn, [stop])
        if self.on_stop is not None:
            self.on_stop(True, f"Stop: {reading.reason}")
        normal_since: float | None = None
        cooled = False
        while not cooled and sleep_unless(clock, self.interval, self.stop):
            readings = read_all(self.indicators, self.db)
            self._health, self._last_look, checks = [r for r, i in zip(readings, self.indicators, strict=True)
                                                     if not i.per_batch], clock.monotonic(), checks + 1  # fmt: skip
            top = worst(readings)
            if top is not None:
                last, normal_since = top, None
            else:
                normal_since = clock.monotonic() if normal_since is None else normal_since
            cooled = normal_since is not None and clock.monotonic() - normal_since >= self.cool_down
        seconds = clock.monotonic() - began
        self._steps = max(self._steps, 1 if cooled else self._steps)
        if self._steps and self._reference is None:
            self._reference = self._throughput
        with self.db.begin() as conn:
            self.fence(conn)
            ended_by = "clear" if cooled else "stop"
            ledger.end_hold(conn, hold_id, at=clock.now(), seconds=seconds, checks=checks, value=last.value,
                            reason=last.reason, ended_by=ended_by)  # fmt: skip
            if cooled:
                why = f"every indicator Normal for {self.cool_down:g} s after the Stop: resuming at {self.factor:g}"
                resume = self._decision(batch_no, "resume", reading.indicator, "normal", last.value,
                                        reading.threshold, why, held=seconds)  # fmt: skip
                self._remember(conn, [resume])
        if self.on_stop is not None and cooled:
            self.on_stop(False, f"every indicator Normal for {self.cool_down:g} s after the Stop")
        self.holds += 1
        self.held_seconds += seconds

    # ------------------------------------------------------------------------------------------- the decisions

    def _watch(self, batch_no: int, r: Reading) -> ledger.PaceDecision:
        return self._decision(batch_no, "watch", r.indicator, r.decision.value, r.value, r.threshold, r.reason)

    def _decision(
        self,
        batch_no: int,
        action: str,
        indicator: str,
        level: str,
        value: str,
        threshold: str,
        reason: str,
        held: float | None = None,
    ) -> ledger.PaceDecision:
        return ledger.PaceDecision(
            self.clock.now(), batch_no, action, indicator, level, value, threshold, reason,
            self.current_rate().text, self.batch_size(), held,
        )  # fmt: skip

    def _record(self, found: Sequence[ledger.PaceDecision]) -> None:
        with self.db.begin() as conn:
            self.fence(conn)
            self._remember(conn, found)

    def _remember(self, conn: Connection, found: Sequence[ledger.PaceDecision]) -> None:
        ledger.record_decisions(conn, self.run_id, found)
        self.decisions.extend(found)
