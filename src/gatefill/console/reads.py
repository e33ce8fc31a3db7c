"""What the console's pages show, read from the ledgers of the environments it watches and returned as frozen records.

Reads only: every write goes through the function the CLI calls. Runs, approvals, holds, soak state and pipeline state
come from ``gatefill.runs``, ``gatefill.gate``, ``gatefill.soak`` and ``ledger``'s reading functions; the few tables
those have no reader for (a run's batch rows, its per-session errors) are selected here, never written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gatefill import ledger
from gatefill.config import WATCH_PERIODS, Environment, Settings
from gatefill.db import Database, parse_utc
from gatefill.errors import DatabaseUnreachable, GatefillError
from gatefill.gate import GateRecord, gate_records
from gatefill.job import Check, Measurement
from gatefill.lease import describe_lease
from gatefill.plan import Plan, PlanHead
from gatefill.runs import GATE_PHASES, RunProgress, planned_total, run_progress
from gatefill.soak import baseline_text

__all__ = [
    "BatchRow",
    "LiveState",
    "PendingGate",
    "PipelineView",
    "RunFilter",
    "RunRow",
    "RunView",
    "SessionRow",
    "SoakView",
    "WatchTrend",
    "WatchView",
    "artifact_files",
    "batch_row",
    "gates",
    "live_state",
    "pipeline_view",
    "plan_of",
    "run_rows",
    "run_view",
    "soak_view",
    "watch_view",
]

#: Per-session rows a run page lists (errors first); the counts above the table cover every session.
SESSION_ROWS = 200


@dataclass(frozen=True)
class RunFilter:
    """The runs list's query string: environment, phase and status, each optional."""

    env: str | None = None
    phase: str | None = None
    status: str | None = None

    def keeps(self, env: str, run: ledger.Run) -> bool:
        return (
            (not self.env or env == self.env)
            and (not self.phase or run.phase == self.phase)
            and (not self.status or run.status.value == self.status)
        )


@dataclass(frozen=True)
class RunRow:
    """One line of the runs list."""

    env: str
    run: ledger.Run
    done: int
    total: int
    approved_by: tuple[str, ...]

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    def age(self, now: datetime) -> str:
        return age_text((now - self.run.created_at).total_seconds())


def age_text(seconds: float) -> str:
    """``42 s``, ``7 min``, ``3 h``, ``2 d``: how long ago, to one unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{max(0, int(seconds))} s"


def _planned_total(run: ledger.Run) -> int:
    """Sessions an apply run plans to process; a soak's looks; 0 for other phases."""
    if run.plan is not None:
        return planned_total(run)
    if run.phase == "soak":
        return int(run.params.get("max_looks", 0))
    return 0


def _pairs(rows: Sequence[Any]) -> dict[str, int]:
    return {str(row[0]): int(row[1] or 0) for row in rows}


def _env_rows(name: str, env: Environment, limit: int, phase: str | None) -> list[RunRow]:
    with Database(env) as db, db.connect() as conn:
        if not sa.inspect(conn).has_table(ledger.runs.name):
            return []
        runs = ledger.list_runs(conn, phase=phase, limit=limit)
        sr, m, a = ledger.session_results, ledger.measurements, ledger.approvals
        done = _pairs(conn.execute(sa.select(sr.c.run_id, sa.func.count()).group_by(sr.c.run_id)).all())
        looks = _pairs(conn.execute(sa.select(m.c.run_id, sa.func.max(m.c.seq)).group_by(m.c.run_id)).all())
        by_run: dict[str, list[str]] = {}
        for row in conn.execute(sa.select(a.c.run_id, a.c.approved_by).order_by(a.c.id)):
            by_run.setdefault(row.run_id, []).append(row.approved_by)
    return [
        RunRow(
            name,
            r,
            int(looks.get(r.id) or 0) if r.phase == "soak" else int(done.get(r.id, 0)),
            _planned_total(r),
            tuple(dict.fromkeys(by_run.get(r.id, []))),
        )
        for r in runs
    ]


