"""The batch queue of ``apply --workers``: procrastinate (Postgres as the queue) set up for one environment, its
schema applied by gatefill, and a batch as a procrastinate job's arguments.

Where its tables live: beside the ledger, in the same database and the same schema (the database's default one,
where the ``gatefill_*`` tables are), under procrastinate's own ``procrastinate_`` prefix. A schema of their own would
need ``search_path`` set on every connection, and a transaction-mode pooler (PgBouncer, Supavisor on port 6543) keeps
no session setting and passes no ``options`` startup parameter, so a worker behind one would look for the queue in
another schema than a worker connected directly. One layout everywhere is worth more than the separate schema.

Behind a transaction pooler procrastinate's connections prepare no statement (``prepare_threshold=None``) and its
workers poll for jobs instead of listening (LISTEN needs a session of its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import procrastinate
import psycopg_pool
import sqlalchemy as sa
from procrastinate import exceptions as procrastinate_exceptions
from procrastinate import jobs as procrastinate_jobs
from procrastinate import sql as procrastinate_sql
from procrastinate.app import WorkerOptions
from procrastinate.schema import SchemaManager
from sqlalchemy.engine import Connection

from gatefill.config import Environment
from gatefill.db import Database
from gatefill.errors import GatefillError
from gatefill.job import BatchTask
from gatefill.plan import candidate_from_json, candidate_to_json

__all__ = [
    "QUEUE",
    "STALLED_SECONDS",
    "TASK_NAME",
    "BatchArgs",
    "ClaimLost",
    "claim_job",
    "ensure_queue_schema",
    "job_statuses",
    "live_workers",
    "open_queue",
    "queue_errors",
    "retry_now",
    "run_jobs",
    "stalled_jobs",
]

#: The procrastinate task and queue of a gatefill batch.
TASK_NAME = "gatefill.batch"
QUEUE = "gatefill"
#: A worker beats every HEARTBEAT_SECONDS; one silent for STALLED_SECONDS is taken for dead and its job is retried.
HEARTBEAT_SECONDS = 1.0
STALLED_SECONDS = 5.0
#: How often a worker behind a transaction pooler looks for a job (it cannot LISTEN); directly, NOTIFY wakes it and
#: this is the fallback.
POLL_POOLED_SECONDS = 0.1
POLL_DIRECT_SECONDS = 2.0


class ClaimLost(GatefillError):
    """A worker's job is no longer its own (retried elsewhere after a stall, or a newer apply took the run over)."""

    def __init__(self, job_id: int, why: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id}: {why}; its batch is left to whoever holds it now")


@dataclass(frozen=True)
class BatchArgs:
    """One batch as a procrastinate job carries it: the task itself and the lease holder of the apply (the
    coordinator) that queued it, so that only that apply's batches commit."""

    task: BatchTask
    coordinator: str

    def to_kwargs(self) -> dict[str, Any]:
        t = self.task
        return {
            "run_id": t.run_id,
            "batch_no": t.batch_no,
            "group": t.group,
            "retrying": t.retrying,
            "coordinator": self.coordinator,
            "candidates": [candidate_to_json(c) for c in t.candidates],
        }

    @classmethod
    def from_kwargs(cls, kw: Mapping[str, Any]) -> BatchArgs:
        candidates = tuple(candidate_from_json(c) for c in kw["candidates"])
        task = BatchTask(str(kw["run_id"]), int(kw["batch_no"]), kw["group"], candidates, bool(kw["retrying"]))
        return cls(task, str(kw["coordinator"]))


def _conninfo(env: Environment) -> str:
    """The libpq URL of the environment (password included: it goes to the driver only, never to a log)."""
    return env.url.set(drivername="postgresql").render_as_string(hide_password=False)


