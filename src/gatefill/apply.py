"""Phase 1b, apply: execute an approved plan in priority order, throttled, in batches that each commit atomically with
their ledger rows, resumable after any interruption.

What makes it crash-safe: the only record of progress is the ledger, written in the same transaction as the batch's
data. A resume asks the ledger which sessions already have a result and continues with the rest, in plan order, so
work is neither repeated nor skipped, whatever batch size either attempt used. Ctrl-C or SIGTERM sets a flag that is
honoured between batches (the current batch finishes, a throttle wait ends at once); a lost database connection is
retried with backoff and then pauses the run with a message saying how to resume. A second apply (or rollback) of a
run that is active elsewhere is refused by the run's lease (``gatefill.lease``), which every batch's transaction
fences with.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gatefill import ledger, notify
from gatefill.artifacts import write_json
from gatefill.clock import Clock
from gatefill.config import DEFAULT_THROTTLE_INTERVAL, Environment, Settings
from gatefill.db import Database
from gatefill.errors import (
    DatabaseUnreachable,
    DataError,
    ExecutorUnavailable,
    GateBlocked,
    GatefillError,
    UsageError,
)
from gatefill.gate import Override, check_production_gate, record_production_gate
from gatefill.holds import Indicator, ThrottleFile, ThrottleQuery, validate_all
from gatefill.indicators import health_indicators
from gatefill.interrupt import Interruption, stop_on_signals
from gatefill.job import (
    LOCAL_EXECUTOR,
    NOT_APPLICABLE,
    BatchRecord,
    BatchTask,
    Check,
    Executor,
    Fence,
    Job,
    overall_verdict,
)
from gatefill.lease import RunLease
from gatefill.ledger import RunStatus
from gatefill.pacing import Pacer
from gatefill.plan import Plan, PlanHead, record_plan_run, store_plan_work, verify_plan
from gatefill.rollback import RollbackResult, rollback_run
from gatefill.throttle import parse_rate
from gatefill.worklist import WorkList, open_work

__all__ = [
    "ApplyOptions",
    "ApplyResult",
    "BackfillGate",
    "BatchRow",
    "BatchRunner",
    "FailedSession",
    "Invocation",
    "RunPaused",
    "TableRows",
    "apply_plan",
    "ensure_run_for_plan",
    "measure_backfill_gate",
    "run_invocations",
]


class RunPaused(GatefillError):
    """The run stopped between batches and can be resumed with ``gatefill apply RUN``."""

    def __init__(self, run_id: str, reason: str, exit_code: int = 1) -> None:
        self.run_id = run_id
        self.reason = reason
        self.exit_code = exit_code
        super().__init__(f"run {run_id} paused: {reason}; resume with `gatefill apply {run_id}`")


@dataclass(frozen=True)
class ApplyOptions:
    """How to execute a plan."""

    rate: str | None = None  # default: the plan's rate
    batch_size: int | None = None  # default: the plan's batch size
    executor: str = LOCAL_EXECUTOR  # or one of the job's own (``Job.executors``)
    max_failures: int = 0
    approve_as: str | None = None
    retry_attempts: int = 5
    retry_base_seconds: float = 0.5
    #: Hold (no batch starts) while this file exists / while this read-only query returns a true first column.
    throttle_file: Path | None = None
    throttle_query: str | None = None
    #: Seconds between looks at the health indicators, and at every indicator while a Stop holds.
    throttle_interval: float = DEFAULT_THROTTLE_INTERVAL
    #: Read the health indicators (``gatefill.indicators``); False: only the manual ones above.
    health: bool = True
    #: Each None: the environment's ``[throttle]`` setting (``config.ThrottleSettings``). A target batch time of 0
    #: keeps the batch size as given; an explicit ``batch_size`` is never resized (only halved by Holds).
    target_batch_time: float | None = None
    cool_down: float | None = None
    min_batch_size: int | None = None
    max_batch_size: int | None = None

    def indicators(self, env: Environment, job: Job, clock: Clock) -> list[Indicator]:
        """The indicators these options ask for, in the order they are read: the manual ones, then the health
        ones of ``env`` on the tables ``job`` writes."""
        found: list[Indicator] = []
        if self.throttle_file is not None:
            found.append(ThrottleFile(self.throttle_file))
        if self.throttle_query is not None:
            found.append(ThrottleQuery(self.throttle_query))
        if self.health:
            found.extend(health_indicators(env, [t.name for t in job.written_tables()], clock))
        return found

    def pacer(
        self, db: Database, run_id: str, plan: Plan | PlanHead, env: Environment, clock: Clock, **kw: Any
    ) -> Pacer:
        """The pacer of an invocation: these options over the environment's throttle settings over the plan's."""
        t = env.throttle
        target = t.target_batch_time if self.target_batch_time is None else self.target_batch_time
        return Pacer(
            db,
            run_id,
            clock,
            rate=parse_rate(self.rate or plan.parameters.rate),
            size=self.batch_size or plan.parameters.batch_size,
            interval=self.throttle_interval,
            cool_down=t.cool_down_seconds if self.cool_down is None else self.cool_down,
            target_batch_time=target or None,
            fixed_size=self.batch_size is not None,
            min_size=self.min_batch_size or t.min_batch_size,
            max_size=self.max_batch_size or t.max_batch_size,
            floor=t.hold_floor,
            recover_after=t.recover_after_looks,
            **kw,
        )

    def validate(self, job: Job) -> None:
        """``UsageError`` (exit 2) for an option that cannot be used; apply checks this before it writes anything."""
        if self.rate is not None:
            parse_rate(self.rate)
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.max_failures < 0:
            raise UsageError(f"--max-failures must be 0 or more, not {self.max_failures}")
        if self.executor not in job.executors():
            known = " or ".join(job.executors())
            raise UsageError(f"unknown executor '{self.executor}' for job {job.name} (use {known})")
        if self.approve_as is not None and not self.approve_as.strip():
            raise UsageError("--approve-as needs a name")
        if self.throttle_interval <= 0:
            raise UsageError(f"--throttle-interval must be more than 0 seconds, not {self.throttle_interval}")
        self._validate_pacing()

    def _validate_pacing(self) -> None:
        if self.target_batch_time is not None and self.target_batch_time < 0:
            raise UsageError(f"--target-batch-time must be 0 (off) or more seconds, not {self.target_batch_time}")
        if self.cool_down is not None and self.cool_down < 0:
            raise UsageError(f"--cool-down must be 0 or more seconds, not {self.cool_down}")
        for flag, value in (("--min-batch-size", self.min_batch_size), ("--max-batch-size", self.max_batch_size)):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be at least 1, not {value}")
        if (self.min_batch_size or 1) > (self.max_batch_size or self.min_batch_size or 1):
            raise UsageError(f"--min-batch-size {self.min_batch_size} is above --max-batch-size {self.max_batch_size}")


@dataclass(frozen=True)
class SessionFailure:
    """A session this apply recorded as failed, in which batch, and why."""

    session_id: str
    batch_no: int
    error: str | None


@dataclass
class ApplyResult:
    """What an apply did, as measured (the reports render this)."""

    run_id: str
    status: RunStatus
    sessions_total: int
    counts: Counter[str] = field(default_factory=Counter)
    batches_committed: int = 0
    elapsed_seconds: float = 0.0
    throttle_wait_seconds: float = 0.0
    #: Holds of this invocation (``gatefill.holds``): how many, and how long they kept batches from starting.
    holds: int = 0
    held_seconds: float = 0.0
    failures: list[SessionFailure] = field(default_factory=list)

    @property
    def measured_rate_per_minute(self) -> float:
        processed = sum(self.counts.values())
        return processed / self.elapsed_seconds * 60.0 if self.elapsed_seconds > 0 else 0.0

    def add(self, batch: BatchRecord) -> None:
        """Counts a committed batch in."""
        for s in batch.sessions:
            self.counts[s.result] += 1
            if s.result == "failed":
                self.failures.append(SessionFailure(s.key, batch.batch_no, s.error))
        self.batches_committed += 1


ProgressCallback = Callable[[int, int, float], None]  # done, total, elapsed seconds

#: Runs one batch and records it in the ledger, in transactions the fence proves this process may write in.
CommitBatch = Callable[[Database, Job, BatchTask, Clock, Fence], BatchRecord]

#: Runs the remaining batches of an apply somewhere else than this process (``gatefill.workers.Coordinator``), with
#: the same work list, pacer, lease and result; the default is ``_run_batches``, here.
BatchRunner = Callable[["_Work", WorkList, ProgressCallback | None, Callable[[int], None] | None], None]

#: Statuses of a run that has nothing left to apply.
_FINISHED = (RunStatus.SUCCEEDED, RunStatus.ROLLED_BACK, RunStatus.CANCELLED, RunStatus.FAILED)


def ensure_run_for_plan(db: Database, plan: Plan | PlanHead, *, now: datetime) -> ledger.Run:
    """The ledger run of a plan; a plan file made elsewhere (e.g. by health) is registered on first use, its work
    stored with the run as it is streamed from the file (nothing is recorded if the file turns out modified)."""
    head = plan.head() if isinstance(plan, Plan) else plan
    ledger.init_ledger(db)
    with db.begin() as conn:
        try:
            run = ledger.get_run(conn, head.run_id, with_plan=False)
        except ledger.RunNotFound:
            return record_plan_run(conn, head, now=now)
    if run.plan_hash != head.hash:
        raise GateBlocked("plan", [f"run {run.id} was planned with hash {run.plan_hash}, this plan has {head.hash}"])
    _store_legacy_work(db, run, head)
    return run


def _store_legacy_work(db: Database, run: ledger.Run, head: PlanHead) -> None:
    """A run recorded before plans were stored apart keeps its whole plan on its row: its work is stored apart (from
    the plan at hand, else from that row), and the row keeps the header only, before it is first applied from there."""
    with db.begin() as conn:
        if ledger.plan_work_recorded(conn, run.id):
            return
        stored = ledger.get_run(conn, run.id).plan  # a header (a plan with no work), or a whole plan of old
        if stored is None or "candidates" not in stored:
            if stored is None:
                raise DataError(f"run {run.id} has neither its plan's work nor a plan in the ledger")
            return
        if head.plan is None and head.path is None:
            head = Plan.from_json(stored).head()
        store_plan_work(conn, head)
        ledger.replace_run_plan(conn, run.id, head.header)


def _open_gates(
    db: Database,
    env: Environment,
    run: ledger.Run,
    plan: Plan | PlanHead,
    options: ApplyOptions,
    now: datetime,
    settings: Settings | None,
    override: Override | None,
) -> None:
    """Checks every gate before anything is recorded (a refused apply writes nothing), then records what let the
    run through: the plan approval given with --approve-as, and on production the production gate's evidence."""
    plan_approved = _plan_approved(db, run, plan.hash, options)
    gate_needed = False
    evidence = None
    if env.kind == "production":
        with db.connect() as conn:
            gate_needed = not ledger.approvals_for(conn, run.id, "soak")  # a resumed run passed it already
        if gate_needed:
            if settings is None:
                raise GateBlocked("production", ["a production apply needs the configured staging environments"])
            evidence = check_production_gate(settings, plan.versions, now=now, override=override)
    if not plan_approved:
        _record_plan_approval(db, run, plan.hash, options, now)
    if gate_needed:
        record_production_gate(db, run.id, evidence, override, now=now)


