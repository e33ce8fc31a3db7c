"""What an apply has left to do, drawn a batch at a time in plan order, at whatever size the pacer asks for.

The ledger is the only record of progress: the work list is the plan's runnable candidates minus those with a
result (plus the failed ones when a run that completed with errors is resumed to retry them). A batch never spans two
plan groups or two plan batches, so the plan's priority order holds whatever sizes the batches are drawn at.

The list is a stream: the plan's work is stored with its run (``gatefill_plan_batches`` and
``gatefill_plan_candidates``, written when the run was recorded), and the candidates still to do are read from the
ledger a page at a time, keyset-paginated on their position in the plan, so an apply holds at most a page of them
whatever the plan's size. Counts come from SQL. On Postgres the next page is read on another connection while the
batches of the current one run (a page's read is an anti-join the server does while the apply scores), so the apply
never waits for it after the first; the page read ahead lies wholly after every batch handed out, which cannot change
which of its candidates still need work.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import sqlalchemy as sa

from gatefill import ledger
from gatefill.db import Database
from gatefill.job import BatchTask, Candidate
from gatefill.ledger import RunStatus

__all__ = ["PAGE", "WorkList", "open_work"]

#: Candidates read from the ledger at a time (more when a batch asks for more).
PAGE = 2000


@dataclass
class WorkList:
    """The remaining work of a run: ``take(n)`` hands out the next batch of at most ``n`` candidates."""

    run_id: str
    #: Runnable sessions of the plan, and how many of them were done before this invocation.
    total: int
    done_before: int
    retrying: bool
    next_batch_no: int
    #: The most candidates one batch could hold (the plan's largest batch).
    largest_segment: int = 0
    _db: Database | None = None
    _remaining: int = 0
    _after: int = 0  # the plan position of the last candidate read from the ledger
    _exhausted: bool = False
    _buffer: deque[tuple[int, str, Candidate]] = field(default_factory=deque)
    _ahead: Future[list[tuple[int, int, str, Candidate]]] | None = None
    _reader: ThreadPoolExecutor | None = None

    @property
    def remaining(self) -> int:
        return self._remaining

    def take(self, limit: int) -> BatchTask | None:
        """The next batch of at most ``limit`` (≥ 1) candidates, numbered after the run's last; None when done."""
        limit = max(1, limit)
        self._fill(limit)
        if not self._buffer:
            return None
        plan_batch, group, _ = self._buffer[0]
        part: list[Candidate] = []
        while len(part) < limit:
            if not self._buffer:
                self._fill(limit - len(part))  # the same plan batch may go on in the next page
            if not self._buffer or self._buffer[0][0] != plan_batch:
                break
            part.append(self._buffer.popleft()[2])
        task = BatchTask(self.run_id, self.next_batch_no, group, tuple(part), self.retrying)
        self.next_batch_no += 1
        self._remaining = max(0, self._remaining - len(part))
        return task

    def _fill(self, wanted: int) -> None:
        """Reads the next page from the ledger when the buffer runs short of ``wanted`` (the page read ahead, when
        there is one), and on Postgres starts reading the page after it."""
        if len(self._buffer) >= wanted or self._exhausted or self._db is None:
            return
        size = max(PAGE, wanted)
        ahead, self._ahead = self._ahead, None
        page = ahead.result() if ahead is not None and size == PAGE else self._read(size, self._after)
        self._buffer.extend((batch_no, group, candidate) for _, batch_no, group, candidate in page)
        if page:
            self._after = page[-1][0]
        self._exhausted = len(page) < size
        if not self._exhausted and self._db.caps.concurrent_reads:
            self._reader = self._reader or ThreadPoolExecutor(1, thread_name_prefix="gatefill-worklist")
            self._ahead = self._reader.submit(self._read, PAGE, self._after)

    def _read(self, size: int, after: int) -> list[tuple[int, int, str, Candidate]]:
        assert self._db is not None
        with self._db.connect() as conn:
            return ledger.plan_work_page(conn, self.run_id, after=after, limit=size, retry_failed=self.retrying)

    def close(self) -> None:
        """Waits for a page being read ahead (its connection back in the pool) and ends the reader thread."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader, self._ahead = None, None


def open_work(db: Database, run: ledger.Run, plan: object = None) -> WorkList:
    """The run's remaining work, read from the plan work stored with the run and the ledger's results (``plan`` is
    not read: the run's stored work is what its hash was checked against when it was recorded)."""
    retrying = run.status is RunStatus.COMPLETED_WITH_ERRORS
    with db.connect() as conn:
        total, remaining = ledger.planned_counts(conn, run.id, retry_failed=retrying)
        last = conn.execute(
            sa.select(sa.func.max(ledger.batches.c.batch_no)).where(ledger.batches.c.run_id == run.id)
        ).scalar_one_or_none()
        pb = ledger.plan_batches
        largest = conn.execute(
            sa.select(sa.func.count())
            .where(pb.c.run_id == run.id)
            .group_by(pb.c.batch_no)
            .order_by(sa.func.count().desc())
            .limit(1)
        ).scalar_one_or_none()
    return WorkList(
        run_id=run.id,
        total=total,
        done_before=total - remaining,
        retrying=retrying,
        next_batch_no=int(last) + 1 if last is not None else 1,
        largest_segment=int(largest or 0),
        _db=db,
        _remaining=remaining,
    )
