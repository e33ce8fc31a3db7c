"""What an apply has left to do, drawn a batch at a time in plan order, at whatever size the pacer asks for.

The ledger is the only record of progress: the work list is the plan's runnable candidates minus those with a
result (plus the failed ones when a run that completed with errors is resumed to retry them). A batch never spans two
plan groups or two plan batches, so the plan's priority order holds whatever sizes the batches are drawn at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gatefill import ledger
from gatefill.db import Database
from gatefill.errors import GateBlocked
from gatefill.job import BatchTask, Candidate
from gatefill.ledger import RunStatus
from gatefill.plan import Batch, Plan

__all__ = ["WorkList", "open_work"]


@dataclass
class WorkList:
    """The remaining work of a run: ``take(n)`` hands out the next batch of at most ``n`` candidates."""

    run_id: str
    #: Runnable sessions of the plan, and how many of them were done before this invocation.
    total: int
    done_before: int
    retrying: bool
    next_batch_no: int
    _segments: list[tuple[str | None, list[Candidate]]] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return sum(len(keys) for _, keys in self._segments)

    @property
    def largest_segment(self) -> int:
        """The most candidates one batch could hold (one plan batch's remaining candidates)."""
        return max((len(keys) for _, keys in self._segments), default=0)

    def take(self, limit: int) -> BatchTask | None:
        """The next batch of at most ``limit`` (≥ 1) candidates, numbered after the run's last; None when done."""
        while self._segments and not self._segments[0][1]:
            self._segments.pop(0)
        if not self._segments:
            return None
        group, candidates = self._segments[0]
        part, rest = candidates[: max(1, limit)], candidates[max(1, limit) :]
        self._segments[0] = (group, rest)
        task = BatchTask(self.run_id, self.next_batch_no, group, tuple(part), self.retrying)
        self.next_batch_no += 1
        return task


def open_work(db: Database, run: ledger.Run, plan: Plan) -> WorkList:
    """The run's remaining work, from its plan and the ledger's results."""
    order, candidates = _work_order(plan)
    with db.connect() as conn:
        done = ledger.session_results_for(conn, run.id)
        committed = ledger.committed_batches(conn, run.id)
    retrying = run.status is RunStatus.COMPLETED_WITH_ERRORS
    wanted = {k for k in order if k not in done or (retrying and done[k] == "failed")}
    return WorkList(
        run_id=run.id,
        total=len(order),
        done_before=len(order) - len(wanted),
        retrying=retrying,
        next_batch_no=max(committed) + 1 if committed else 1,
        _segments=_segments(plan.batches, candidates, wanted),
    )


def _work_order(plan: Plan) -> tuple[list[str], dict[str, Candidate]]:
    """The keys of the plan's batches in order, and the runnable candidates by key."""
    runnable = {c.key: c for c in plan.runnable}
    order = [key for batch in plan.batches for key in batch.keys]
    for key in order:
        if key not in runnable:
            raise GateBlocked("plan", [f"batch lists {key}, which is not a runnable candidate of the plan"])
    return order, runnable


def _segments(
    plan_batches: Sequence[Batch], candidates: Mapping[str, Candidate], wanted: set[str]
) -> list[tuple[str | None, list[Candidate]]]:
    """Per plan batch, its candidates still wanted (plan order); empty ones left out."""
    out: list[tuple[str | None, list[Candidate]]] = []
    for batch in plan_batches:
        keys = [candidates[k] for k in batch.keys if k in wanted]
        if keys:
            out.append((batch.group, keys))
    return out