def open_queue(env: Environment, *, pool_size: int = 2) -> procrastinate.App:
    """A procrastinate app on the environment's database (not opened yet)."""
    pooled = env.pooler == "transaction"
    connection_args: dict[str, Any] = {"application_name": "gatefill worker", "connect_timeout": 5}
    if pooled:
        connection_args["prepare_threshold"] = None
    connector = procrastinate.PsycopgConnector(
        conninfo=_conninfo(env), kwargs=connection_args, min_size=1, max_size=pool_size
    )
    defaults: WorkerOptions = {
        "queues": [QUEUE],
        "listen_notify": not pooled,
        "fetch_job_polling_interval": POLL_POOLED_SECONDS if pooled else POLL_DIRECT_SECONDS,
        "update_heartbeat_interval": HEARTBEAT_SECONDS,
        "stalled_worker_timeout": STALLED_SECONDS,
        # shutdown_graceful_timeout stays unset: a stopped worker finishes its batch, however long it takes.
        "delete_jobs": "successful",
    }
    return procrastinate.App(connector=connector, worker_defaults=defaults)


@contextlib.contextmanager
def queue_errors(db: Database) -> Iterator[None]:
    """procrastinate's errors (and its connection pool's) as gatefill's, masked as ``Database.translate_errors``
    masks the driver's: a pool that cannot connect is ``DatabaseUnreachable``."""
    try:
        yield
    except psycopg_pool.PoolTimeout as exc:
        raise db.driver_error(exc, disconnected=True) from exc
    except procrastinate_exceptions.ConnectorException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        raise db.driver_error(cause) from exc


def ensure_queue_schema(db: Database) -> None:
    """Applies procrastinate's schema if it is missing (idempotent: several workers and applies may start at once;
    a transaction-scoped advisory lock orders them, which also holds behind a transaction pooler)."""
    with db.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('gatefill.queue.schema'))"))
        if conn.execute(sa.text("SELECT to_regclass('procrastinate_jobs')")).scalar_one() is not None:
            return
        # Sent with (empty) parameters, so its literal percent signs are doubled, as procrastinate's own apply does.
        conn.exec_driver_sql(SchemaManager.get_schema().replace("%", "%%"))


def claim_job(conn: Connection, job_id: int, worker_id: int | None) -> None:
    """In a batch's transaction: proves the job is still this worker's (``doing``, fetched by ``worker_id``) and locks
    its row until the transaction ends, so that retrying it elsewhere waits for this commit or rollback."""
    row = conn.execute(
        sa.text("SELECT status, worker_id FROM procrastinate_jobs WHERE id = :id FOR UPDATE"), {"id": job_id}
    ).first()
    if row is None:
        raise ClaimLost(job_id, "the job no longer exists")
    if row.status != "doing" or row.worker_id != worker_id:
        raise ClaimLost(job_id, f"the job is now {row.status} (worker {row.worker_id}, not {worker_id})")


def run_jobs(db: Database, run_id: str) -> dict[int, str]:
    """Job id → status of the run's batch jobs that are still queued or running."""
    with db.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, status FROM procrastinate_jobs WHERE task_name = :task AND args->>'run_id' = :run "
                "AND status IN ('todo', 'doing')"
            ),
            {"task": TASK_NAME, "run": run_id},
        )
        return {int(i): str(s) for i, s in rows}


def job_statuses(db: Database, job_ids: Sequence[int]) -> dict[int, str]:
    """Job id → status (a job deleted once it succeeded is missing)."""
    if not job_ids:
        return {}
    with db.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, status FROM procrastinate_jobs WHERE id = ANY(:ids)"), {"ids": list(job_ids)}
        )
        return {int(i): str(s) for i, s in rows}


def live_workers(db: Database) -> int:
    """Workers of this database whose heartbeat is recent (here and on other machines)."""
    with db.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM procrastinate_workers "
                    "WHERE last_heartbeat > now() - make_interval(secs => :stalled)"
                ),
                {"stalled": STALLED_SECONDS},
            ).scalar_one()
        )


def stalled_jobs(app: procrastinate.App) -> list[procrastinate_jobs.Job]:
    """Batch jobs running on workers whose heartbeat stopped (a kill -9, a lost host), by procrastinate's own query."""
    rows = app.connector.get_sync_connector().execute_query_all(
        query=procrastinate_sql.queries["select_stalled_jobs_by_heartbeat"],
        queue=QUEUE,
        task_name=TASK_NAME,
        seconds_since_heartbeat=STALLED_SECONDS,
    )
    return [procrastinate_jobs.Job.from_row(row) for row in rows]


def retry_now(app: procrastinate.App, job_id: int) -> None:
    """Puts a stalled job back in the queue at once."""
    app.job_manager.retry_job_by_id(job_id, retry_at=datetime.now(UTC))