def run_rows(settings: Settings, envs: Sequence[str], where: RunFilter, limit: int = 200) -> list[RunRow]:
    """The runs of every watched environment (an unreachable one is skipped), newest first, as filtered."""
    rows: list[RunRow] = []
    for name in envs:
        if where.env and name != where.env:
            continue
        try:
            rows.extend(r for r in _env_rows(name, settings.env(name), limit, where.phase) if where.keeps(name, r.run))
        except (DatabaseUnreachable, GatefillError):
            continue
    return sorted(rows, key=lambda r: r.run.created_at, reverse=True)


@dataclass(frozen=True)
class BatchRow:
    """One committed batch of an apply, as its ledger row tells it."""

    batch_no: int
    status: str
    sessions: int
    succeeded: int
    failed: int
    skipped: int
    started_at: datetime
    finished_at: datetime

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class SessionRow:
    """One session's result in a run."""

    session_id: str
    batch_no: int
    result: str
    error: str | None


@dataclass(frozen=True)
class RunView:
    """An apply run's page: its progress (``gatefill status``), batches, rate and ETA, sessions, holds, approvals and
    files."""

    progress: RunProgress
    batches: list[BatchRow]
    sessions: list[SessionRow]
    files: list[str]
    pending: list[PendingGate]
    rate_per_minute: float | None
    eta_seconds: float | None

    @property
    def run(self) -> ledger.Run:
        return self.progress.run

    @property
    def percent(self) -> float:
        p = self.progress
        return 100.0 * p.done / p.total if p.total else 0.0

    @property
    def lease_text(self) -> str:
        return describe_lease(self.progress.lease, self.run.status.value)


def _batches(conn: sa.Connection, run_id: str) -> list[BatchRow]:
    b = ledger.batches
    rows = conn.execute(sa.select(b).where(b.c.run_id == run_id).order_by(b.c.batch_no))
    return [batch_row(r) for r in rows]


def batch_row(r: sa.Row[Any]) -> BatchRow:
    """A ``gatefill_batches`` row as a record."""
    return BatchRow(r.batch_no, r.status, r.sessions, r.succeeded, r.failed, r.skipped, r.started_at, r.finished_at)


def _sessions(conn: sa.Connection, run_id: str) -> list[SessionRow]:
    s = ledger.session_results
    query = (
        sa.select(s.c.session_id, s.c.batch_no, s.c.result, s.c.error)
        .where(s.c.run_id == run_id)
        .order_by(s.c.error.is_(None), s.c.batch_no, s.c.session_id)
        .limit(SESSION_ROWS)
    )
    return [SessionRow(*r) for r in conn.execute(query).tuples()]


def measured_rate(batches: Sequence[BatchRow]) -> float | None:
    """Sessions a minute over the committed batches (first start to last finish); None before two batches' worth."""
    if not batches:
        return None
    seconds = (batches[-1].finished_at - batches[0].started_at).total_seconds()
    sessions = sum(b.sessions for b in batches)
    return 60.0 * sessions / seconds if seconds > 0 else None


def run_view(settings: Settings, env: str, run_id: str) -> RunView:
    """Everything the run page shows, for a run of any phase (the soak and pipeline pages add their own)."""
    progress = run_progress(settings, run_id, env)
    with Database(progress.environment) as db, db.connect() as conn:
        batches, sessions = _batches(conn, run_id), _sessions(conn, run_id)
    rate = measured_rate(batches)
    left = max(0, progress.total - progress.done)
    running = progress.run.status is ledger.RunStatus.RUNNING
    eta = 60.0 * left / rate if rate and running else None
    pending = pending_gates(progress.run, progress.approvals, env)
    return RunView(progress, batches, sessions, artifact_files(settings, run_id), pending, rate, eta)


@dataclass(frozen=True)
class PendingGate:
    """A gate of a run that has no approval yet: what an Approve button records, and the CLI line that does the
    same."""

    env: str
    run_id: str
    gate: str

    @property
    def command(self) -> str:
        return f"gatefill approve {self.run_id} --gate {self.gate} --by NAME --env {self.env}"