def _plan_approved(db: Database, run: ledger.Run, plan_hash: str, options: ApplyOptions) -> bool:
    """Whether this plan (by hash) is approved; refuses (exit 4) when it is not and --approve-as was not given."""
    with db.connect() as conn:
        if any(a.plan_hash == plan_hash for a in ledger.approvals_for(conn, run.id, "plan")):
            return True
    if options.approve_as:
        return False
    raise GateBlocked(
        "plan",
        [
            f"plan of run {run.id} is not approved: run `gatefill approve {run.id} --gate plan --by NAME` "
            "or pass --approve-as NAME"
        ],
    )


def _record_plan_approval(db: Database, run: ledger.Run, plan_hash: str, options: ApplyOptions, now: datetime) -> None:
    assert options.approve_as
    with db.begin() as conn:
        ledger.record_approval(
            conn,
            run_id=run.id,
            gate="plan",
            approved_by=options.approve_as,
            now=now,
            note="approved at apply time (--approve-as)",
            plan_hash=plan_hash,
        )


def _commit_batch(db: Database, job: Job, task: BatchTask, clock: Clock, fence: Fence) -> BatchRecord:
    """Processes one batch and writes its ledger rows in the same transaction, which the run's lease fences."""
    started = clock.now()
    with db.begin() as conn:
        fence(conn)
        # The job hands its changes to the ledger as it writes them (same transaction), so they are not held back
        # and written after the batch's last chunk.
        outcome = job.process_batch(
            conn,
            task.candidates,
            now=started,
            run_id=task.run_id,
            record=lambda written: ledger.record_row_changes(
                conn, task.run_id, task.batch_no, written, at=started, tables=job.written_tables()
            ),
        )
        batch = BatchRecord(
            run_id=task.run_id,
            batch_no=task.batch_no,
            group=task.group,
            categories={c.key: c.category for c in task.candidates},
            sessions=tuple(outcome.sessions),
            changes=tuple(outcome.changes),
            started_at=started,
            finished_at=clock.now(),
            retrying=task.retrying,
        )
        ledger.record_batch(conn, batch)
    return batch


