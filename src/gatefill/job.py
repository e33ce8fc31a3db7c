"""The Job protocol: what a backfill does, as the phase machinery sees it.

A job discovers candidates, says which rows each one will write (the same function serves the plan's expected
changes and apply's writes), processes a batch inside the caller's transaction while reporting every row it changes
with its before-image, and names the tables it writes with their primary keys so rollback can work by key. PRISM
tables appear only in ``gatefill.prism``; phase modules know jobs only through this protocol.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill import stats
from gatefill.clock import Clock
from gatefill.config import Environment
from gatefill.db import Database, format_utc

__all__ = [
    "LOCAL_EXECUTOR",
    "NOT_APPLICABLE",
    "VERDICTS",
    "Baseline",
    "BatchOutcome",
    "BatchRecord",
    "BatchTask",
    "Candidate",
    "ChangeSink",
    "ChartGuides",
    "ChartLine",
    "Check",
    "Executor",
    "Fence",
    "GateCheck",
    "Job",
    "Look",
    "Measurement",
    "ReportTable",
    "RowChange",
    "SeriesBucket",
    "SessionOutcome",
    "SoakChecks",
    "SoakSettings",
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

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Check:
        """A check as ``to_json`` stored it (the ledger's soak measurements)."""
        return cls(
            name=str(data["name"]),
            verdict=str(data["verdict"]),
            summary=str(data.get("summary", "")),
            evidence=dict(data.get("evidence") or {}),
            query=data.get("query"),
            gating=bool(data.get("gating", True)),
        )

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
class GateCheck:
    """A check the final gate's checklist cites, under the label a reader of the go/no-go looks for."""

    check: str
    label: str


@dataclass(frozen=True)
class WrittenTable:
    """A table the job writes, with its primary-key columns (rollback restores and deletes by them)."""

    name: str
    primary_key: tuple[str, ...]
    #: The Core definition (gatefill's logical column types), so rollback can restore values exactly.
    table: sa.Table | None = None
    #: The job's before-images hold only the key and the columns it set (not the whole row): rollback then updates
    #: those columns back by key instead of deleting the row and inserting its image whole.
    partial_images: bool = False


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
    #: None when it was not measured (a batch read back from the ledger, which keeps no time per written session).
    seconds: float | None = 0.0


@dataclass
class BatchOutcome:
    """The changes and per-candidate outcomes of one processed batch."""

    changes: list[RowChange] = field(default_factory=list)
    sessions: list[SessionOutcome] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


# What the soak needs from a job's checks


@dataclass(frozen=True)
class Baseline:
    """The frozen comparison window before the soak: what the job counted there, and when and how fast it was counted.

    A job's ``measure_baseline`` fills ``start``, ``end``, ``summary``, ``evidence`` and ``query``; the soak adds
    ``measured_at`` (on the soak's clock) and ``seconds`` (wall time of the measurement) before storing it.
    """

    start: datetime
    end: datetime
    summary: str
    evidence: Mapping[str, Any]
    query: str | None = None
    measured_at: datetime | None = None
    seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "measured_at": None if self.measured_at is None else self.measured_at.isoformat(),
            "seconds": None if self.seconds is None else round(self.seconds, 4),
            "summary": self.summary,
            "evidence": dict(self.evidence),
            "query": self.query,
        }


@dataclass(frozen=True)
class Look:
    """One measurement of the soak: its number, its cutoff, the statistical plan and the previous look's state."""

    run_id: str
    number: int
    max_looks: int
    window_start: datetime
    end: datetime
    window_end: datetime
    taken_at: datetime
    plan: stats.SequentialPlan
    margin: float
    baseline_days: float
    baseline_rate: float | None
    min_n: int
    #: The absolute floor the job's conversion rate must be shown to reach (None: a soak planned without one).
    min_conversion: float | None
    #: True under ``SimulatedClock``: the look's instants are simulated, so probes must tell the server the time.
    simulated_time: bool
    #: The soak's stored baseline, measured once before the first look.
    baseline: Baseline
    #: Each check's evidence at the previous look (empty at the first), state keys included.
    previous: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.number == self.max_looks


