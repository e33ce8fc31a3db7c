"""The run ledger: runs and their state machine, plans, batches, per-session results, row changes with before-images,
approvals, soak measurements and baselines, run leases and executors' intents, stored in ``gatefill_*`` tables of the
target database. Runs, batches, results, changes, approvals, leases and intents are written only through this
module's functions: every executor records a batch with ``record_batch`` (and its rows with ``record_row_changes``).

The ledger lives next to the data on purpose: a batch's data writes and its ledger rows commit in one transaction, so
after a crash the ledger says exactly which batches happened (principle 2), and rollback can restore exactly the rows
a run changed from their before-images (principle 3). On Postgres the tables get RLS enabled with no policies, so
only the owner and roles with BYPASSRLS (the service role) can read them through an exposed API.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill.db import Database, JSONValue, UTCTimestamp, database_now, dumps_json, insert_rows
from gatefill.errors import DataError, GatefillError, UsageError
from gatefill.images import image_columns, row_digest
from gatefill.job import (
    Baseline,
    BatchRecord,
    BatchTask,
    Candidate,
    Check,
    Measurement,
    RowChange,
    SessionOutcome,
    WrittenTable,
)

__all__ = [
    "APPLY_PHASE",
    "INTENTS_METADATA",
    "LEDGER_METADATA",
    "TRANSITIONS",
    "Approval",
    "BatchRecord",
    "Hold",
    "IllegalTransition",
    "Lease",
    "LeaseHolder",
    "LeaseLost",
    "PaceDecision",
    "PaceGrant",
    "RecordedChange",
    "Run",
    "RunEvent",
    "RunLocked",
    "RunNotFound",
    "RunStatus",
    "WatchRecord",
    "baseline_for",
    "batch_keys",
    "batch_record",
    "begin_hold",
    "change_pages",
    "change_range",
    "changes_for",
    "count_changes",
    "create_run",
    "decisions_for",
    "drop_intents",
    "end_hold",
    "fence_lease",
    "get_lease",
    "get_run",
    "holds_for",
    "init_intents",
    "init_ledger",
    "intents_for",
    "lock_intents",
    "measurements_for",
    "new_run_id",
    "pace_level",
    "pending_batches",
    "publish_pace",
    "record_approval",
    "record_approval_once",
    "record_baseline",
    "record_batch",
    "record_decisions",
    "record_intents",
    "record_measurement",
    "record_watch_results",
    "release_lease",
    "renew_lease",
    "reserve_pace",
    "row_changes_not_recorded",
    "row_key",
    "run_events_for",
    "take_lease",
    "transition",
    "watch_history",
    "watch_last_taken",
    "watch_last_verdicts",
]

LEDGER_METADATA = sa.MetaData()


class RunStatus(StrEnum):
    """Where a run stands; legal moves between them are the ``TRANSITIONS`` table."""

    PLANNED = "planned"  # a plan exists; nothing has been written
    RUNNING = "running"  # batches are being applied (or measurements taken)
    PAUSED = "paused"  # stopped between batches (Ctrl-C, lost database, too many failures); resumable
    SUCCEEDED = "succeeded"  # every batch committed, no session failed
    COMPLETED_WITH_ERRORS = "completed_with_errors"  # every batch committed, some sessions failed
    FAILED = "failed"  # stopped by an error it cannot resume from
    ROLLED_BACK = "rolled_back"  # its changes were restored from the before-images
    CANCELLED = "cancelled"  # abandoned before completion by a person


#: The phase of the runs that write data (plan records them, apply executes them); the only runs rollback can undo.
APPLY_PHASE = "apply"

TERMINAL = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.COMPLETED_WITH_ERRORS, RunStatus.FAILED, RunStatus.ROLLED_BACK, RunStatus.CANCELLED}
)

TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.PLANNED: frozenset(
        {
            RunStatus.RUNNING,  # apply (or soak) starts after its gate let it through
            RunStatus.CANCELLED,  # the plan was rejected or superseded
        }
    ),
    RunStatus.RUNNING: frozenset(
        {
            RunStatus.SUCCEEDED,  # the last batch committed and no session failed
            RunStatus.COMPLETED_WITH_ERRORS,  # the last batch committed; some sessions failed and are listed
            RunStatus.PAUSED,  # Ctrl-C after the current batch, the database went away, or --max-failures was hit
            RunStatus.FAILED,  # an error that resuming cannot fix (e.g. the plan no longer matches the database)
            RunStatus.RUNNING,  # a resume after a crash finds the run still marked running and takes it over
        }
    ),
    RunStatus.PAUSED: frozenset(
        {
            RunStatus.RUNNING,  # resumed from the first unfinished batch
            RunStatus.CANCELLED,  # a person gave up on it
            RunStatus.ROLLED_BACK,  # its committed batches were undone
        }
    ),
    RunStatus.SUCCEEDED: frozenset({RunStatus.ROLLED_BACK}),  # undone afterwards
    RunStatus.COMPLETED_WITH_ERRORS: frozenset(
        {
            RunStatus.ROLLED_BACK,  # undone afterwards
            RunStatus.RUNNING,  # failed sessions retried
        }
    ),
    RunStatus.FAILED: frozenset({RunStatus.ROLLED_BACK, RunStatus.CANCELLED}),  # cleaned up after a hard failure
    RunStatus.ROLLED_BACK: frozenset(),  # final
    RunStatus.CANCELLED: frozenset({RunStatus.ROLLED_BACK}),  # a cancelled, partly applied run can still be undone
}


class RunNotFound(UsageError):
    """No run with that id exists in this environment's ledger."""

    def __init__(self, run_id: str, where: str) -> None:
        self.run_id = run_id
        super().__init__(f"unknown run '{run_id}' in {where} (see `gatefill status`)")


class IllegalTransition(GatefillError):
    """A run was asked to move between statuses the transition table does not connect."""

    def __init__(self, run_id: str, current: RunStatus, wanted: RunStatus) -> None:
        self.run_id = run_id
        self.current = current
        self.wanted = wanted
        super().__init__(f"run {run_id} is {current.value}; it cannot become {wanted.value}")


class RunLocked(GatefillError):
    """Another process holds the run's lease; a second apply (rollback, soak) must not interleave with it."""

    exit_code = 4

    def __init__(self, name: str, holder: str) -> None:
        self.name = name
        self.holder = holder
        super().__init__(
            f"{name} is active elsewhere ({holder}); wait for it or stop it first (if that process is gone, its "
            "lease expires by itself and the next attempt takes over)"
        )


runs = sa.Table(
    "gatefill_runs",
    LEDGER_METADATA,
    sa.Column("id", sa.Text(), primary_key=True),
    sa.Column("phase", sa.Text(), nullable=False),
    sa.Column("environment", sa.Text(), nullable=False),
    sa.Column("job", sa.Text(), nullable=False),
    sa.Column("status", sa.Text(), nullable=False),
    sa.Column("versions", JSONValue(), nullable=False),
    sa.Column("params", JSONValue(), nullable=False),
    sa.Column("plan_hash", sa.Text()),
    sa.Column("plan", JSONValue()),
    sa.Column("parent_run_id", sa.Text()),
    sa.Column("summary", JSONValue()),
    sa.Column("error", sa.Text()),
    sa.Column("created_at", UTCTimestamp(), nullable=False),
    sa.Column("updated_at", UTCTimestamp(), nullable=False),
    sa.Column("started_at", UTCTimestamp()),
    sa.Column("finished_at", UTCTimestamp()),
)