def apply_plan(
    db: Database,
    env: Environment,
    job: Job,
    plan: Plan | PlanHead,
    *,
    options: ApplyOptions,
    clock: Clock,
    artifacts_dir: Path,
    progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
    before_batch: Callable[[int], None] | None = None,
    settings: Settings | None = None,
    override: Override | None = None,
    run_batches: BatchRunner | None = None,
    on_start: Callable[[str], None] | None = None,
) -> ApplyResult:
    """Applies (or resumes) the plan's run; returns the measured result and writes the batch logs.

    On a production environment the production gate must pass first (``settings`` lets it find the staging soak),
    or ``override`` must name who lets it through and why. ``on_start`` is told the run's id once it is running.
    """
    options.validate(job)
    indicators = options.indicators(env, job, clock)
    validate_all(indicators, db)  # a throttle query that cannot run stops the apply before it writes anything
    verify_plan(plan, env)
    if dict(plan.versions) != dict(job.versions):
        # What was approved is what the plan's versions write (a sql job's: its definition's hash).
        raise UsageError(
            f"the plan was made for job {plan.job} versions {dict(plan.versions)}; "
            f"job {job.name} now has {dict(job.versions)}: make a new plan"
        )
    now = clock.now()
    run = ensure_run_for_plan(db, plan, now=now)
    if run.status in _FINISHED:
        raise GateBlocked("apply", [f"run {run.id} is {run.status.value}; nothing to apply"])
    _open_gates(db, env, run, plan, options, now, settings, override)
    logs_dir = artifacts_dir / run.id / "backfill_logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as resources:
        executor = resources.enter_context(job.open_executor(options.executor, env))
        commit: CommitBatch = executor.commit_batch if executor is not None else _commit_batch
        stop = stop or threading.Event()
        lease = resources.enter_context(RunLease(db, run.id, "apply"))
        interruption = resources.enter_context(stop_on_signals(stop))
        if executor is not None:
            _recover_executor_batches(executor, db, job, run, clock, lease)
        todo = open_work(db, run, plan)
        resources.callback(todo.close)
        result = ApplyResult(run.id, run.status, todo.total)
        with db.begin() as conn:
            lease.fence(conn)
            reason = _start_reason(todo.remaining, lease)
            ledger.transition(conn, run.id, RunStatus.RUNNING, now=clock.now(), reason=reason)
        if on_start is not None:
            on_start(run.id)
        pacer = options.pacer(db, run.id, plan, env, clock, stop=stop, fence=lease.fence, indicators=indicators)
        work = _Work(db, job, clock, options, commit, lease, stop, interruption, logs_dir, result, pacer)
        runner = run_batches or _local_batches  # run_batches: --workers, batches committed by worker processes
        _announced(env, work, lambda: runner(work, todo, progress, before_batch))
    return result


