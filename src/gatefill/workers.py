"""Workers on procrastinate: ``gatefill apply RUN --workers N`` coordinates an apply whose batches are committed by
worker processes, here (N of them) and on any machine that runs ``gatefill worker --env NAME`` against the same
database.

The coordinator is the apply process. It holds the run's lease, draws batches from the work list at the size the
pacer asks for, lets the pacer hold them, and queues only a few ahead (``AHEAD_PER_WORKER`` per live worker, local or
joined from elsewhere), so a hold, a stop or a new batch size takes effect within a batch or two. It publishes the
run's rate in the ledger (``gatefill_pace``); each worker reserves its batch's tokens there with one atomic UPDATE,
so the rate is global.

A worker commits a batch exactly as the in-process apply does (``apply._commit_batch``: data and ledger rows in one
transaction), fenced three ways in that transaction: the procrastinate job must still be this worker's (its row is
locked, so a retry elsewhere waits for this commit or rollback), the run's lease must still be held by the
coordinator that queued the job, and the coordinator must not have published a stop. A batch that already committed
(its worker died after the commit) is done. A worker killed mid-batch loses its transaction; its heartbeat stops, and
the coordinator puts its job back in the queue for another worker (procrastinate's stalled-job query). The ledger's
primary keys on (run, batch) and (run, session) are the last guard against a session written twice.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import procrastinate
from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.apply import ProgressCallback, RunPaused, _commit_batch, _pause, _Work
from gatefill.artifacts import write_json
from gatefill.clock import Clock, RealClock
from gatefill.db import Database
from gatefill.errors import DatabaseError, GatefillError, UsageError
from gatefill.job import BatchTask, Fence, Job
from gatefill.lease import lease_name
from gatefill.queue import (
    QUEUE,
    STALLED_SECONDS,
    TASK_NAME,
    BatchArgs,
    claim_job,
    ensure_queue_schema,
    job_statuses,
    live_workers,
    open_queue,
    queue_errors,
    retry_now,
    run_jobs,
    stalled_jobs,
)
from gatefill.worklist import WorkList

__all__ = ["AHEAD_PER_WORKER", "Coordinator", "JobFinder", "check_workers", "run_batch", "serve"]

#: Batches queued ahead of the workers, per worker.
AHEAD_PER_WORKER = 2
#: How often the coordinator looks at its queued batches (real seconds), and at stalled workers.
_POLL_SECONDS = 0.05
_STALLED_CHECK_SECONDS = 1.0
#: How often a worker looks again while the apply's pacer holds its batches (a Stop indicator).
_HOLD_LOOK_SECONDS = 0.5

#: The job a run was planned with, by name (``gatefill.jobs`` through ``commands``: a worker reads gatefill.toml).
JobFinder = Callable[[str], Job]

COMMITTED, ALREADY_COMMITTED, STOPPED = "committed", "already committed", "stopped"


def check_workers(db: Database, workers: int | None, executor: str) -> None:
    """``UsageError`` (exit 2) when ``--workers`` cannot be used here; called before anything is written."""
    if workers is None:
        return
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, not {workers}")
    if db.caps.dialect != "postgresql" and workers > 1:
        raise UsageError(
            f"--workers {workers}: SQLite is single-process (one writer); apply without --workers, "
            "or on Postgres to use several workers"
        )
    if executor != "local" and db.caps.dialect == "postgresql":
        raise UsageError(f"--workers runs the local executor only, not '{executor}'")


# ---------------------------------------------------------------------------------------------------- the worker


class _AlreadyCommitted(Exception):
    """The batch committed before (its first worker died after the commit): nothing to do."""


class _Stopped(Exception):
    """The coordinator published a stop: this batch does not start."""


def run_batch(db: Database, job: Job, args: BatchArgs, clock: Clock, *, claim: Fence | None = None) -> str:
    """Commits one queued batch in this worker: ``committed``, ``already committed`` or ``stopped``.

    ``claim`` proves, in the batch's transaction, that the queue still gives this worker the job."""
    task = args.task
    with db.connect() as conn:
        if _committed_as(conn, task):
            return ALREADY_COMMITTED
    while True:  # a Stop of the apply's pacer: wait (no tokens taken) until it is lifted
        with db.begin() as conn:
            grant = ledger.reserve_pace(conn, task.run_id, len(task.candidates), now=clock.now())
        if grant.level != "hold":
            break
        clock.sleep(_HOLD_LOOK_SECONDS)
    if grant.level == "stop":
        return STOPPED
    while (wait := (grant.ready_at - clock.now()).total_seconds()) > 0:
        clock.sleep(wait)
    try:
        _commit_batch(db, job, task, clock, _fence(args, claim))
    except _AlreadyCommitted:
        return ALREADY_COMMITTED
    except _Stopped:
        return STOPPED
    except DatabaseError:
        # A unique violation on the ledger's keys: another worker committed it meanwhile (or it is a stale job).
        with db.connect() as conn:
            if _committed_as(conn, task):
                return ALREADY_COMMITTED
        raise
    return COMMITTED