def pending_gates(run: ledger.Run, approvals: Sequence[ledger.Approval], env: str) -> list[PendingGate]:
    """The gates of the run's phase (``gatefill.runs.GATE_PHASES``) not approved yet; a finished or abandoned apply
    has no plan gate left to approve, a planned one no review gate yet."""
    done = {a.gate for a in approvals}
    gates = [g for g, phase in GATE_PHASES.items() if phase == run.phase and g not in done]
    status = run.status
    if run.phase == ledger.APPLY_PHASE:
        if status is not ledger.RunStatus.PLANNED:
            gates = [g for g in gates if g != "plan"]
        if status not in (ledger.RunStatus.SUCCEEDED, ledger.RunStatus.COMPLETED_WITH_ERRORS):
            gates = [g for g in gates if g != "review"]
    elif run.phase == "soak" and status is not ledger.RunStatus.SUCCEEDED:
        gates = []
    return [PendingGate(env, run.id, g) for g in gates]


def artifact_files(settings: Settings, run_id: str) -> list[str]:
    """The run's files under the artifacts directory, as paths relative to its own directory."""
    root = settings.artifacts_dir / run_id
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def artifact_path(settings: Settings, run_id: str, relative: str) -> Path | None:
    """The file ``relative`` of a run's artifacts, or None when it is not one (missing, or outside the directory)."""
    root = (settings.artifacts_dir / run_id).resolve()
    path = (root / relative).resolve()
    if root not in path.parents or not path.is_file():
        return None
    return path


#: Batches a plan page lists (the plan file lists them all).
PLAN_PAGE_BATCHES = 100


@dataclass(frozen=True)
class PlanBatchRow:
    batch_no: int
    group: str
    keys: list[str]


@dataclass(frozen=True)
class PlanCategory:
    name: str
    count: int
    operations: list[str]


@dataclass(frozen=True)
class PlanReview:
    """A plan under review, as its run recorded it: the header on the run's row, its categories' operations and its
    first batches from the work stored beside it (a plan of 1M candidates is never read whole)."""

    run_id: str
    job: str
    created_at: datetime
    hash: str
    since: datetime
    rate: str
    batch_size: int
    versions: Mapping[str, str]
    prechecks: list[Check]
    categories: list[PlanCategory]
    runnable: int
    batch_count: int
    expected_changes: Mapping[str, Mapping[str, int]]
    batches: list[PlanBatchRow]


def plan_of(settings: Settings, env: str, progress: RunProgress) -> PlanReview | None:
    """The plan an apply run recorded, None when it has none."""
    run = progress.run
    if run.plan is None:
        return None
    if "candidates" in run.plan:  # a run recorded before plans were stored apart: its whole plan is on its row
        return _review_of_whole(Plan.from_json(run.plan))
    head = PlanHead.from_header(run.plan)
    with Database(settings.env(env)) as db, db.connect() as conn:
        counts = {name: int(c["count"]) for name, c in run.plan.get("categories", {}).items()}
        categories = [
            PlanCategory(name, n, ledger.plan_category_operations(conn, run.id, name)) for name, n in counts.items()
        ]
        first = ledger.plan_first_batches(conn, run.id, batches=PLAN_PAGE_BATCHES)
    totals = run.plan.get("totals") or {}
    return PlanReview(
        run_id=head.run_id,
        job=head.job,
        created_at=parse_utc(run.plan["created_at"]),
        hash=head.hash,
        since=head.parameters.since,
        rate=head.parameters.rate,
        batch_size=head.parameters.batch_size,
        versions=head.versions,
        prechecks=[Check.from_json(c) for c in run.plan.get("prechecks", [])],
        categories=categories,
        runnable=int(totals.get("candidates", 0)),
        batch_count=int(totals.get("batches", 0)),
        expected_changes=run.plan.get("expected_changes", {}),
        batches=[PlanBatchRow(n, g, keys) for n, g, keys in first],
    )