def _local_batches(
    work: _Work, todo: WorkList, progress: ProgressCallback | None, before_batch: Callable[[int], None] | None
) -> None:
    _run_batches(work, todo, progress=progress, before_batch=before_batch)


def _announced(env: Environment, work: _Work, run_batches: Callable[[], None]) -> None:
    """Runs the batches and ends the run, telling people (``gatefill.notify``) when it paused or sessions failed."""
    try:
        run_batches()
    except RunPaused as exc:
        notify.send(notify.run_paused(env.name, work.run_id, exc.reason))
        raise
    _finish(work)
    if work.result.status is RunStatus.COMPLETED_WITH_ERRORS:
        failed = len(work.result.failures)
        notify.send(notify.run_failed(env.name, work.run_id, f"{failed} session(s) failed in this apply"))


@dataclass(frozen=True)
class _Work:
    """What one apply invocation works with: where and how it commits batches, how it is paced, and the result it
    fills in."""

    db: Database
    job: Job
    clock: Clock
    options: ApplyOptions
    commit: CommitBatch
    lease: RunLease
    stop: threading.Event
    interruption: Interruption
    logs_dir: Path
    result: ApplyResult
    pacer: Pacer

    @property
    def run_id(self) -> str:
        return self.result.run_id


def _run_batches(
    work: _Work,
    todo: WorkList,
    *,
    progress: ProgressCallback | None,
    before_batch: Callable[[int], None] | None,
) -> None:
    """Commits the remaining work batch by batch, each when the pacer lets it start, and writes each batch's log."""
    clock, result, pacer = work.clock, work.result, work.pacer
    start = clock.monotonic()
    done = todo.done_before
    try:
        while (task := todo.take(pacer.batch_size())) is not None:
            if before_batch is not None:
                before_batch(task.batch_no)
            # A stop (Ctrl-C, SIGTERM) ends a hold or the throttle wait at once; no batch starts after it.
            pacer.hold_while_held(task.batch_no)
            if not work.stop.is_set():
                pacer.wait_for_tokens(len(task.candidates))
            if work.stop.is_set():
                why = f"interrupted ({work.interruption.description}) before batch {task.batch_no}"
                _pause(work.db, work.run_id, clock, f"{why}; every earlier batch is committed", work.lease.fence)
                raise RunPaused(work.run_id, why, exit_code=work.interruption.exit_code)
            work.lease.check()
            batch = _commit_with_retry(work, task)
            pacer.after_batch(batch)
            write_json(work.logs_dir / f"batch_{task.batch_no}.json", batch.log())
            result.add(batch)
            done += len(task.candidates)
            if progress is not None:
                progress(done, result.sessions_total, clock.monotonic() - start)
    finally:
        result.elapsed_seconds = clock.monotonic() - start
        result.throttle_wait_seconds = pacer.throttle_wait_seconds
        result.holds, result.held_seconds = pacer.holds, pacer.held_seconds