def _committed_as(conn: Connection, task: BatchTask) -> bool:
    """Whether the batch committed, with exactly these candidates (another set under its number: a stale job)."""
    keys = ledger.batch_keys(conn, task.run_id, task.batch_no)
    if keys is None:
        return False
    if keys != {c.key for c in task.candidates}:
        raise GatefillError(
            f"batch {task.batch_no} of run {task.run_id} committed other sessions: this job was queued by an "
            "earlier apply of the run and is dropped"
        )
    return True


def _fence(args: BatchArgs, claim: Fence | None) -> Fence:
    """The batch transaction's first statements: the job is still ours, the batch has not committed, the apply that
    queued it still holds the run, and it has not stopped."""
    task = args.task

    def fence(conn: Connection) -> None:
        # pg_stat_activity then names the worker and its batch (SET LOCAL: also behind a transaction pooler).
        conn.exec_driver_sql(f"SET LOCAL application_name = 'gatefill worker {os.getpid()} batch {task.batch_no}'")
        if claim is not None:
            claim(conn)
        if _committed_as(conn, task):
            raise _AlreadyCommitted
        lease = ledger.get_lease(conn, lease_name(task.run_id))
        if lease is None or lease.holder.id != args.coordinator or lease.expired:
            holder = lease.describe() if lease is not None else "nobody"
            raise ledger.LeaseLost(lease_name(task.run_id), f"{holder}, not the apply that queued this batch")
        if ledger.pace_level(conn, task.run_id) == "stop":
            raise _Stopped

    return fence


@dataclass
class _Jobs:
    """The jobs a worker has met, by run: the run's job, checked against the versions the run was planned with."""

    db: Database
    find_job: JobFinder
    by_run: dict[str, Job] = field(default_factory=dict)

    def for_run(self, run_id: str) -> Job:
        if run_id not in self.by_run:
            with self.db.connect() as conn:
                run = ledger.get_run(conn, run_id, with_plan=False)
            job = self.find_job(run.job)
            if dict(job.versions) != dict(run.versions):
                raise UsageError(
                    f"run {run_id} was planned with job {run.job} versions {dict(run.versions)}; this worker's "
                    f"definition has {dict(job.versions)}"
                )
            self.by_run[run_id] = job
        return self.by_run[run_id]


#: Told when a worker starts a batch ("started") and how it ended (``run_batch``'s outcome).
BatchDone = Callable[[BatchTask, str], None]


def serve(
    db: Database,
    find_job: JobFinder,
    *,
    on_batch: BatchDone | None = None,
    until_pid: int | None = None,
    clock: Clock | None = None,
) -> None:
    """Runs one worker until SIGINT or SIGTERM (its current batch finishes first), serving the batches of every
    gatefill run queued in the database. ``until_pid``: also stop when that process (the apply that started this
    worker) is gone."""
    if db.caps.dialect != "postgresql":
        raise UsageError("gatefill worker needs a Postgres environment (SQLite is single-process)")
    # No ledger DDL here (init_ledger takes exclusive locks that applies in progress would deadlock with): the ledger
    # exists once an apply has queued a batch.
    ensure_queue_schema(db)
    app = open_queue(db.env)
    jobs, worker_clock = _Jobs(db, find_job), clock or RealClock()

    @app.task(name=TASK_NAME, queue=QUEUE, pass_context=True)
    def batch(context: procrastinate.JobContext, /, **kwargs: Any) -> str:
        args = BatchArgs.from_kwargs(kwargs)
        job_id, worker_id = context.job.id, context.job.worker_id
        assert job_id is not None

        def claim(conn: Connection) -> None:
            claim_job(conn, job_id, worker_id)

        if on_batch is not None:
            on_batch(args.task, "started")
        outcome = run_batch(db, jobs.for_run(args.task.run_id), args, worker_clock, claim=claim)
        if on_batch is not None:
            on_batch(args.task, outcome)
        return outcome

    with _watch_parent(until_pid), queue_errors(db):
        app.run_worker(name=f"gatefill-{os.getpid()}", install_signal_handlers=True)