@dataclass(frozen=True)
class SeriesBucket:
    """One time bucket of the observability timeline: rates as (successes, trials) and event counts."""

    start: datetime
    end: datetime
    rates: Mapping[str, tuple[int, int]]
    events: Mapping[str, int]
    #: Per rate, trials left out of ``rates`` because they had not had time to finish by the end of the series.
    pending: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ChartLine:
    """A horizontal reference drawn over a rate on the chart: its baseline, a threshold or a floor."""

    series: str
    value: float
    label: str
    style: str  # baseline | threshold | floor


@dataclass(frozen=True)
class ChartGuides:
    """What the chart draws besides the rates: reference lines, and per rate the instant after which trials had
    not had time to finish (the shaded tail), with a sentence saying so."""

    lines: Sequence[ChartLine] = ()
    pending_after: Mapping[str, datetime] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class ReportTable:
    """A table a check suite adds to staging_observability.md (e.g. the probe results per look)."""

    title: str
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    note: str = ""


class SoakChecks(Protocol):
    """A job's soak checks: what to measure at each look and what to chart; see the module docstring."""

    job: str

    @property
    def check_names(self) -> tuple[str, ...]:
        """Every check ``measure`` returns, in report order."""
        ...

    def params(self) -> dict[str, Any]:
        """The suite's settings, recorded in the soak run (no secrets)."""
        ...

    def measure_baseline(self, db: Database, start: datetime, end: datetime) -> Baseline:
        """What the checks compare the window against, counted over ``[start, end)`` (``end`` is the window's start).

        Called once per soak; the result is stored and handed to every look as ``Look.baseline``.
        """
        ...

    def measure(self, db: Database, look: Look) -> list[Check]:
        """Every check at one look, each seeing only rows with timestamps before ``look.end``."""
        ...

    def series(self, db: Database, start: datetime, end: datetime, bucket_seconds: float) -> list[SeriesBucket]:
        """Rates and event counts per time bucket of ``[start, end)`` for the observability report and chart."""
        ...

    def report_tables(self, measurements: Sequence[Measurement]) -> list[ReportTable]:
        """Extra tables for the observability report, built from the stored measurements."""
        ...

    def chart_guides(self, measurements: Sequence[Measurement], end: datetime) -> ChartGuides:
        """Reference lines (baselines, thresholds, floors) and the unfinished tail for the chart of ``[.., end)``."""
        ...


@dataclass(frozen=True)
class Measurement:
    """One stored look: its cutoff, when it was taken, its verdict and every check's result."""

    seq: int
    window_start: datetime
    window_end: datetime
    taken_at: datetime
    verdict: str
    checks: list[Check]

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


@dataclass(frozen=True)
class SoakSettings:
    """What the soak command hands a job's soak checks besides the environment: the latency threshold of its probes,
    whether the clock is simulated (probes then tell the app each look's time), and job-specific options by name."""

    latency_p95_ms: float = 1000.0
    simulated_clock: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


# ====================================================================================================================
# Executors


@dataclass(frozen=True)
class BatchRecord:
    """One processed batch, as the ledger records it (a result per candidate, the batch row) and as its batch log
    (``backfill_logs/batch_N.json``) tells it; every executor hands apply one of these."""

    run_id: str
    batch_no: int
    group: str | None
    #: Candidate key → category, for the batch's candidates in plan order.
    categories: Mapping[str, str]
    sessions: tuple[SessionOutcome, ...]
    #: The rows the batch wrote for this run (as recorded by ``record_row_changes``).
    changes: tuple[RowChange, ...]
    started_at: datetime
    finished_at: datetime
    retrying: bool = False
    #: What an executor adds to the batch row and its log (the functions executor: how its rows were attributed).
    detail: Mapping[str, Any] = field(default_factory=dict)

    def counts(self) -> Counter[str]:
        return Counter(s.result for s in self.sessions)

    def log(self) -> dict[str, Any]:
        """The batch log: counts, rows written per table, and per session its result, operations and rows."""
        counts = self.counts()
        # Grouped once: scanning every change for every session was quadratic in the batch size.
        rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for ch in self.changes:
            before = "absent" if ch.before is None else "present"
            rows[ch.candidate].append({"table": ch.table, "key": dict(ch.key), "before": before})
        sessions = [
            {
                "session_id": s.key,
                "category": self.categories.get(s.key),
                "result": s.result,
                "error": s.error,
                "seconds": None if s.seconds is None else round(s.seconds, 6),
                "operations": s.operations,
                "rows": rows.get(s.key, []),
            }
            for s in self.sessions
        ]
        return {
            "batch_no": self.batch_no,
            "group": self.group,
            **self.detail,
            "started_at": format_utc(self.started_at),
            "completed_at": format_utc(self.finished_at),
            "sessions_processed": len(self.categories),
            "sessions_written": counts["written"],
            "sessions_already_present": counts["already_present"],
            "sessions_failed": counts["failed"],
            "rows_written": dict(Counter(ch.table for ch in self.changes)),
            "sessions": sessions,
        }