def _review_of_whole(plan: Plan) -> PlanReview:
    return PlanReview(
        run_id=plan.run_id,
        job=plan.job,
        created_at=plan.created_at,
        hash=plan.hash,
        since=plan.parameters.since,
        rate=plan.parameters.rate,
        batch_size=plan.parameters.batch_size,
        versions=plan.versions,
        prechecks=list(plan.prechecks),
        categories=[PlanCategory(n, len(k), list(plan.operations_of(n))) for n, k in plan.categories().items()],
        runnable=len(plan.runnable),
        batch_count=len(plan.batches),
        expected_changes=plan.expected_changes(),
        batches=[PlanBatchRow(b.batch_no, b.group, list(b.keys)) for b in plan.batches[:PLAN_PAGE_BATCHES]],
    )


@dataclass(frozen=True)
class SoakView:
    """A soak's page: its state (``gatefill status``), every look with each check's verdict, and its files."""

    progress: RunProgress
    looks: list[Measurement]
    check_names: list[str]
    files: list[str]
    pending: list[PendingGate]

    def verdict_of(self, look: Measurement, name: str) -> Check | None:
        return next((c for c in look.checks if c.name == name), None)

    @property
    def baseline_text(self) -> str:
        return baseline_text(self.progress.soak.baseline if self.progress.soak else None)

    @property
    def chart(self) -> str | None:
        """The soak's conversion chart (PNG), once its report has drawn it."""
        return next((f for f in self.files if f.endswith(".png")), None)


def soak_view(settings: Settings, env: str, run_id: str) -> SoakView:
    progress = run_progress(settings, run_id, env)
    with Database(progress.environment) as db, db.connect() as conn:
        looks = ledger.measurements_for(conn, run_id)
    names = list(dict.fromkeys(c.name for look in looks for c in look.checks))
    pending = pending_gates(progress.run, progress.approvals, env)
    return SoakView(progress, looks, names, artifact_files(settings, run_id), pending)


@dataclass(frozen=True)
class PipelineView:
    """A pipeline run: its steps as the ledger records them, what it waits for, the gates still open on its runs."""

    env: str
    run: ledger.Run
    steps: Mapping[str, Mapping[str, Any]]
    waiting_for: str | None
    done: bool
    pending: list[PendingGate]
    step_envs: Mapping[str, str] = field(default_factory=dict)
    #: Each step's report, as (the run directory it is in, its path there), when it lies in the artifacts directory.
    reports: Mapping[str, tuple[str, str]] = field(default_factory=dict)


def pipeline_view(settings: Settings, envs: Sequence[str], env: str, run_id: str) -> PipelineView:
    """The pipeline ``run_id`` with the open gates of each step's run (looked up in the watched environments)."""
    progress = run_progress(settings, run_id, env)
    summary = progress.run.summary or {}
    steps: dict[str, Mapping[str, Any]] = dict(summary.get("steps") or {})
    pending = pending_gates(progress.run, progress.approvals, env)
    step_envs: dict[str, str] = {}
    for detail in steps.values():
        step_run = detail.get("run_id") if isinstance(detail, Mapping) else None
        if not step_run:
            continue
        for name in envs:
            try:
                found = run_progress(settings, str(step_run), name)
            except (DatabaseUnreachable, GatefillError):
                continue
            step_envs[str(step_run)] = name
            pending.extend(pending_gates(found.run, found.approvals, name))
            break
    waiting = summary.get("waiting_for")
    done = bool(summary.get("done"))
    reports = _step_reports(settings, steps)
    return PipelineView(env, progress.run, steps, str(waiting) if waiting else None, done, pending, step_envs, reports)