@contextlib.contextmanager
def _watch_parent(pid: int | None) -> Iterator[None]:
    """Sends this process SIGTERM (a graceful stop) once ``pid`` has gone: a local worker does not outlive its apply."""
    done = threading.Event()

    def watch() -> None:
        # Orphaned, a process is handed to another parent: its parent id changes.
        while not done.wait(1.0):
            if os.getppid() != pid:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="parent watch", daemon=True)
    if pid is not None:
        thread.start()
    try:
        yield
    finally:
        done.set()


# ----------------------------------------------------------------------------------------------- the coordinator


@dataclass(frozen=True)
class Coordinator:
    """Runs an apply's batches on workers (``apply_plan(..., run_batches=Coordinator(...))``): starts ``local`` worker
    processes with ``worker_argv`` (``gatefill worker --env NAME``), queues the batches, collects what the workers
    committed from the ledger, and stops them when the apply ends."""

    local: int
    worker_argv: Sequence[str]

    def __call__(
        self, work: _Work, todo: WorkList, progress: ProgressCallback | None, before_batch: Callable[[int], None] | None
    ) -> None:
        ensure_queue_schema(work.db)
        app = open_queue(work.db.env)
        with queue_errors(work.db):
            app.open()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs = [_start_worker(self.worker_argv) for _ in range(self.local)]
            with queue_errors(work.db):
                _Coordination(work, todo, app, self.local * AHEAD_PER_WORKER, progress, before_batch, procs).run()
        finally:
            _stop_workers(procs)
            app.close()