@dataclass(frozen=True)
class BatchTask:
    """One batch as apply hands it to an executor: the run, the batch's number and plan group, its candidates in plan
    order, and whether they are failed ones being retried (their earlier results are then replaced)."""

    run_id: str
    batch_no: int
    group: str | None
    candidates: tuple[Candidate, ...]
    retrying: bool = False


#: The executor every job has: ``process_batch`` in the apply's own process and transaction.
LOCAL_EXECUTOR = "local"


class Executor(Protocol):
    """Another way for a job to run apply's batches (PRISM: through the live app's HTTP functions). Each batch still
    commits its data and its ledger rows in one fenced transaction; ``recover`` finishes batches a crash left half
    done, before apply works out what is left."""

    def commit_batch(self, db: Database, job: Job, task: BatchTask, clock: Clock, fence: Fence) -> BatchRecord:
        """Runs one batch and returns it as the ledger recorded it."""
        ...

    def recover(self, db: Database, job: Job, run_id: str, *, clock: Clock, fence: Fence) -> Sequence[BatchRecord]:
        """Finishes every batch of ``run_id`` a crash left unfinished; returns them (empty: nothing was pending)."""
        ...


# ====================================================================================================================
# The job


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

    # ---------------------------------------------------------------------------------------------- per phase

    @property
    def kind(self) -> str:
        """The job's kind (``prism``, ``sql``, or a plugin's), as ``gatefill jobs`` lists it."""
        ...

    def require_schema(self, db: Database) -> None:
        """Raises ``UsageError`` with one line when the environment lacks the tables the job reads or writes."""
        ...

    def executors(self) -> tuple[str, ...]:
        """The executors ``apply --executor`` accepts for this job, ``LOCAL_EXECUTOR`` first."""
        ...

    def open_executor(self, name: str, env: Environment) -> AbstractContextManager[Executor | None]:
        """The executor ``name`` for a run on ``env``, open for the run's duration (None: ``LOCAL_EXECUTOR``)."""
        ...

    def health_checks(
        self,
        conn: Connection,
        *,
        since: datetime,
        now: datetime,
        row_level_security: bool,
        timings: dict[str, float] | None = None,
    ) -> list[Check]:
        """The read-only health checks of an environment over ``[since, now)``, in report order."""
        ...

    def needs_backfill(self, checks: Sequence[Check]) -> bool:
        """Whether these health checks found units that need work (health then composes a mini plan by discovery;
        when none did, a healthy environment is not scanned a second time)."""
        ...

    def gate_checks(self, phase: str) -> Sequence[GateCheck]:
        """The checks of ``phase`` (``soak``, ``health``) the final gate lists, with their checklist labels, in order;
        empty: every gating check the phase recorded, each under its own name."""
        ...

    def newest_activity(self, conn: Connection, since: datetime) -> tuple[datetime | None, str]:
        """The latest instant stamped on the data the health checks count, and the query that read it: a report
        counting those rows may not be dated before it."""
        ...

    def soak_checks(self, env: Environment, settings: SoakSettings) -> AbstractContextManager[SoakChecks]:
        """The checks a staging soak of this job measures at each look, open for the soak's duration."""
        ...