def _finish(work: _Work) -> None:
    """Ends the run: succeeded, or completed with errors when any session of the run failed."""
    with work.db.connect() as conn:
        all_results = ledger.result_counts(conn, work.run_id)
    final = RunStatus.COMPLETED_WITH_ERRORS if all_results["failed"] else RunStatus.SUCCEEDED
    summary = {
        "results": dict(all_results),
        "elapsed_seconds": work.result.elapsed_seconds,
        "measured_rate_per_minute": work.result.measured_rate_per_minute,
        "rate": work.pacer.rate.text,
        "batch_size": work.pacer.size,
        "max_failures": work.options.max_failures,
    }
    with work.db.begin() as conn:
        work.lease.fence(conn)
        ledger.transition(conn, work.run_id, final, now=work.clock.now(), summary=summary)
    work.result.status = final


def _start_reason(todo: int, lease: RunLease) -> str:
    if lease.replaced is None:
        return f"apply ({todo} to do)"
    return f"apply ({todo} to do); took over the expired lease of {lease.replaced.describe()}"


def _commit_with_retry(work: _Work, task: BatchTask) -> BatchRecord:
    """A lost connection rolls the batch back in the database; retry it with exponential backoff and jitter."""
    attempt = 0
    while True:
        try:
            return work.commit(work.db, work.job, task, work.clock, work.lease.fence)
        except DatabaseUnreachable as exc:
            attempt += 1
            if attempt >= work.options.retry_attempts:
                # If it is still down, the run stays 'running' and the next apply takes it over.
                with contextlib.suppress(DatabaseUnreachable):
                    _pause(work.db, work.run_id, work.clock, f"database unreachable: {exc.reason}", work.lease.fence)
                raise RunPaused(
                    work.run_id, f"database unreachable before batch {task.batch_no} committed ({exc.reason})"
                ) from exc
            delay = work.options.retry_base_seconds * (2 ** (attempt - 1)) * (0.5 + random.random())
            time.sleep(delay)  # a real wait even under a simulated clock: the database needs real time to return
        except ExecutorUnavailable as exc:
            # The executor already retried its HTTP calls; its intents stay, so a resume finishes this batch.
            with contextlib.suppress(DatabaseUnreachable):
                reason = f"functions server unreachable: {exc.reason}"
                _pause(work.db, work.run_id, work.clock, reason, work.lease.fence)
            raise RunPaused(
                work.run_id, f"functions server unreachable in batch {task.batch_no} ({exc.reason})"
            ) from exc