def _step_reports(settings: Settings, steps: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    root = settings.artifacts_dir.resolve()
    found: dict[str, tuple[str, str]] = {}
    for name, detail in steps.items():
        artifact = detail.get("artifact") if isinstance(detail, Mapping) else None
        path = Path(str(artifact)).resolve() if artifact else None
        if path is not None and root in path.parents and path.is_file():
            run_dir, _, rest = path.relative_to(root).as_posix().partition("/")
            if rest:
                found[name] = (run_dir, rest)
    return found


def gates(settings: Settings, envs: Sequence[str]) -> list[GateRecord]:
    """Every approval and override of the watched environments, newest first (``gatefill gates``)."""
    found: list[GateRecord] = []
    for name in envs:
        try:
            found.extend(gate_records(settings, name))
        except (DatabaseUnreachable, GatefillError):
            continue
    return sorted(found, key=lambda g: g.approval.at, reverse=True)


@dataclass(frozen=True)
class LiveState:
    """What the live parts of a run page show, sent as one server-sent event whenever it changes."""

    status: str
    done: int
    total: int
    batches: int
    rate_per_minute: float | None
    eta_seconds: float | None
    results: Mapping[str, int]
    looks: int
    verdict: str | None
    last_look: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "done": self.done,
            "total": self.total,
            "percent": round(100.0 * self.done / self.total, 1) if self.total else 0.0,
            "batches": self.batches,
            "rate": None if self.rate_per_minute is None else round(self.rate_per_minute, 1),
            "eta": None if self.eta_seconds is None else round(self.eta_seconds),
            "results": dict(self.results),
            "looks": self.looks,
            "verdict": self.verdict,
            "last_look": dict(self.last_look),
            "terminal": ledger.RunStatus(self.status) in ledger.TERMINAL,
        }


def live_state(settings: Settings, env: str, run_id: str) -> LiveState:
    """The run's live numbers now: an apply's progress, or a soak's looks and verdict so far."""
    view = run_view(settings, env, run_id)
    p = view.progress
    last: dict[str, str] = {}
    looks = 0
    if p.soak is not None:
        looks = p.soak.looks_taken
        last = {c.name: c.verdict for c in p.soak.checks}
    return LiveState(
        status=p.run.status.value,
        done=p.done,
        total=p.total,
        batches=p.batches,
        rate_per_minute=view.rate_per_minute,
        eta_seconds=view.eta_seconds,
        results=Counter(p.results),
        looks=looks,
        verdict=p.soak.verdict if p.soak is not None else None,
        last_look=last,
    )


def now_utc() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------------- ongoing watch

#: Results of one check the watch page lists (its trend, newest last).
WATCH_POINTS = 30


@dataclass(frozen=True)
class WatchTrend:
    """One watched check of one set in one environment: its recorded results, oldest first."""

    env: str
    set_name: str
    check: str
    points: tuple[ledger.WatchRecord, ...]

    @property
    def latest(self) -> ledger.WatchRecord:
        return self.points[-1]

    @property
    def changes(self) -> int:
        """How many times the verdict changed over the results shown."""
        return sum(1 for a, b in zip(self.points, self.points[1:], strict=False) if a.verdict != b.verdict)


@dataclass(frozen=True)
class WatchView:
    """The watch page of the environments asked for: each check's trend, and the environments it could not read."""

    trends: tuple[WatchTrend, ...]
    unreadable: tuple[str, ...] = ()


def watch_view(settings: Settings, envs: Sequence[str]) -> WatchView:
    """Every check ``gatefill watch`` recorded in ``envs``' ledgers, grouped by environment, set and check (read only
    from ``gatefill_watch_results``; an unreachable environment is named, not shown)."""
    trends: list[WatchTrend] = []
    unreadable: list[str] = []
    for name in envs:
        try:
            with Database(settings.env(name)) as db, db.connect() as conn:
                history = ledger.watch_history(conn, name)
        except (DatabaseUnreachable, GatefillError):
            unreadable.append(name)
            continue
        grouped: dict[tuple[str, str], list[ledger.WatchRecord]] = {}
        for record in history:
            grouped.setdefault((record.set_name, record.check_name), []).append(record)
        order = {s: i for i, s in enumerate(WATCH_PERIODS)}
        for (set_name, check), points in sorted(grouped.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
            trends.append(WatchTrend(name, set_name, check, tuple(points[-WATCH_POINTS:])))
    return WatchView(tuple(trends), tuple(unreadable))