def _start_worker(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """One local worker; its output goes to this process's stderr (its errors), its batch lines nowhere."""
    return subprocess.Popen(
        [*argv, "--until-pid", str(os.getpid())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )


def _stop_workers(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (each finishes its batch; none is running by now), then waits; kills one that does not stop."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class _Coordination:
    """One apply invocation's queue: the batches queued and not yet seen done, by procrastinate job id."""

    work: _Work
    todo: WorkList
    app: procrastinate.App
    ahead: int
    progress: ProgressCallback | None
    before_batch: Callable[[int], None] | None
    local: Sequence[subprocess.Popen[bytes]] = ()
    queued: dict[int, BatchTask] = field(default_factory=dict)
    exhausted: bool = False
    done: int = 0
    _rate: float | None = None
    _stall_check: float = 0.0

    def run(self) -> None:
        work, clock = self.work, self.work.clock
        start, self.done = clock.monotonic(), self.todo.done_before
        try:
            self._publish("normal", "apply started", restart=True)
            # A Stop of the pacer holds the batches already queued too (workers wait while the level is hold).
            work.pacer.on_stop = lambda held, why: self._publish("hold" if held else "normal", why)
            self._drop_stale_jobs()
            while True:
                self._fill()
                if work.stop.is_set():
                    self._stop(f"interrupted ({work.interruption.description})", work.interruption.exit_code)
                if not self.queued:
                    return
                self._collect(start)
                self._retry_stalled()
                if self.local and all(p.poll() is not None for p in self.local):
                    codes = ", ".join(str(p.returncode) for p in self.local)
                    self._stop(f"every local worker exited (exit codes {codes}; their errors are above)", 1)
                work.stop.wait(_POLL_SECONDS)
        finally:
            result = work.result
            result.elapsed_seconds = clock.monotonic() - start
            result.holds, result.held_seconds = work.pacer.holds, work.pacer.held_seconds

    def _fill(self) -> None:
        """Queues batches until ``ahead`` are queued, each once the pacer lets it start."""
        work = self.work
        while not self.exhausted and len(self.queued) < self.ahead and not work.stop.is_set():
            task = self.todo.take(work.pacer.batch_size())
            if task is None:
                self.exhausted = True
                return
            if self.before_batch is not None:
                self.before_batch(task.batch_no)
            work.pacer.hold_while_held(task.batch_no)
            if work.stop.is_set():
                return  # never queued: a resume takes it from the ledger's results
            work.lease.check()
            if work.pacer.current_rate().per_second != self._rate:
                self._publish("normal", "rate changed")
            args = BatchArgs(task, work.lease.holder.id)
            job_id = self.app.configure_task(TASK_NAME, queue=QUEUE).defer(**args.to_kwargs())
            self.queued[job_id] = task

    def _collect(self, start: float) -> None:
        """Counts in every queued batch whose job ended; a job that failed pauses the run."""
        statuses = job_statuses(self.work.db, list(self.queued))
        for job_id, task in list(self.queued.items()):
            status = statuses.get(job_id, "succeeded")  # succeeded jobs are deleted
            if status in ("todo", "doing"):
                continue
            del self.queued[job_id]
            if status != "succeeded" or not self._count_in(task, start):
                self._fail(task, f"batch {task.batch_no} ended {status} on a worker without committing")

    def _count_in(self, task: BatchTask, start: float) -> bool:
        """Reads a committed batch back from the ledger into the result, the pacer, its log and the progress."""
        work = self.work
        with work.db.connect() as conn:
            batch = ledger.batch_record(conn, task.run_id, task)
        if batch is None:
            return False
        work.pacer.after_batch(batch)
        write_json(work.logs_dir / f"batch_{task.batch_no}.json", batch.log())
        work.result.add(batch)
        self.done += len(task.candidates)
        if self.progress is not None:
            self.progress(self.done, work.result.sessions_total, work.clock.monotonic() - start)
        return True

    def _retry_stalled(self) -> None:
        """Puts back in the queue the jobs of workers whose heartbeat stopped (killed mid-batch); counts the live
        workers, to queue enough batches for all of them."""
        now = time.monotonic()
        if now - self._stall_check < _STALLED_CHECK_SECONDS:
            return
        self._stall_check = now
        # Workers that joined from elsewhere get batches too: about AHEAD_PER_WORKER queued for each live worker.
        self.ahead = AHEAD_PER_WORKER * max(len(self.local), live_workers(self.work.db))
        for job in stalled_jobs(self.app):
            if job.id in self.queued:
                retry_now(self.app, job.id)

    def _drop_stale_jobs(self) -> None:
        """Cancels the queued jobs an earlier apply of this run left (a crash): their batch numbers are reused, and
        the fence would refuse them anyway (they name the earlier apply)."""
        for job_id, status in run_jobs(self.work.db, self.work.run_id).items():
            if status == "todo":
                self.app.job_manager.cancel_job_by_id(job_id, delete_job=True)

    def _publish(self, level: str, reason: str, *, restart: bool = False) -> None:
        work = self.work
        self._rate = work.pacer.current_rate().per_second
        with work.db.begin() as conn:
            work.lease.fence(conn)
            ledger.publish_pace(
                conn,
                work.run_id,
                rate_per_second=self._rate,
                level=level,
                reason=reason,
                at=work.clock.now(),
                restart=restart,
            )

    def _drain(self, start: float) -> None:
        """Cancels the batches no worker has started and waits for the running ones (counting in those that
        committed); a worker that stalls meanwhile is not waited for beyond the stall timeout."""
        for job_id in list(self.queued):
            if self.app.job_manager.cancel_job_by_id(job_id, delete_job=True):
                del self.queued[job_id]
        deadline = time.monotonic() + STALLED_SECONDS * 2
        while self.queued and time.monotonic() < deadline:
            statuses = job_statuses(self.work.db, list(self.queued))
            for job_id, task in list(self.queued.items()):
                if statuses.get(job_id, "succeeded") not in ("todo", "doing"):
                    del self.queued[job_id]
                    self._count_in(task, start)
            time.sleep(_POLL_SECONDS)

    def _stop(self, why: str, exit_code: int) -> None:
        """Stops the workers' batches (no new one starts), lets running ones finish, and pauses the run."""
        work = self.work
        self._publish("stop", why)
        self._drain(work.clock.monotonic())
        reason = f"{why}; every batch a worker had started is committed"
        _pause(work.db, work.run_id, work.clock, reason, work.lease.fence)
        raise RunPaused(work.run_id, why, exit_code=exit_code)

    def _fail(self, task: BatchTask, why: str) -> None:
        self._stop(why + " (its worker's output says why)", 1)