def _recover_executor_batches(
    executor: Executor, db: Database, job: Job, run: ledger.Run, clock: Clock, lease: RunLease
) -> None:
    """Finishes batches a crash left between their HTTP calls and their commit, before working out what is left."""
    try:
        executor.recover(db, job, run.id, clock=clock, fence=lease.fence)
    except ExecutorUnavailable as exc:
        if run.status is RunStatus.RUNNING:
            with contextlib.suppress(DatabaseUnreachable):
                _pause(db, run.id, clock, f"functions server unreachable: {exc.reason}", lease.fence)
        raise RunPaused(
            run.id, f"functions server unreachable while finishing an interrupted batch ({exc.reason})"
        ) from exc


def _pause(db: Database, run_id: str, clock: Clock, reason: str, fence: Fence) -> None:
    """Pauses the run, only while this process still holds its lease (``LeaseLost`` otherwise: the run is another's)."""
    with db.begin() as conn:
        fence(conn)
        ledger.transition(conn, run_id, RunStatus.PAUSED, now=clock.now(), reason=reason)


# ------------------------------------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Invocation:
    """One invocation of an apply run, from the ledger's run events: from its move to ``running`` to its pause or
    end (a crashed one, taken over by the next, ends at its last committed batch), with the batches it committed."""

    number: int
    started_at: datetime
    ended_at: datetime
    ended_as: str
    batches: int
    sessions: int

    @property
    def seconds(self) -> float:
        return max(0.0, (self.ended_at - self.started_at).total_seconds())

    def to_json(self) -> dict[str, Any]:
        return {
            "invocation": self.number,
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat(),
            "ended_as": self.ended_as,
            "seconds": round(self.seconds, 3),
            "batches": self.batches,
            "sessions": self.sessions,
        }


def run_invocations(events: Sequence[ledger.RunEvent], batch_rows: Sequence[Any]) -> list[Invocation]:
    """The run's invocations, each with the batches that started during it (``batch_rows``: gatefill_batches)."""
    spans: list[tuple[datetime, datetime | None, str]] = []
    for e in events:
        if e.to_status is RunStatus.RUNNING:
            if spans and spans[-1][1] is None:
                spans[-1] = (spans[-1][0], None, "stopped without pausing (crash); taken over")
            spans.append((e.at, None, "still running"))
        elif spans and spans[-1][1] is None and e.from_status is RunStatus.RUNNING:
            spans[-1] = (spans[-1][0], e.at, e.to_status.value)
    found = []
    for i, (start, end, how) in enumerate(spans):
        upto = spans[i + 1][0] if i + 1 < len(spans) else None
        mine = [b for b in batch_rows if b.started_at >= start and (upto is None or b.started_at < upto)]
        last = max((b.finished_at for b in mine), default=start)
        found.append(Invocation(i + 1, start, end or last, how, len(mine), sum(int(b.sessions) for b in mine)))
    return found


@dataclass(frozen=True)
class FailedSession:
    """A session the run recorded as failed, with the batch it was in and its error."""

    session_id: str
    batch_no: int
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "batch_no": self.batch_no, "error": self.error}


@dataclass(frozen=True)
class BatchRow:
    """A committed batch as the ledger's batch row tells it (``gatefill_batches``), for the backfill summary."""

    batch_no: int
    sessions: int
    written: int
    already_present: int
    failed: int
    started_at: datetime
    finished_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_no": self.batch_no,
            "sessions": self.sessions,
            "written": self.written,
            "already_present": self.already_present,
            "failed": self.failed,
            "started_at": self.started_at.isoformat(),
            "completed_at": self.finished_at.isoformat(),
        }


@dataclass(frozen=True)
class TableRows:
    """Per written table: the rows the plan expected, the changes the run recorded, and those present as written."""

    table: str
    expected_insert: int
    expected_update: int
    recorded: int
    present: int