# A plan's work, stored with its run so that apply reads it a batch at a time (``gatefill_runs.plan`` keeps the
# plan's header only: at 1M candidates the whole plan is hundreds of MB, more than one jsonb value holds). Written once,
# when the run is recorded (plan time, or the first apply of a plan file made elsewhere), with COPY on Postgres.
# The runnable candidates, by key:
plan_candidates = sa.Table(
    "gatefill_plan_candidates",
    LEDGER_METADATA,
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("session_id", sa.Text(), primary_key=True),
    sa.Column("category", sa.Text(), nullable=False),
    sa.Column("created_at", UTCTimestamp(), nullable=False),
    sa.Column("operations", JSONValue(), nullable=False),
    sa.Column("detail", JSONValue()),
)
# and the plan's batches, a row per candidate in the order apply runs them (position counts across batches).
plan_batches = sa.Table(
    "gatefill_plan_batches",
    LEDGER_METADATA,
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("position", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("batch_no", sa.Integer(), nullable=False),
    sa.Column("plan_group", sa.Text(), nullable=False),
    sa.Column("session_id", sa.Text(), nullable=False),
    sa.UniqueConstraint("run_id", "session_id", name="gatefill_plan_batches_once"),
)

run_events = sa.Table(
    "gatefill_run_events",
    LEDGER_METADATA,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", UTCTimestamp(), nullable=False),
    sa.Column("from_status", sa.Text()),
    sa.Column("to_status", sa.Text(), nullable=False),
    sa.Column("reason", sa.Text()),
)

batches = sa.Table(
    "gatefill_batches",
    LEDGER_METADATA,
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("batch_no", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("status", sa.Text(), nullable=False),
    sa.Column("sessions", sa.Integer(), nullable=False),
    sa.Column("succeeded", sa.Integer(), nullable=False),
    sa.Column("failed", sa.Integer(), nullable=False),
    sa.Column("skipped", sa.Integer(), nullable=False),
    sa.Column("started_at", UTCTimestamp(), nullable=False),
    sa.Column("finished_at", UTCTimestamp(), nullable=False),
    sa.Column("detail", JSONValue()),
)

session_results = sa.Table(
    "gatefill_session_results",
    LEDGER_METADATA,
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("session_id", sa.Text(), primary_key=True),
    sa.Column("batch_no", sa.Integer(), nullable=False),
    sa.Column("result", sa.Text(), nullable=False),
    sa.Column("error", sa.Text()),
    sa.Column("detail", JSONValue()),
    sa.Column("at", UTCTimestamp(), nullable=False),
)

# The rows a run changed, a set per batch and table (one row of this table; a batch recording its rows in parts has a
# set per part). A row per change would cost, on Postgres, more WAL than the data it describes (its keys, run id and
# an index entry, per row); a set stores its entries as one compact JSON text that TOAST compresses. ``entries`` is a
# JSON array with, per changed row in the order they were written: [key values in key_columns' order, after digest
# (``gatefill.images.row_digest``, its bytes in base64url; null in a set moved from a ledger older than digests),
# candidate key (null: none, or the value of the key column ``candidate_key`` names), before-image (null: the row was
# absent, an insert; rollback deletes it), index into after_columns (null: every column of the table), the whole
# after-image (only in sets moved from a ledger older than digests)], trailing nulls left out. Read back through
# ``change_pages``; a change's sequence number is ``id * SET_SPAN + i``.
change_sets = sa.Table(
    "gatefill_change_sets",
    LEDGER_METADATA,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("batch_no", sa.Integer(), nullable=False),
    sa.Column("table_name", sa.Text(), nullable=False),
    sa.Column("rows", sa.Integer(), nullable=False),
    sa.Column("key_columns", JSONValue(), nullable=False),
    # The key column whose value is every entry's candidate (e.g. a table keyed by session): entries omit it.
    sa.Column("candidate_key", sa.Text()),
    # The distinct column lists of the set's partial after-images (a job's update sets some columns only).
    sa.Column("after_columns", JSONValue(), nullable=False),
    sa.Column("entries", sa.Text(), nullable=False),
    sa.Column("at", UTCTimestamp(), nullable=False),
    sa.Index("gatefill_change_sets_run", "run_id", "batch_no"),
)
#: Entries per set at most; sequence numbers of a set's changes are id * SET_SPAN + their index.
SET_SPAN = 1 << 20
#: The table of ledgers older than change sets (a row per change); ``init_ledger`` moves its rows into sets.
LEGACY_CHANGES = "gatefill_changes"

approvals = sa.Table(
    "gatefill_approvals",
    LEDGER_METADATA,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("gate", sa.Text(), nullable=False),
    sa.Column("kind", sa.Text(), nullable=False),  # approval | override
    sa.Column("approved_by", sa.Text(), nullable=False),
    sa.Column("note", sa.Text()),
    sa.Column("plan_hash", sa.Text()),
    sa.Column("at", UTCTimestamp(), nullable=False),
    sa.CheckConstraint("kind IN ('approval','override')", name="gatefill_approvals_kind"),
)

measurements = sa.Table(
    "gatefill_measurements",
    LEDGER_METADATA,
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("window_start", UTCTimestamp(), nullable=False),
    sa.Column("window_end", UTCTimestamp(), nullable=False),
    sa.Column("taken_at", UTCTimestamp(), nullable=False),
    sa.Column("verdict", sa.Text(), nullable=False),
    sa.Column("checks", JSONValue(), nullable=False),
)

# A soak's frozen baseline: measured once, before its first look, and reused by every later look and by a resumed
# soak (the primary key makes a second measurement of the same run impossible).
soak_baselines = sa.Table(
    "gatefill_soak_baselines",
    LEDGER_METADATA,
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("baseline_start", UTCTimestamp(), nullable=False),
    sa.Column("baseline_end", UTCTimestamp(), nullable=False),
    sa.Column("measured_at", UTCTimestamp(), nullable=False),
    sa.Column("seconds", sa.Float(), nullable=False),
    sa.Column("summary", sa.Text(), nullable=False),
    sa.Column("evidence", JSONValue(), nullable=False),
    sa.Column("query", sa.Text()),
)

# A run's lease: which process works on the run now (apply, rollback or soak). Taken and renewed in short
# transactions of their own, so it holds through a transaction-mode pooler (a session advisory lock does not), and it
# expires by the database's clock when its holder stops renewing it (a kill -9, a lost host).
leases = sa.Table(
    "gatefill_leases",
    LEDGER_METADATA,
    sa.Column("name", sa.Text(), primary_key=True),
    sa.Column("holder_id", sa.Text(), nullable=False),
    sa.Column("host", sa.Text(), nullable=False),
    sa.Column("pid", sa.Integer(), nullable=False),
    sa.Column("command", sa.Text(), nullable=False),
    sa.Column("acquired_at", UTCTimestamp(), nullable=False),
    sa.Column("heartbeat_at", UTCTimestamp(), nullable=False),
    sa.Column("expires_at", UTCTimestamp(), nullable=False),
)

# An apply's holds: each time an indicator (``gatefill.holds``) kept a batch from starting, which one, what it read
# and why, from when until when. A hold is recorded when it begins (``ended_at`` NULL while it lasts), so a hold cut
# short by a crash is still visible.
holds = sa.Table(
    "gatefill_holds",
    LEDGER_METADATA,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("batch_no", sa.Integer(), nullable=False),  # the batch it held back
    sa.Column("indicator", sa.Text(), nullable=False),
    sa.Column("value", sa.Text(), nullable=False),  # at the last look that held
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("began_at", UTCTimestamp(), nullable=False),
    sa.Column("ended_at", UTCTimestamp()),
    sa.Column("seconds", sa.Float()),
    sa.Column("checks", sa.Integer(), nullable=False),
    sa.Column("ended_by", sa.Text()),  # clear (every indicator Normal again) | stop (Ctrl-C, SIGTERM)
)

# An apply's pacing decisions: each look that changed something (a Hold that slowed it, a Normal that sped it back
# up, a Stop and the resume after its cool-down, a batch size fitted to the target batch time), with the indicator,
# the value it read, its thresholds, its level, and the rate and batch size from then on. The first look lists every
# indicator with its thresholds (``watch``), N/A ones included. A ledger made before it gets it from ``init_ledger``.
decisions = sa.Table(
    "gatefill_decisions",
    LEDGER_METADATA,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", UTCTimestamp(), nullable=False),
    sa.Column("batch_no", sa.Integer(), nullable=False),  # the batch about to start
    sa.Column("action", sa.Text(), nullable=False),  # watch | slow | recover | stop | resume | size
    sa.Column("indicator", sa.Text(), nullable=False),
    sa.Column("level", sa.Text(), nullable=False),  # n/a | normal | hold | stop
    sa.Column("value", sa.Text(), nullable=False),
    sa.Column("threshold", sa.Text(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("rate", sa.Text(), nullable=False),  # the effective rate from then on
    sa.Column("batch_size", sa.Integer(), nullable=False),  # and the batch size
    sa.Column("held_seconds", sa.Float()),  # resume: how long the Stop kept batches from starting
)

# The global pace of a run applied by several workers (``gatefill.workers``): the rate the coordinator publishes
# (NULL: unlimited), the next free instant of its leaky bucket (GCRA: the theoretical arrival time of the next token),
# and the coordinator's level: normal; hold (a Stop indicator: workers wait, taking no tokens); stop (the apply is
# stopping: no batch starts). Every worker reserves its batch's tokens here with one atomic UPDATE, so the rate holds
# across processes and machines.
pace = sa.Table(
    "gatefill_pace",
    LEDGER_METADATA,
    sa.Column("run_id", sa.Text(), sa.ForeignKey("gatefill_runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("rate_per_second", sa.Float()),
    sa.Column("next_free", UTCTimestamp(), nullable=False),
    sa.Column("level", sa.Text(), nullable=False),
    sa.Column("reason", sa.Text(), nullable=False),
    sa.Column("updated_at", UTCTimestamp(), nullable=False),
    sa.CheckConstraint("level IN ('normal','hold','stop')", name="gatefill_pace_level"),
)

# ``gatefill watch``'s results: one row per check of a check set each time the set ran, with the window of new data
# it judged. Not tied to a run: the watch is ongoing, its history is per environment, set and check. A ledger made
# before it gets it from ``init_ledger``.
watch_results = sa.Table(
    "gatefill_watch_results",
    LEDGER_METADATA,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("environment", sa.Text(), nullable=False),
    sa.Column("set_name", sa.Text(), nullable=False),  # daily | weekly | monthly
    sa.Column("check_name", sa.Text(), nullable=False),
    sa.Column("verdict", sa.Text(), nullable=False),
    sa.Column("summary", sa.Text(), nullable=False),
    sa.Column("evidence", JSONValue(), nullable=False),
    sa.Column("window_start", UTCTimestamp(), nullable=False),
    sa.Column("window_end", UTCTimestamp(), nullable=False),
    sa.Column("taken_at", UTCTimestamp(), nullable=False),
    sa.Index("gatefill_watch_results_by_check", "environment", "set_name", "check_name", "taken_at"),
)

LEDGER_TABLES: tuple[str, ...] = tuple(LEDGER_METADATA.tables)

# Intents: an executor whose writes commit outside the batch's transaction (the PRISM functions executor: its HTTP
# calls) records, before any write, one row per candidate of the batch; the batch's commit drops them. While a run has
# intents, the database may hold rows its ledger does not list yet. Created on first use, not by ``init_ledger``.
INTENTS_METADATA = sa.MetaData()

intents = sa.Table(
    "gatefill_fn_intents",
    INTENTS_METADATA,
    sa.Column("run_id", sa.Text(), primary_key=True),
    sa.Column("session_id", sa.Text(), primary_key=True),
    sa.Column("batch_no", sa.Integer(), nullable=False),
    sa.Column("position", sa.Integer(), nullable=False),  # the candidate's place in its batch (plan order)
    # key, category, operations, group: what the batch's record needs, so finishing it does not need the plan.
    sa.Column("candidate", JSONValue(), nullable=False),
    # call name -> the request id its calls carry (retries and recovery reuse it).
    sa.Column("request_ids", JSONValue(), nullable=False),
    # The executor's before-images of the rows the candidate may write, as read before any call.
    sa.Column("before", JSONValue(), nullable=False),
    # The highest id of the target's event log (fn_logs) when the intent was recorded: the calls' events come after.
    sa.Column("fn_logs_after", sa.BigInteger(), nullable=False),
    sa.Column("retrying", sa.Boolean(), nullable=False),
    sa.Column("batch_started_at", UTCTimestamp(), nullable=False),
    sa.Column("created_at", UTCTimestamp(), nullable=False),
)


def init_ledger(db: Database) -> None:
    """Creates the ledger tables if missing (idempotent); on Postgres, hides them behind RLS without policies."""
    with db.begin() as conn:
        if db.caps.advisory_locks:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('gatefill.ledger.schema'))"))
        LEDGER_METADATA.create_all(conn, checkfirst=True)
        _move_legacy_changes(conn)
        if db.caps.row_level_security:
            for table in LEDGER_TABLES:
                conn.exec_driver_sql(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")


def _move_legacy_changes(conn: Connection) -> None:
    """Moves the changes of a ledger older than change sets (``gatefill_changes``, a row per change, with or without
    digests) into sets, in their order, then drops that table: runs recorded before keep their rollback."""
    if not sa.inspect(conn).has_table(LEGACY_CHANGES):
        return
    present = {c["name"] for c in sa.inspect(conn).get_columns(LEGACY_CHANGES)}
    legacy = sa.Table(
        LEGACY_CHANGES,
        sa.MetaData(),
        *(sa.Column(n, t) for n, t in _LEGACY_COLUMNS.items() if n in present),
    )
    last = 0
    while True:
        page = conn.execute(sa.select(legacy).where(legacy.c.id > last).order_by(legacy.c.id).limit(10_000)).all()
        if not page:
            break
        last = page[-1].id
        for group in _legacy_groups(page):
            conn.execute(change_sets.insert().values(**_legacy_set(group)))
    conn.exec_driver_sql(f"DROP TABLE {LEGACY_CHANGES}")


_LEGACY_COLUMNS: dict[str, Any] = {
    "id": sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
    "run_id": sa.Text(),
    "batch_no": sa.Integer(),
    "table_name": sa.Text(),
    "row_key": sa.Text(),
    "session_id": sa.Text(),
    "before": JSONValue(),
    "after": JSONValue(),
    "after_digest": sa.Text(),
    "after_columns": JSONValue(),
    "at": UTCTimestamp(),
}


def _legacy_groups(page: Sequence[Any]) -> Iterator[list[Any]]:
    """Consecutive legacy rows of one run, batch and table."""
    group: list[Any] = []
    for row in page:
        if group and (group[0].run_id, group[0].batch_no, group[0].table_name) != (
            row.run_id,
            row.batch_no,
            row.table_name,
        ):
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _legacy_set(group: Sequence[Any]) -> dict[str, Any]:
    """One change set holding legacy rows (of one run, batch and table; their keys name the same columns)."""
    key_columns = sorted(json.loads(group[0].row_key))
    columns: dict[tuple[str, ...], int] = {}
    entries = []
    for r in group:
        m = r._mapping
        key = json.loads(r.row_key)
        after_columns = m.get("after_columns")
        index = None if after_columns is None else columns.setdefault(tuple(after_columns), len(columns))
        digest = m.get("after_digest")
        after = m.get("after") if digest is None else None
        entries.append(_entry([key[c] for c in key_columns], digest, r.session_id, r.before, index, after))
    return {
        "run_id": group[0].run_id,
        "batch_no": group[0].batch_no,
        "table_name": group[0].table_name,
        "rows": len(entries),
        "key_columns": key_columns,
        "candidate_key": None,
        "after_columns": [list(c) for c in columns],
        "entries": dumps_json(entries),
        "at": group[0].at,
    }


def init_intents(db: Database) -> None:
    """Creates the intents table if missing (idempotent); on Postgres hides it behind RLS like the ledger (its
    before-images are user data)."""
    with db.begin() as conn:
        if db.caps.advisory_locks:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('gatefill.fn_intents.schema'))"))
        if sa.inspect(conn).has_table(intents.name):
            return
        INTENTS_METADATA.create_all(conn, checkfirst=True)
        if db.caps.row_level_security:
            conn.exec_driver_sql(f"ALTER TABLE {intents.name} ENABLE ROW LEVEL SECURITY")


def new_run_id(phase: str, now: datetime) -> str:
    """A sortable, readable run id: ``<phase>-<UTC timestamp>-<random>``, e.g. ``apply-20250917T080000Z-3f9a``."""
    return f"{phase}-{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def row_key(values: Mapping[str, Any]) -> str:
    """The canonical JSON text of a primary key (sorted keys), used to find a row's change again."""
    return json.dumps({k: str(v) for k, v in values.items()}, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Run:
    """One execution of a phase in one environment, as recorded in the ledger."""

    id: str
    phase: str
    environment: str
    job: str
    status: RunStatus
    versions: Mapping[str, str]
    params: Mapping[str, Any]
    plan_hash: str | None
    plan: Mapping[str, Any] | None  # None as well when read with ``get_run(..., with_plan=False)``
    parent_run_id: str | None
    summary: Mapping[str, Any] | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Approval:
    """A recorded decision at a gate: who let the run through (or overrode the gate), when, why."""

    run_id: str
    gate: str
    kind: str
    approved_by: str
    note: str | None
    plan_hash: str | None
    at: datetime


def _run_from_row(row: sa.Row[Any]) -> Run:
    return Run(
        id=row.id,
        phase=row.phase,
        environment=row.environment,
        job=row.job,
        status=RunStatus(row.status),
        versions=row.versions,
        params=row.params,
        plan_hash=row.plan_hash,
        plan=getattr(row, "plan", None),
        parent_run_id=row.parent_run_id,
        summary=row.summary,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def create_run(
    conn: Connection,
    *,
    run_id: str,
    phase: str,
    environment: str,
    job: str,
    versions: Mapping[str, str],
    params: Mapping[str, Any],
    now: datetime,
    status: RunStatus = RunStatus.PLANNED,
    plan: Mapping[str, Any] | None = None,
    plan_hash: str | None = None,
    parent_run_id: str | None = None,
) -> Run:
    """Records a new run (its first status event included) and returns it, without its plan (``Run.plan`` None)."""
    conn.execute(
        runs.insert().values(
            id=run_id,
            phase=phase,
            environment=environment,
            job=job,
            status=status.value,
            versions=dict(versions),
            params=dict(params),
            plan=dict(plan) if plan is not None else None,
            plan_hash=plan_hash,
            parent_run_id=parent_run_id,
            created_at=now,
            updated_at=now,
        )
    )
    conn.execute(run_events.insert().values(run_id=run_id, at=now, from_status=None, to_status=status.value))
    return get_run(conn, run_id, where=environment, with_plan=False)


def get_run(conn: Connection, run_id: str, *, where: str = "this environment", with_plan: bool = True) -> Run:
    """The run with that id; ``RunNotFound`` (exit 2) otherwise.

    ``with_plan=False`` leaves the stored plan in the database (``Run.plan`` is None): a plan lists every candidate,
    so a copy of it held through a large apply would grow the process with the plan's size."""
    columns = runs.c if with_plan else [c for c in runs.c if c.name != "plan"]
    row = conn.execute(sa.select(*columns).where(runs.c.id == run_id)).first()
    if row is None:
        raise RunNotFound(run_id, where)
    return _run_from_row(row)


def list_runs(conn: Connection, *, phase: str | None = None, limit: int = 50) -> list[Run]:
    """The most recent runs first."""
    query = sa.select(runs).order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(limit)
    if phase is not None:
        query = query.where(runs.c.phase == phase)
    return [_run_from_row(r) for r in conn.execute(query)]


def transition(
    conn: Connection,
    run_id: str,
    wanted: RunStatus,
    *,
    now: datetime,
    reason: str | None = None,
    summary: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> Run:
    """Moves a run to ``wanted`` if the transition table allows it (else ``IllegalTransition``), under a row lock."""
    # FOR UPDATE serialises concurrent movers on Postgres; SQLite's compiler omits it (its writers are serialised).
    query = sa.select(runs.c.status).where(runs.c.id == run_id).with_for_update()
    current_text = conn.execute(query).scalar_one_or_none()
    if current_text is None:
        raise RunNotFound(run_id, "this environment")
    current = RunStatus(current_text)
    if wanted not in TRANSITIONS[current]:
        raise IllegalTransition(run_id, current, wanted)
    values: dict[str, Any] = {"status": wanted.value, "updated_at": now}
    if wanted in TERMINAL or wanted is RunStatus.PAUSED:
        values["finished_at"] = now
    if summary is not None:
        values["summary"] = dict(summary)
    if error is not None:
        values["error"] = error
    conn.execute(runs.update().where(runs.c.id == run_id).values(**values))
    if wanted is RunStatus.RUNNING:
        conn.execute(runs.update().where(runs.c.id == run_id, runs.c.started_at.is_(None)).values(started_at=now))
    conn.execute(
        run_events.insert().values(
            run_id=run_id, at=now, from_status=current.value, to_status=wanted.value, reason=reason
        )
    )
    return get_run(conn, run_id, with_plan=False)


def runs_update_summary(conn: Connection, run_id: str, summary: Mapping[str, Any], *, now: datetime) -> None:
    """Replaces a run's summary (the pipeline keeps its step state there) without changing its status."""
    conn.execute(runs.update().where(runs.c.id == run_id).values(summary=dict(summary), updated_at=now))


def record_approval(
    conn: Connection,
    *,
    run_id: str,
    gate: str,
    approved_by: str,
    now: datetime,
    note: str | None = None,
    plan_hash: str | None = None,
    kind: str = "approval",
) -> Approval:
    """Records who approved (or overrode) which gate of a run; the run must exist."""
    if not approved_by.strip():
        raise UsageError("an approval needs a name (--by NAME)")
    get_run(conn, run_id, with_plan=False)
    conn.execute(
        approvals.insert().values(
            run_id=run_id, gate=gate, kind=kind, approved_by=approved_by, note=note, plan_hash=plan_hash, at=now
        )
    )
    return Approval(run_id, gate, kind, approved_by, note, plan_hash, now)


def record_approval_once(
    conn: Connection,
    *,
    run_id: str,
    gate: str,
    approved_by: str,
    now: datetime,
    note: str | None,
    plan_hash: str | None,
) -> tuple[Approval, bool]:
    """An approval of ``gate`` unless the run already has one (for the same plan hash): ``(approval, recorded)``,
    where a repeat returns the earlier approval and ``False`` and writes nothing.

    The run's row is locked first (SQLite's write transaction already is), so two people approving at the same
    moment still leave one record."""
    conn.execute(sa.select(runs.c.id).where(runs.c.id == run_id).with_for_update()).first()
    for earlier in approvals_for(conn, run_id, gate):
        if earlier.kind == "approval" and earlier.plan_hash == plan_hash:
            return earlier, False
    approval = record_approval(
        conn, run_id=run_id, gate=gate, approved_by=approved_by, now=now, note=note, plan_hash=plan_hash
    )
    return approval, True


def approvals_for(conn: Connection, run_id: str, gate: str | None = None) -> list[Approval]:
    """Every approval and override recorded for a run (optionally one gate), oldest first."""
    query = sa.select(approvals).where(approvals.c.run_id == run_id).order_by(approvals.c.id)
    if gate is not None:
        query = query.where(approvals.c.gate == gate)
    return [Approval(r.run_id, r.gate, r.kind, r.approved_by, r.note, r.plan_hash, r.at) for r in conn.execute(query)]


@dataclass(frozen=True)
class LeaseHolder:
    """A process that holds (or wants) a lease: a fresh id per acquisition, plus host, pid and command for people."""

    id: str
    host: str
    pid: int
    command: str

    @classmethod
    def this_process(cls, command: str) -> LeaseHolder:
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), command)

    def describe(self) -> str:
        return f"{self.command} by {self.host}:{self.pid} (holder {self.id[:8]})"


@dataclass(frozen=True)
class Lease:
    """A lease row as read at ``read_at`` (the database's clock, which is the one expiry is judged by)."""

    name: str
    holder: LeaseHolder
    acquired_at: datetime
    heartbeat_at: datetime
    expires_at: datetime
    read_at: datetime

    @property
    def expired(self) -> bool:
        return self.expires_at <= self.read_at

    def describe(self) -> str:
        """``apply by host:123 (holder 3f9a01bc), last heartbeat 4 s ago, expires in 56 s`` (or ``expired 3 s ago``)."""
        beat = (self.read_at - self.heartbeat_at).total_seconds()
        left = (self.expires_at - self.read_at).total_seconds()
        state = f"expired {-left:.0f} s ago" if left <= 0 else f"expires in {left:.0f} s"
        return f"{self.holder.describe()}, last heartbeat {beat:.0f} s ago, {state}"


class LeaseLost(GatefillError):
    """This process no longer holds the run's lease (it expired and another process took it): it must stop."""

    exit_code = 4

    def __init__(self, name: str, now_held_by: str) -> None:
        self.name = name
        self.now_held_by = now_held_by
        super().__init__(f"lost the lease on {name} (now: {now_held_by}); stopped before writing anything more")


def _lease_from_row(row: sa.Row[Any], read_at: datetime) -> Lease:
    holder = LeaseHolder(row.holder_id, row.host, row.pid, row.command)
    return Lease(row.name, holder, row.acquired_at, row.heartbeat_at, row.expires_at, read_at)


def get_lease(conn: Connection, name: str) -> Lease | None:
    """The lease called ``name`` as it stands (expired or not), or None when nobody holds it."""
    now = database_now(conn)
    row = conn.execute(sa.select(leases).where(leases.c.name == name)).first()
    return _lease_from_row(row, now) if row is not None else None


def take_lease(conn: Connection, name: str, holder: LeaseHolder, ttl: float) -> tuple[Lease, Lease | None]:
    """Takes the lease in the caller's (short) transaction: ``RunLocked`` (exit 4, naming the holder) while another
    holder's lease is unexpired. Returns the lease and the expired one it replaced, if any."""
    now = database_now(conn)
    row = conn.execute(sa.select(leases).where(leases.c.name == name).with_for_update()).first()
    expires = now + timedelta(seconds=ttl)
    taken = Lease(name, holder, now, now, expires, now)
    values = {
        "holder_id": holder.id,
        "host": holder.host,
        "pid": holder.pid,
        "command": holder.command,
        "acquired_at": now,
        "heartbeat_at": now,
        "expires_at": expires,
    }
    if row is not None:
        current = _lease_from_row(row, now)
        if current.holder.id != holder.id and not current.expired:
            raise RunLocked(name, current.describe())
        conn.execute(leases.update().where(leases.c.name == name).values(**values))
        return taken, current if current.holder.id != holder.id else None
    try:
        with conn.begin_nested():
            conn.execute(leases.insert().values(name=name, **values))
    except sa.exc.IntegrityError:
        # Another process inserted it between our read and our insert (Postgres; SQLite's writers queue instead).
        winner = get_lease(conn, name)
        raise RunLocked(name, winner.describe() if winner else "another process") from None
    return taken, None


def renew_lease(conn: Connection, name: str, holder: LeaseHolder, ttl: float) -> bool:
    """Extends this holder's lease by ``ttl`` from now; False if it is no longer this holder's."""
    now = database_now(conn)
    result = conn.execute(
        leases.update()
        .where(leases.c.name == name, leases.c.holder_id == holder.id)
        .values(heartbeat_at=now, expires_at=now + timedelta(seconds=ttl))
    )
    return result.rowcount == 1


def fence_lease(conn: Connection, name: str, holder: LeaseHolder, ttl: float) -> None:
    """Inside a writing transaction: proves this holder still holds the lease (``LeaseLost`` otherwise) and keeps it
    until the transaction ends, so nobody can take it over between the proof and the commit (the renewal's row lock,
    or SQLite's write lock)."""
    if not renew_lease(conn, name, holder, ttl):
        current = get_lease(conn, name)
        raise LeaseLost(name, current.describe() if current is not None else "nobody")


def release_lease(conn: Connection, name: str, holder: LeaseHolder) -> None:
    """Drops the lease if this holder still has it."""
    conn.execute(leases.delete().where(leases.c.name == name, leases.c.holder_id == holder.id))


def session_results_for(conn: Connection, run_id: str) -> dict[str, str]:
    """session id → result for every session a run has recorded."""
    rows = conn.execute(
        sa.select(session_results.c.session_id, session_results.c.result).where(session_results.c.run_id == run_id)
    )
    return {sid: result for sid, result in rows}


def committed_batches(conn: Connection, run_id: str) -> set[int]:
    """The batch numbers of a run that committed (its resume point is the first one missing)."""
    rows = conn.execute(sa.select(batches.c.batch_no).where(batches.c.run_id == run_id))
    return {n for (n,) in rows}


def record_plan_work(
    conn: Connection,
    run_id: str,
    candidates: Iterable[Candidate],
    batches: Iterable[tuple[int, str, str]],
    *,
    chunk: int = 5000,
) -> tuple[int, int]:
    """Stores a plan's runnable candidates and its batches (``(batch_no, group, key)`` in run order) with the run, in
    chunks (COPY on Postgres), so neither is held whole; returns how many of each were stored."""
    n_candidates = _insert_chunked(
        conn,
        plan_candidates,
        (
            {
                "run_id": run_id,
                "session_id": c.key,
                "category": c.category,
                "created_at": c.created_at,
                "operations": list(c.operations),
                "detail": dict(c.detail) or None,
            }
            for c in candidates
        ),
        chunk,
    )
    n_batched = _insert_chunked(
        conn,
        plan_batches,
        (
            {"run_id": run_id, "position": i, "batch_no": no, "plan_group": group, "session_id": key}
            for i, (no, group, key) in enumerate(batches, start=1)
        ),
        chunk,
    )
    return n_candidates, n_batched


def _insert_chunked(conn: Connection, table: sa.Table, rows: Iterable[Mapping[str, Any]], chunk: int) -> int:
    n, part = 0, []
    for row in rows:
        part.append(row)
        if len(part) == chunk:
            insert_rows(conn, table, part)
            n, part = n + len(part), []
    insert_rows(conn, table, part)
    return n + len(part)


def plan_work_recorded(conn: Connection, run_id: str) -> bool:
    """Whether the run's plan work is stored (runs recorded before it was stored apart have it in their plan)."""
    query = sa.select(plan_batches.c.position).where(plan_batches.c.run_id == run_id).limit(1)
    return conn.execute(query).first() is not None


def unbatched_work(conn: Connection, run_id: str) -> tuple[int, int, int]:
    """(candidates, batch rows, batch rows whose key is a stored candidate): a consistent plan has all three equal."""
    pc, pb = plan_candidates, plan_batches
    n_candidates = conn.execute(sa.select(sa.func.count()).where(pc.c.run_id == run_id)).scalar_one()
    n_batched = conn.execute(sa.select(sa.func.count()).where(pb.c.run_id == run_id)).scalar_one()
    joined = conn.execute(
        sa.select(sa.func.count())
        .select_from(pb.join(pc, sa.and_(pc.c.run_id == pb.c.run_id, pc.c.session_id == pb.c.session_id)))
        .where(pb.c.run_id == run_id)
    ).scalar_one()
    return int(n_candidates), int(n_batched), int(joined)


def plan_work_page(
    conn: Connection, run_id: str, *, after: int, limit: int, retry_failed: bool
) -> list[tuple[int, int, str, Candidate]]:
    """The next ``limit`` planned candidates after position ``after`` that still need work (no result yet; with
    ``retry_failed``, a failed one too): ``(position, batch_no, group, candidate)`` in run order."""
    pb, pc, sr = plan_batches, plan_candidates, session_results
    result_on = sa.and_(sr.c.run_id == pb.c.run_id, sr.c.session_id == pb.c.session_id)
    todo: sa.ColumnElement[bool] = sr.c.session_id.is_(None)
    if retry_failed:
        todo = sa.or_(todo, sr.c.result == "failed")
    query = (
        sa.select(
            pb.c.position,
            pb.c.batch_no,
            pb.c.plan_group,
            pc.c.session_id,
            pc.c.category,
            pc.c.created_at,
            pc.c.operations,
            pc.c.detail,
        )
        .select_from(
            pb.join(pc, sa.and_(pc.c.run_id == pb.c.run_id, pc.c.session_id == pb.c.session_id)).outerjoin(
                sr, result_on
            )
        )
        .where(pb.c.run_id == run_id, pb.c.position > after, todo)
        .order_by(pb.c.position)
        .limit(limit)
    )
    return [
        (pos, no, group, Candidate(key, category, created, tuple(ops), detail or {}))
        for pos, no, group, key, category, created, ops, detail in conn.execute(query)
    ]


def planned_counts(conn: Connection, run_id: str, *, retry_failed: bool) -> tuple[int, int]:
    """(planned candidates, those still needing work: no result, or with ``retry_failed`` a failed one)."""
    pb, sr = plan_batches, session_results
    total = conn.execute(sa.select(sa.func.count()).where(pb.c.run_id == run_id)).scalar_one()
    done = (
        sa.select(sa.func.count())
        .select_from(pb.join(sr, sa.and_(sr.c.run_id == pb.c.run_id, sr.c.session_id == pb.c.session_id)))
        .where(pb.c.run_id == run_id)
    )
    if retry_failed:
        done = done.where(sr.c.result != "failed")
    return int(total), int(total) - int(conn.execute(done).scalar_one())


def planned_by_category(conn: Connection, run_id: str) -> dict[str, dict[str, int]]:
    """Per category of the plan's runnable candidates: how many are planned and how many have each result."""
    pc, sr = plan_candidates, session_results
    rows = conn.execute(
        sa.select(pc.c.category, sr.c.result, sa.func.count())
        .select_from(pc.outerjoin(sr, sa.and_(sr.c.run_id == pc.c.run_id, sr.c.session_id == pc.c.session_id)))
        .where(pc.c.run_id == run_id)
        .group_by(pc.c.category, sr.c.result)
    )
    out: dict[str, dict[str, int]] = {}
    for category, result, n in rows:
        row = out.setdefault(category, {"planned": 0})
        row["planned"] += int(n)
        if result is not None:
            row[result] = row.get(result, 0) + int(n)
    return out


def planned_without_result(conn: Connection, run_id: str, *, limit: int) -> list[str]:
    """The first ``limit`` planned candidates (run order) without a result."""
    pb, sr = plan_batches, session_results
    query = (
        sa.select(pb.c.session_id)
        .select_from(pb.outerjoin(sr, sa.and_(sr.c.run_id == pb.c.run_id, sr.c.session_id == pb.c.session_id)))
        .where(pb.c.run_id == run_id, sr.c.session_id.is_(None))
        .order_by(pb.c.position)
        .limit(limit)
    )
    return [str(k) for k in conn.execute(query).scalars()]


def result_counts(conn: Connection, run_id: str) -> Counter[str]:
    """result → how many sessions of the run have it (counted by the database)."""
    sr = session_results
    rows = conn.execute(sa.select(sr.c.result, sa.func.count()).where(sr.c.run_id == run_id).group_by(sr.c.result))
    return Counter({str(r): int(n) for r, n in rows})


def plan_category_operations(conn: Connection, run_id: str, category: str) -> list[str]:
    """The operations the plan gives the candidates of ``category`` (one candidate's: a category's are the same)."""
    pc = plan_candidates
    ops = conn.execute(
        sa.select(pc.c.operations).where(pc.c.run_id == run_id, pc.c.category == category).limit(1)
    ).scalar_one_or_none()
    return [str(o) for o in ops or []]


def plan_first_batches(conn: Connection, run_id: str, *, batches: int) -> list[tuple[int, str, list[str]]]:
    """The plan's first ``batches`` batches as stored beside the run: number, group and keys in apply order."""
    pb = plan_batches
    rows = conn.execute(
        sa.select(pb.c.batch_no, pb.c.plan_group, pb.c.session_id)
        .where(pb.c.run_id == run_id, pb.c.batch_no <= batches)
        .order_by(pb.c.position)
    )
    found: dict[int, tuple[int, str, list[str]]] = {}
    for batch_no, group, key in rows:
        found.setdefault(batch_no, (batch_no, group, []))[2].append(key)
    return list(found.values())


def replace_run_plan(conn: Connection, run_id: str, plan: Mapping[str, Any]) -> None:
    """Replaces the plan stored on the run's row (a plan recorded whole before its work was stored apart)."""
    conn.execute(runs.update().where(runs.c.id == run_id).values(plan=dict(plan)))


def record_batch(conn: Connection, batch: BatchRecord) -> None:
    """Records a processed batch in the transaction that wrote its data: a result per candidate (replacing the
    earlier ones of candidates being retried) and the committed batch row. Its changes go in through
    ``record_row_changes``, as they are written or all at once.

    A written session's operations are the plan's and are in the batch's log file, so its result row carries no
    detail; a session that was already present or failed keeps its operations (their reasons) in ``detail``."""
    results = [
        {
            "run_id": batch.run_id,
            "session_id": s.key,
            "batch_no": batch.batch_no,
            "result": s.result,
            "error": s.error,
            "detail": None if s.result == "written" else _session_detail(batch, s),
            "at": batch.finished_at,
        }
        for s in batch.sessions
    ]
    if batch.retrying and results:
        keys = [r["session_id"] for r in results]
        conn.execute(
            session_results.delete().where(
                session_results.c.run_id == batch.run_id, session_results.c.session_id.in_(keys)
            )
        )
    if results:
        insert_rows(conn, session_results, results)
    counts = batch.counts()
    conn.execute(
        batches.insert().values(
            run_id=batch.run_id,
            batch_no=batch.batch_no,
            status="committed",
            sessions=len(batch.categories),
            succeeded=counts["written"],
            failed=counts["failed"],
            skipped=counts["already_present"],
            started_at=batch.started_at,
            finished_at=batch.finished_at,
            # The batch's keys are its sessions' result rows (and its log file): not listed again here.
            detail={"group": batch.group, "changes": len(batch.changes), **batch.detail},
        )
    )


def _session_detail(batch: BatchRecord, s: SessionOutcome) -> dict[str, Any]:
    return {
        "category": batch.categories.get(s.key),
        "group": batch.group,
        "operations": s.operations,
        "seconds": None if s.seconds is None else round(s.seconds, 6),
    }


def record_row_changes(
    conn: Connection,
    run_id: str,
    batch_no: int,
    row_changes: Iterable[RowChange],
    *,
    at: datetime,
    tables: Sequence[WrittenTable],
) -> None:
    """Records a batch's RowChanges as change sets, a set per table in the order the tables first appear (each
    table's changes in their order): per row its key, candidate, before-image where the row existed (absent: null)
    and a digest of the after-image, computed by the column kinds of its table in ``tables`` (the job's).

    Rollback undoes sets newest first, so a job that writes a parent row before its children (per candidate or for
    the whole batch) has its children deleted before their parents, as with a row per change."""
    defs = {t.name: t for t in tables}
    sets: dict[str, list[_SetBuilder]] = {}
    for ch in row_changes:
        written = defs.get(ch.table)
        if written is None or written.table is None:
            raise DataError(f"a change to table {ch.table!r}, which the job does not declare with its definition")
        of_table = sets.setdefault(ch.table, [])
        if not of_table or len(of_table[-1].entries) >= SET_SPAN:
            of_table.append(_SetBuilder(written.table, written.primary_key))
        of_table[-1].add(ch)
    for builder in (b for of_table in sets.values() for b in of_table):
        # One at a time: their ids must follow the order of the sets.
        conn.execute(change_sets.insert().values(**builder.row(run_id, batch_no, at)))


class _SetBuilder:
    """The entries of one change set as they are added."""

    def __init__(self, table: sa.Table, key_columns: Sequence[str]) -> None:
        self.table = table
        self.key_columns = tuple(key_columns)
        self.columns: dict[tuple[str, ...], int] = {}
        self.entries: list[tuple[list[str], str, str | None, Any, int | None]] = []

    def add(self, ch: RowChange) -> None:
        columns = image_columns(self.table, ch.after)
        index = None if columns is None else self.columns.setdefault(columns, len(self.columns))
        before = dict(ch.before) if ch.before is not None else None
        key = [str(ch.key[c]) for c in self.key_columns]
        self.entries.append((key, row_digest(self.table, ch.after, columns), ch.candidate, before, index))

    def row(self, run_id: str, batch_no: int, at: datetime) -> dict[str, Any]:
        keyed = _candidate_key(self.key_columns, [(e[0], e[2]) for e in self.entries])
        entries = [
            _entry(key, digest, None if keyed else candidate, before, index)
            for key, digest, candidate, before, index in self.entries
        ]
        return {
            "run_id": run_id,
            "batch_no": batch_no,
            "table_name": self.table.name,
            "rows": len(entries),
            "key_columns": list(self.key_columns),
            "candidate_key": keyed,
            "after_columns": [list(c) for c in self.columns],
            "entries": dumps_json(entries),
            "at": at,
        }


def _candidate_key(key_columns: Sequence[str], pairs: Sequence[tuple[Sequence[str], str | None]]) -> str | None:
    """The key column holding every entry's candidate, if one does (then the entries need not repeat it)."""
    for i, column in enumerate(key_columns):
        if pairs and all(candidate is not None and key[i] == candidate for key, candidate in pairs):
            return column
    return None


def _entry(
    key: list[str], digest: str | None, candidate: str | None, before: Any, index: int | None, after: Any = None
) -> list[Any]:
    """One change set entry, its digest in base64url and its trailing nulls left out."""
    entry = [key, None if digest is None else _short_digest(digest), candidate, before, index, after]
    while entry[-1] is None:
        entry.pop()
    return entry


def _short_digest(digest: str) -> str:
    """A row digest (``<32 hex>.<4 hex per column>``, ``gatefill.images``) as base64url of its bytes: a third
    shorter."""
    whole, _, marks = digest.partition(".")
    if len(whole) != 32:
        raise DataError(f"not a row digest: {digest[:40]!r}")
    return base64.urlsafe_b64encode(bytes.fromhex(whole + marks)).rstrip(b"=").decode("ascii")


def _hex_digest(short: str) -> str:
    text = base64.urlsafe_b64decode(short + "=" * (-len(short) % 4)).hex()
    return f"{text[:32]}.{text[32:]}"


@dataclass(frozen=True)
class RecordedChange:
    """One row change as the ledger holds it: its key as ``row_key`` text and values, its images as recorded."""

    seq: int
    batch_no: int
    table: str
    row_key: str
    key: Mapping[str, str]
    candidate: str | None
    #: None: the row was absent before the run (an insert)
    before: Mapping[str, Any] | None
    after_digest: str | None
    #: None: the after-image covered every column of the table
    after_columns: tuple[str, ...] | None
    #: The whole after-image, only in sets moved from a ledger older than digests
    after: Mapping[str, Any] | None = None

    @property
    def inserted(self) -> bool:
        return self.before is None


def _expand(row: Any) -> list[RecordedChange]:
    """A change set row's entries as RecordedChanges, in recorded order."""
    try:
        key_columns = list(row.key_columns)
        columns = [tuple(c) for c in row.after_columns]
        keyed = key_columns.index(row.candidate_key) if row.candidate_key is not None else None
        out = []
        for i, e in enumerate(json.loads(row.entries)):
            values, digest, candidate, before, index, after = [*e, None, None, None, None, None][:6]
            key = dict(zip(key_columns, values, strict=True))
            out.append(
                RecordedChange(
                    row.id * SET_SPAN + i,
                    row.batch_no,
                    row.table_name,
                    row_key(key),
                    key,
                    values[keyed] if keyed is not None else candidate,
                    before,
                    None if digest is None else _hex_digest(digest),
                    None if index is None else columns[index],
                    after,
                )
            )
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise DataError(f"change set {row.id} of run {row.run_id} cannot be read ({exc})") from None
    return out


def change_range(conn: Connection, run_id: str) -> tuple[int | None, int | None]:
    """The sequence numbers of the run's first and last recorded change (None, None: it recorded none)."""
    cs = change_sets.c
    first, last = conn.execute(
        sa.select(sa.func.min(cs.id), sa.func.max(cs.id)).where(cs.run_id == run_id, cs.rows > 0)
    ).one()
    if first is None:
        return None, None
    last_rows = conn.execute(sa.select(cs.rows).where(cs.id == last)).scalar_one()
    return first * SET_SPAN, last * SET_SPAN + last_rows - 1


def count_changes(conn: Connection, run_id: str) -> int:
    """How many row changes the run recorded."""
    cs = change_sets.c
    return int(
        conn.execute(sa.select(sa.func.coalesce(sa.func.sum(cs.rows), 0)).where(cs.run_id == run_id)).scalar_one()
    )


def change_pages(
    conn: Connection,
    run_id: str,
    *,
    page_size: int = 5000,
    newest_first: bool = False,
    seq_range: tuple[int, int] | None = None,
    table: str | None = None,
    batch_no: int | None = None,
) -> Iterator[list[RecordedChange]]:
    """The run's changes in recorded order (or newest first), in pages of ``page_size``, reading a few sets at a
    time; only those with a sequence number in ``seq_range`` (inclusive), of ``table``, of batch ``batch_no``."""
    cs = change_sets.c
    heads = sa.select(cs.id, cs.rows).where(cs.run_id == run_id, cs.rows > 0)
    if seq_range is not None:
        heads = heads.where(cs.id.between(seq_range[0] // SET_SPAN, seq_range[1] // SET_SPAN))
    if table is not None:
        heads = heads.where(cs.table_name == table)
    if batch_no is not None:
        heads = heads.where(cs.batch_no == batch_no)
    # Fetched whole before it is used: a pass may write between pages (SQLite would see an open cursor).
    listed = conn.execute(heads.order_by(cs.id.desc() if newest_first else cs.id)).all()
    page: list[RecordedChange] = []
    for group in _set_groups(listed, page_size):
        rows = conn.execute(sa.select(change_sets).where(cs.id.in_(group))).all()
        by_id = {r.id: r for r in rows}
        for set_id in group:
            found = _expand(by_id[set_id])
            if seq_range is not None:
                found = [c for c in found if seq_range[0] <= c.seq <= seq_range[1]]
            page.extend(reversed(found) if newest_first else found)
            while len(page) >= page_size:
                yield page[:page_size]
                page = page[page_size:]
    if page:
        yield page


def changes_for(conn: Connection, run_id: str) -> list[RecordedChange]:
    """Every change a run recorded, in the order it made them, all at once (for inspecting small runs)."""
    return [c for page in change_pages(conn, run_id) for c in page]


def _set_groups(listed: Sequence[Any], page_size: int) -> Iterator[list[int]]:
    """Set ids in order, grouped so that a group holds about a page of changes."""
    group: list[int] = []
    rows = 0
    for set_id, n in listed:
        group.append(set_id)
        rows += n
        if rows >= page_size:
            yield group
            group, rows = [], 0
    if group:
        yield group


def record_intents(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Records a batch's intents (one row per candidate), committed before any of its writes is made."""
    conn.execute(intents.insert(), list(rows))


def intents_for(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    """The run's intent rows, by batch and position (none in a database without the intents table)."""
    if not sa.inspect(conn).has_table(intents.name):
        return []
    query = sa.select(intents).where(intents.c.run_id == run_id).order_by(intents.c.batch_no, intents.c.position)
    return [dict(r._mapping) for r in conn.execute(query)]


def pending_batches(conn: Connection, run_id: str) -> list[int]:
    """Batch numbers of ``run_id`` with intents left (writes possibly made, ledger rows not committed): rollback must
    refuse such a run until they are finished. A database without the intents table has none."""
    if not sa.inspect(conn).has_table(intents.name):
        return []
    rows = conn.execute(sa.select(intents.c.batch_no).where(intents.c.run_id == run_id).distinct())
    return sorted(n for (n,) in rows)


def lock_intents(conn: Connection, run_id: str, batch_no: int) -> set[str]:
    """Locks a batch's intents for its commit and returns their candidate keys (fewer: another process finished it)."""
    query = (
        sa.select(intents.c.session_id)
        .where(intents.c.run_id == run_id, intents.c.batch_no == batch_no)
        .with_for_update()
    )
    return set(conn.execute(query).scalars())


def drop_intents(conn: Connection, run_id: str, batch_no: int) -> None:
    """Removes a batch's intents, in the transaction that records the batch."""
    conn.execute(intents.delete().where(intents.c.run_id == run_id, intents.c.batch_no == batch_no))


def row_changes_not_recorded(conn: Connection, run_id: str, row_changes: Sequence[RowChange]) -> list[RowChange]:
    """The changes this run has not recorded yet (a row has one change per run: a retried batch that finds its rows
    again must not record them twice). Reads the run's sets of the tables involved: meant for executors whose
    batches are small (the functions executor)."""
    if not row_changes:
        return []
    found: set[tuple[str, str]] = set()
    for name in {ch.table for ch in row_changes}:
        for page in change_pages(conn, run_id, table=name):
            found.update((c.table, c.row_key) for c in page)
    return [ch for ch in row_changes if (ch.table, row_key(ch.key)) not in found]


@dataclass(frozen=True)
class RunEvent:
    """One recorded status change of a run (its creation has ``from_status`` None)."""

    at: datetime
    from_status: RunStatus | None
    to_status: RunStatus
    reason: str | None


def run_events_for(conn: Connection, run_id: str) -> list[RunEvent]:
    """Every status change of a run, oldest first: each move to ``running`` starts an invocation of its phase."""
    rows = conn.execute(sa.select(run_events).where(run_events.c.run_id == run_id).order_by(run_events.c.id))
    return [
        RunEvent(r.at, RunStatus(r.from_status) if r.from_status else None, RunStatus(r.to_status), r.reason)
        for r in rows
    ]


# ====================================================================================================================
# Soak measurements and baselines


def measurements_for(conn: Connection, run_id: str) -> list[Measurement]:
    """Every stored look of a soak run, first to last."""
    m = measurements
    rows = conn.execute(sa.select(m).where(m.c.run_id == run_id).order_by(m.c.seq))
    return [
        Measurement(
            seq=row.seq,
            window_start=row.window_start,
            window_end=row.window_end,
            taken_at=row.taken_at,
            verdict=row.verdict,
            checks=[Check.from_json(c) for c in row.checks],
        )
        for row in rows
    ]


def baseline_for(conn: Connection, run_id: str) -> Baseline | None:
    """The soak run's stored baseline, or None before it has been measured."""
    b = soak_baselines
    row = conn.execute(sa.select(b).where(b.c.run_id == run_id)).first()
    if row is None:
        return None
    return Baseline(
        start=row.baseline_start,
        end=row.baseline_end,
        summary=row.summary,
        evidence=dict(row.evidence or {}),
        query=row.query,
        measured_at=row.measured_at,
        seconds=float(row.seconds),
    )


def record_baseline(conn: Connection, run_id: str, baseline: Baseline) -> None:
    """Stores a soak's baseline, measured once (the soak adds when and how long it took)."""
    assert baseline.measured_at is not None and baseline.seconds is not None
    conn.execute(
        soak_baselines.insert().values(
            run_id=run_id,
            baseline_start=baseline.start,
            baseline_end=baseline.end,
            measured_at=baseline.measured_at,
            seconds=baseline.seconds,
            summary=baseline.summary,
            evidence=dict(baseline.evidence),
            query=baseline.query,
        )
    )


def record_measurement(conn: Connection, run_id: str, measurement: Measurement) -> None:
    """Stores one look of a soak, in the caller's (fenced) transaction."""
    conn.execute(
        measurements.insert().values(
            run_id=run_id,
            seq=measurement.seq,
            window_start=measurement.window_start,
            window_end=measurement.window_end,
            taken_at=measurement.taken_at,
            verdict=measurement.verdict,
            checks=[c.to_json() for c in measurement.checks],
        )
    )


# ====================================================================================================================
# Holds


@dataclass(frozen=True)
class Hold:
    """One hold of an apply run: the indicator that held the batch, what it read, why, and for how long (``ended_at``
    and ``seconds`` None while it lasts, or when its process died holding)."""

    batch_no: int
    indicator: str
    value: str
    reason: str
    began_at: datetime
    ended_at: datetime | None
    seconds: float | None
    checks: int
    ended_by: str | None


def begin_hold(
    conn: Connection, run_id: str, *, batch_no: int, indicator: str, value: str, reason: str, at: datetime
) -> int:
    """Records that an indicator holds ``batch_no`` from ``at``; returns the hold's id for ``end_hold``."""
    row = conn.execute(
        holds.insert()
        .values(
            run_id=run_id, batch_no=batch_no, indicator=indicator, value=value, reason=reason, began_at=at, checks=1
        )
        .returning(holds.c.id)
    ).one()
    return int(row[0])


def end_hold(
    conn: Connection,
    hold_id: int,
    *,
    at: datetime,
    seconds: float,
    checks: int,
    value: str,
    reason: str,
    ended_by: str,
) -> None:
    """Closes a hold: when and how it ended, how long it lasted, how many looks it took, and its last holding
    reading."""
    conn.execute(
        holds.update()
        .where(holds.c.id == hold_id)
        .values(ended_at=at, seconds=seconds, checks=checks, value=value, reason=reason, ended_by=ended_by)
    )


def holds_for(conn: Connection, run_id: str) -> list[Hold]:
    """Every hold of a run, oldest first (none for a ledger written before holds existed)."""
    if not sa.inspect(conn).has_table(holds.name):
        return []
    h = holds
    rows = conn.execute(sa.select(h).where(h.c.run_id == run_id).order_by(h.c.id))
    return [
        Hold(r.batch_no, r.indicator, r.value, r.reason, r.began_at, r.ended_at, r.seconds, r.checks, r.ended_by)
        for r in rows
    ]


# ====================================================================================================================
# Pacing decisions


@dataclass(frozen=True)
class PaceDecision:
    """One pacing decision of an apply (``gatefill.pacing``): what changed before ``batch_no``, on which
    indicator's reading, against which thresholds, and the rate and batch size it left."""

    at: datetime
    batch_no: int
    action: str
    indicator: str
    level: str
    value: str
    threshold: str
    reason: str
    rate: str
    batch_size: int
    held_seconds: float | None = None


def record_decisions(conn: Connection, run_id: str, found: Sequence[PaceDecision]) -> None:
    """Records pacing decisions of run ``run_id`` in the caller's transaction."""
    if found:
        conn.execute(decisions.insert(), [{"run_id": run_id, **asdict(d)} for d in found])


def decisions_for(conn: Connection, run_id: str) -> list[PaceDecision]:
    """Every pacing decision of a run, oldest first (none for a ledger written before they were recorded)."""
    if not sa.inspect(conn).has_table(decisions.name):
        return []
    d = decisions
    rows = conn.execute(sa.select(d).where(d.c.run_id == run_id).order_by(d.c.id))
    return [
        PaceDecision(
            r.at, r.batch_no, r.action, r.indicator, r.level, r.value, r.threshold, r.reason, r.rate, r.batch_size,
            r.held_seconds,
        )
        for r in rows
    ]  # fmt: skip


# The global pace of a run with several workers


@dataclass(frozen=True)
class PaceGrant:
    """A worker's reservation of a batch's tokens: the instant its batch may commit (its tokens have accrued by then),
    and the coordinator's level and reason at the time (``hold``: wait and ask again; ``stop``: start no batch)."""

    ready_at: datetime
    level: str
    reason: str
    rate_per_second: float | None


def publish_pace(
    conn: Connection,
    run_id: str,
    *,
    rate_per_second: float | None,
    level: str,
    reason: str,
    at: datetime,
    restart: bool = False,
) -> None:
    """The coordinator's rate and level for its workers. The first publication of an apply (``restart``) starts the
    bucket empty at ``at`` (the first batch waits for its tokens, as ``gatefill.throttle`` does); later ones keep the
    bucket's position."""
    values: dict[str, Any] = {"rate_per_second": rate_per_second, "level": level, "reason": reason, "updated_at": at}
    if restart:
        values["next_free"] = at
    updated = conn.execute(pace.update().where(pace.c.run_id == run_id).values(**values))
    if updated.rowcount == 0:
        conn.execute(pace.insert().values(run_id=run_id, **{"next_free": at, **values}))


#: One statement, so that two workers never reserve the same tokens: the row lock orders them. A batch of n tokens is
#: ready n/rate after the bucket's next free instant, or after ``now`` less one batch's worth when the bucket has been
#: idle (it holds at most one batch of tokens, so an idle spell never lets a burst through).
_RESERVE = sa.text(
    """
    UPDATE gatefill_pace SET next_free = CASE
        WHEN rate_per_second IS NULL OR level <> 'normal' THEN next_free
        ELSE GREATEST(next_free, CAST(:now AS timestamptz) - make_interval(secs => :tokens / rate_per_second))
             + make_interval(secs => :tokens / rate_per_second)
        END
    WHERE run_id = :run_id
    RETURNING next_free, level, reason, rate_per_second
    """
).columns(next_free=UTCTimestamp(), level=sa.Text(), reason=sa.Text(), rate_per_second=sa.Float())


def reserve_pace(conn: Connection, run_id: str, tokens: int, *, now: datetime) -> PaceGrant:
    """Reserves ``tokens`` of the run's global rate at ``now`` (the worker's clock) in the caller's short transaction
    (Postgres: workers run only there). Unlimited or stopped: ready at once. No pace row: ``UsageError``."""
    row = conn.execute(_RESERVE, {"run_id": run_id, "tokens": float(tokens), "now": now}).first()
    if row is None:
        raise UsageError(f"run {run_id} has no published pace: it is not being applied with --workers")
    unlimited = row.rate_per_second is None or row.level != "normal"
    return PaceGrant(now if unlimited else row.next_free, row.level, row.reason, row.rate_per_second)


def pace_level(conn: Connection, run_id: str) -> str | None:
    """The level the run's coordinator last published (None: it publishes none, the run has no workers)."""
    return conn.execute(sa.select(pace.c.level).where(pace.c.run_id == run_id)).scalar_one_or_none()


def batch_keys(conn: Connection, run_id: str, batch_no: int) -> set[str] | None:
    """The candidate keys of a committed batch (its sessions' result rows); None when the batch has not committed."""
    committed = conn.execute(
        sa.select(batches.c.batch_no).where(batches.c.run_id == run_id, batches.c.batch_no == batch_no)
    ).first()
    if committed is None:
        return None
    sr = session_results
    return set(
        conn.execute(sa.select(sr.c.session_id).where(sr.c.run_id == run_id, sr.c.batch_no == batch_no)).scalars()
    )


def batch_record(conn: Connection, run_id: str, batch: BatchTask) -> BatchRecord | None:
    """The committed batch ``batch`` (what a worker in another process committed) as the ledger recorded it, None if
    it has not committed: its sessions in the batch's order, its changes in the order they were recorded.

    The ledger keeps what the in-process apply has in hand only in part: a written session's result row has no
    detail (its operations are the plan's, its time unknown: ``seconds`` None), and a change's after-image is a
    digest (``after`` is empty; its before-image and key are as recorded)."""
    row = conn.execute(
        sa.select(batches).where(batches.c.run_id == run_id, batches.c.batch_no == batch.batch_no)
    ).first()
    if row is None:
        return None
    sr = session_results
    results = {
        r.session_id: r
        for r in conn.execute(sa.select(sr).where(sr.c.run_id == run_id, sr.c.batch_no == batch.batch_no))
    }
    planned = {c.key: c for c in batch.candidates}
    sessions = tuple(_outcome_read_back(results[c.key], planned[c.key]) for c in batch.candidates if c.key in results)
    row_changes = tuple(
        RowChange(c.table, dict(c.key), c.before, {}, c.candidate or "")
        for page in change_pages(conn, run_id, batch_no=batch.batch_no)
        for c in page
    )
    detail = dict(row.detail or {})
    extra = {k: v for k, v in detail.items() if k not in ("group", "keys", "changes")}
    categories = {c.key: c.category for c in batch.candidates if c.key in results}
    return BatchRecord(
        run_id,
        batch.batch_no,
        detail.get("group", batch.group),
        categories,
        sessions,
        row_changes,
        row.started_at,
        row.finished_at,
        detail=extra,
    )


def _outcome_read_back(r: Any, candidate: Candidate) -> SessionOutcome:
    """A session's outcome from its result row: the recorded detail, or for a written one the plan's operations."""
    detail = dict(r.detail or {})
    if "operations" in detail:
        seconds = detail.get("seconds")
        return SessionOutcome(r.session_id, r.result, list(detail["operations"]), r.error, seconds)
    # The plan's operations, in the shape a job reports them ({"op": ...}); each one's own result was not recorded.
    operations: list[dict[str, Any]] = [{"op": op} for op in candidate.operations]
    return SessionOutcome(r.session_id, r.result, operations, r.error, None)


# ``gatefill watch``'s results


@dataclass(frozen=True)
class WatchRecord:
    """One check of one watch set as it was judged over ``[window_start, window_end)`` at ``taken_at``."""

    environment: str
    set_name: str
    check_name: str
    verdict: str
    summary: str
    evidence: Mapping[str, Any]
    window_start: datetime
    window_end: datetime
    taken_at: datetime


def record_watch_results(conn: Connection, records: Sequence[WatchRecord]) -> None:
    """Records a watch's results in the caller's transaction."""
    if records:
        conn.execute(watch_results.insert(), [{**asdict(r), "evidence": dict(r.evidence)} for r in records])


def watch_last_taken(conn: Connection, environment: str) -> dict[str, datetime]:
    """Set name → when it last ran in ``environment`` (sets that never ran are absent)."""
    if not sa.inspect(conn).has_table(watch_results.name):
        return {}
    w = watch_results
    query = sa.select(w.c.set_name, sa.func.max(w.c.taken_at)).where(w.c.environment == environment)
    return {str(name): taken for name, taken in conn.execute(query.group_by(w.c.set_name))}


def watch_last_verdicts(conn: Connection, environment: str, set_name: str) -> dict[str, str]:
    """Check name → the verdict recorded last for it in this set of ``environment``."""
    if not sa.inspect(conn).has_table(watch_results.name):
        return {}
    w = watch_results
    query = (
        sa.select(w.c.check_name, w.c.verdict)
        .where(w.c.environment == environment, w.c.set_name == set_name)
        .order_by(w.c.taken_at, w.c.id)
    )
    return {str(check): str(verdict) for check, verdict in conn.execute(query)}


def watch_history(conn: Connection, environment: str, *, limit: int = 500) -> list[WatchRecord]:
    """The latest ``limit`` watch results of ``environment``, oldest first (none before any watch ran)."""
    if not sa.inspect(conn).has_table(watch_results.name):
        return []
    w = watch_results
    query = sa.select(w).where(w.c.environment == environment).order_by(w.c.taken_at.desc(), w.c.id.desc())
    rows = list(conn.execute(query.limit(limit)))
    return [
        WatchRecord(
            r.environment, r.set_name, r.check_name, r.verdict, r.summary, dict(r.evidence or {}), r.window_start,
            r.window_end, r.taken_at,
        )
        for r in reversed(rows)
    ]  # fmt: skip
