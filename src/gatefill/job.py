"""The Job protocol: what a backfill does, as the phase machinery sees it.

A job discovers candidates, says which rows each one will write (the same function serves the plan's expected
changes and apply's writes), processes a batch inside the caller's transaction while reporting every row it changes
with its before-image, and names the tables it writes with their primary keys so rollback can work by key. PRISM
tables appear only in ``gatefill.prism``; phase modules know jobs only through this protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

__all__ = [
    "NOT_APPLICABLE",
    "VERDICTS",
    "BatchOutcome",
    "BatchTask",
    "Candidate",
    "ChangeSink",
    "Check",
    "Fence",
    "Job",
    "RowChange",
    "SessionOutcome",
    "WrittenTable",
    "overall_verdict",
]

#: A check that does not apply where it ran (e.g. row-level security on SQLite); its summary says why. It is neither
#: a PASS nor a FAIL, and a verdict made only of N/A checks is INCONCLUSIVE: nothing was measured.
NOT_APPLICABLE = "N/A"
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE", NOT_APPLICABLE)


def overall_verdict(verdicts: Iterable[str]) -> str:
    """The verdict of a set of checks: FAIL if any failed, PASS if every applicable one passed (and at least one
    applied), INCONCLUSIVE otherwise. N/A checks are left out of the arithmetic entirely."""
    applicable = [v for v in verdicts if v != NOT_APPLICABLE]
    if "FAIL" in applicable:
        return "FAIL"
    if applicable and all(v == "PASS" for v in applicable):
        return "PASS"
    return "INCONCLUSIVE"


@dataclass(frozen=True)
class Check:
    """A named predicate with its evidence and verdict (PASS / FAIL / INCONCLUSIVE, or N/A with the reason in its
    summary when it does not apply)."""

    name: str
    verdict: str
    summary: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    query: str | None = None
    gating: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict,
            "summary": self.summary,
            "evidence": dict(self.evidence),
            "query": self.query,
            "gating": self.gating,
        }


@dataclass(frozen=True)
class Candidate:
    """One unit of work (or a blocked one), with its category and the row operations it implies."""

    key: str
    category: str
    created_at: datetime
    operations: tuple[str, ...]
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def blocked(self) -> bool:
        return not self.operations


@dataclass(frozen=True)
class WrittenTable:
    """A table the job writes, with its primary-key columns (rollback restores and deletes by them)."""

    name: str
    primary_key: tuple[str, ...]
    #: The Core definition (gatefill's logical column types), so rollback can restore values exactly.
    table: sa.Table | None = None


@dataclass(frozen=True)
class RowChange:
    """One row a batch wrote: its table, key, the row before (None = absent) and the row after."""

    table: str
    key: Mapping[str, Any]
    before: Mapping[str, Any] | None
    after: Mapping[str, Any]
    candidate: str


#: Where a job reports the changes it has written (apply: the ledger, in the batch's transaction).
ChangeSink = Callable[[Sequence[RowChange]], None]

#: Called first in every transaction that commits a batch: proves this process still holds the run's lease (raises
#: ``ledger.LeaseLost`` otherwise) and keeps it held until the transaction ends.
Fence = Callable[[Connection], None]


@dataclass
class SessionOutcome:
    """What happened to one candidate in a batch: ``written``, ``already_present`` or ``failed`` (with the error)."""

    key: str
    result: str
    operations: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


@dataclass
class BatchOutcome:
    """The changes and per-candidate outcomes of one processed batch."""

    changes: list[RowChange] = field(default_factory=list)
    sessions: list[SessionOutcome] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True)
class BatchTask:
    """One batch as apply hands it to an executor: the run, the batch's number and plan group, its candidates in plan
    order, and whether they are failed ones being retried (their earlier results are then replaced)."""

    run_id: str
    batch_no: int
    group: str | None
    candidates: tuple[Candidate, ...]
    retrying: bool = False


class Job(Protocol):
    """A backfill job; see the module docstring."""

    name: str

    @property
    def versions(self) -> Mapping[str, str]:
        """The versions of what the job writes (a production apply needs a soak of the same versions)."""
        ...

    def written_tables(self) -> Sequence[WrittenTable]:
        """The tables this job writes."""
        ...

    def parse_key(self, text: str) -> str:
        """A candidate key as a user typed it (e.g. ``--priority``), normalized; ``UsageError`` if it cannot be one."""
        ...

    def prechecks(self, conn: Connection, environment: str) -> list[Check]:
        """Checks that must pass before planning or applying (schema, config, privileges)."""
        ...

    def discover(self, conn: Connection, params: Mapping[str, Any]) -> Iterator[Candidate]:
        """Every candidate and blocked unit, in key order, set-based and paginated."""
        ...

    def post_checks(self, conn: Connection, run_id: str) -> list[Check]:
        """Job-specific checks of what a finished apply wrote (e.g. version stamps), for the apply gate."""
        ...

    def process_batch(
        self,
        conn: Connection,
        candidates: Sequence[Candidate],
        *,
        now: datetime,
        run_id: str,
        record: ChangeSink | None = None,
    ) -> BatchOutcome:
        """Writes one batch in the caller's transaction, re-checking each candidate under lock first.

        With ``record``, the job hands it every change as soon as the change is written, on the same connection and
        in the same transaction, so the ledger rows go in while the job works on; the outcome still lists them all.
        """
        ...