@dataclass(frozen=True)
class BackfillGate:
    """The apply gate of a run, measured from the ledger and the database: its verdict and checks, the whole run's
    runtime and rate, and what ``gatefill.reports.apply`` lays out; ``paths`` once those files are written."""

    run: ledger.Run
    env: Environment
    measured_at: datetime
    verdict: str
    checks: list[Check]
    #: Each planned (runnable) session's result, counted; and the number of planned sessions.
    results: Mapping[str, int]
    planned: int
    by_category: Mapping[str, Mapping[str, int]]
    failures: list[FailedSession]
    batches: list[BatchRow]
    invocations: list[Invocation]
    tables: list[TableRows]
    approvals: list[ledger.Approval]
    #: The rollback's dry run (the ``rollback_dry_run`` check).
    dry_run: RollbackResult
    #: Running time (every invocation) and the sessions processed in it.
    runtime_seconds: float
    processed: int
    #: Throttle waits of the invocation that just ran, when the gate is measured right after it.
    throttle_wait_seconds: float | None = None
    #: Every hold of the run (every invocation), from the ledger.
    holds: list[ledger.Hold] = field(default_factory=list)
    #: Every pacing decision of the run (every invocation), from the ledger.
    decisions: list[ledger.PaceDecision] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def held_seconds(self) -> float:
        """Time the run's holds kept batches from starting (a hold still open, or cut by a crash, counts 0)."""
        return sum(h.seconds or 0.0 for h in self.holds)

    @property
    def rate_per_minute(self) -> float | None:
        """The measured rate over every invocation; None without running time."""
        return self.processed / self.runtime_seconds * 60.0 if self.runtime_seconds > 0 else None

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "PASS" else 1


def measure_backfill_gate(
    db: Database,
    env: Environment,
    job: Job,
    run_id: str,
    *,
    clock: Clock,
    artifacts_dir: Path,
    max_failures: int = 0,
    result: ApplyResult | None = None,
) -> BackfillGate:
    """The apply gate of ``run_id``, every number read from the ledger and the database now; the rollback is verified
    by a dry run (``artifacts_dir``: where the run's reports are, which a refused dry run names)."""
    measured_at = clock.now()
    with db.connect() as conn:
        run = ledger.get_run(conn, run_id)
        results = ledger.result_counts(conn, run_id)
        planned = _planned(conn, run)
        failures = [
            FailedSession(r.session_id, r.batch_no, r.error)
            for r in conn.execute(sa.select(ledger.session_results).where(ledger.session_results.c.run_id == run_id))
            if r.result == "failed"
        ]
        batch_rows = conn.execute(
            sa.select(ledger.batches).where(ledger.batches.c.run_id == run_id).order_by(ledger.batches.c.batch_no)
        ).all()
        job_checks = job.post_checks(conn, run_id)
        approvals = ledger.approvals_for(conn, run_id)
        invocations = run_invocations(ledger.run_events_for(conn, run_id), batch_rows)
        holds = ledger.holds_for(conn, run_id)
        decisions = ledger.decisions_for(conn, run_id)
    plan = run.plan or {}
    # The dry run compares every row the run recorded with the database now (conflict = changed or deleted since).
    dry = rollback_run(db, run_id, job.written_tables(), now=measured_at, dry_run=True, artifacts_dir=artifacts_dir)
    tables = _table_rows(job, plan.get("expected_changes", {}), dry)
    checks = _gate_checks(run, planned, results, failures, max_failures, tables, job_checks, dry)
    return BackfillGate(
        run=run,
        env=env,
        measured_at=measured_at,
        verdict=overall_verdict(c.verdict for c in checks if c.gating),
        checks=checks,
        results=dict(results),
        planned=planned.count,
        by_category=planned.by_category,
        failures=failures,
        batches=[BatchRow(*_batch_fields(b)) for b in batch_rows],
        invocations=invocations,
        tables=tables,
        approvals=approvals,
        dry_run=dry,
        # Runtime and rate over every invocation (a resumed run has several), from the ledger's run events.
        runtime_seconds=sum(i.seconds for i in invocations),
        processed=sum(i.sessions for i in invocations),
        throttle_wait_seconds=float(result.throttle_wait_seconds) if result else None,
        holds=holds,
        decisions=decisions,
    )


def _batch_fields(b: Any) -> tuple[int, int, int, int, int, datetime, datetime]:
    return (b.batch_no, b.sessions, b.succeeded, b.skipped, b.failed, b.started_at, b.finished_at)


@dataclass(frozen=True)
class _Planned:
    """The plan's runnable candidates as the gate counts them: how many, per category with their results, and the
    first ones without a result."""

    count: int
    by_category: dict[str, dict[str, int]]
    missing: list[str]


def _planned(conn: sa.Connection, run: ledger.Run) -> _Planned:
    """Counted by the database from the plan's work stored with the run (a run recorded before that was stored
    apart, and never applied since: from the whole plan on its row)."""
    if ledger.plan_work_recorded(conn, run.id) or not (run.plan or {}).get("candidates"):
        by_category = ledger.planned_by_category(conn, run.id)
        missing = ledger.planned_without_result(conn, run.id, limit=20)
    else:
        results = ledger.session_results_for(conn, run.id)
        by_category = {}
        keys = [c["key"] for c in (run.plan or {})["candidates"] if c.get("operations")]
        for cand in (c for c in (run.plan or {})["candidates"] if c.get("operations")):
            row = by_category.setdefault(cand["category"], {"planned": 0})
            row["planned"] += 1
            if cand["key"] in results:
                row[results[cand["key"]]] = row.get(results[cand["key"]], 0) + 1
        missing = [k for k in keys if k not in results][:20]
    count = sum(row["planned"] for row in by_category.values())
    shaped = {k: {"written": 0, "already_present": 0, "failed": 0, **v} for k, v in by_category.items()}
    return _Planned(count, shaped, missing)


def _table_rows(job: Job, expected: Mapping[str, Any], dry: RollbackResult) -> list[TableRows]:
    recorded = {t.table: t.inserted_by_run + t.updated_by_run for t in dry.tables}
    conflicted = Counter(c.table for c in dry.conflicts)
    return [
        TableRows(
            table=t.name,
            expected_insert=expected.get(t.name, {}).get("insert", 0),
            expected_update=expected.get(t.name, {}).get("update", 0),
            recorded=recorded.get(t.name, 0),
            present=recorded.get(t.name, 0) - conflicted[t.name],
        )
        for t in job.written_tables()
    ]


def _gate_checks(
    run: ledger.Run,
    planned: _Planned,
    results: Mapping[str, int],
    failures: Sequence[FailedSession],
    max_failures: int,
    tables: Sequence[TableRows],
    job_checks: Sequence[Check],
    dry: RollbackResult,
) -> list[Check]:
    with_result = sum(results.values())
    finished = run.status in (RunStatus.SUCCEEDED, RunStatus.COMPLETED_WITH_ERRORS)
    checks = [
        Check(
            "all_candidates_processed",
            "PASS" if not planned.missing and finished else "FAIL",
            f"{with_result} of {planned.count} planned sessions have a recorded result; run {run.status.value}",
            {"planned": planned.count, "with_result": with_result, "missing": planned.missing},
            "SELECT session_id, result FROM gatefill_session_results WHERE run_id = :run",
        ),
        Check(
            "write_errors",
            "PASS" if len(failures) <= max_failures else "FAIL",
            f"{len(failures)} failed sessions (tolerated: {max_failures})",
            {
                "failed": len(failures),
                "max_failures": max_failures,
                "sessions": [f.session_id for f in failures][:20],
            },
            "SELECT count(*) FROM gatefill_session_results WHERE run_id = :run AND result = 'failed'",
        ),
        Check(
            "rows_present_as_written",
            "PASS" if all(t.recorded == t.present for t in tables) else "FAIL",
            "; ".join(f"{t.table}: {t.present}/{t.recorded}" for t in tables),
            {t.table: {"recorded": t.recorded, "present": t.present} for t in tables},
            "each row in the run's change sets (gatefill_change_sets) read back by primary key and compared with "
            "the digest of what the run wrote (rollback plan)",
        ),
    ]
    checks.extend(job_checks)
    checks.append(_rollback_check(dry))
    return checks


def _rollback_check(dry: RollbackResult) -> Check:
    """The dry run of the rollback as a gate check; N/A when the run recorded nothing to roll back."""
    if dry.changes == 0:
        return Check(
            "rollback_dry_run",
            NOT_APPLICABLE,
            "the run recorded no changes: there is nothing to roll back, so nothing to verify",
            {"changes": 0},
            "SELECT sum(rows) FROM gatefill_change_sets WHERE run_id = :run",
        )
    failed_verifications = [c.name for c in dry.verification if c.verdict != "PASS"]
    return Check(
        "rollback_dry_run",
        "PASS" if dry.verified else "FAIL",
        f"{dry.changes} recorded changes undone inside a transaction and verified "
        f"({len(dry.verification) - len(failed_verifications)}/{len(dry.verification)} verification queries "
        f"passed, {len(dry.conflicts)} conflicts), then rolled back",
        {
            "tables": [t.to_json() for t in dry.tables],
            "failed_verifications": failed_verifications,
            "conflicts": [c.describe() for c in dry.conflicts][:20],
        },
        "rollback executed inside a transaction, verified, then rolled back",
    )
