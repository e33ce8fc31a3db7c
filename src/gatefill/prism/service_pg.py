"""The Postgres round trips of ``PrismService``'s scoring calls: the reads in one pipelined round trip, the writes too.

A finalize through SQLAlchemy took ten statements, each a round trip plus the library's per-statement work, and
decoded ~250 answer rows one by one: about 9 ms of Python per call, twelve times the scoring itself. Here the row
lock and one query for every input go to the server together (psycopg pipeline mode; the server still runs them in
order, and the second statement's snapshot is taken after the lock is granted, so it sees what a concurrent call for
the same session committed), and the writes go together too. The write statements are the SQLAlchemy constructs
the portable path executes, compiled once per process for the connection's dialect, and their values pass through
SQLAlchemy's own bind processors for those columns, so the rows written equal the portable path's byte for byte.
psycopg prepares a statement on a connection after its fifth use, so the steady state sends no SQL text.

The connections are the engine's pool connections, but a call does not check one out of the pool each time: the
pool's checkout pings the server (``pool_pre_ping``, one more statement and round trip per call) and SQLAlchemy's
connection and transaction objects cost more Python than the call's own reads. ``ParkedConnections`` keeps the
connections it has used checked out and reuses them; the COMMIT travels in the writes' round trip. A parked
connection that the server has dropped fails on the first statement of a call, which only reads; the caller then
retries once on a fresh connection, which is what the ping was for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.pool import PoolProxiedConnection

from gatefill.prism import scoring

__all__ = [
    "CompiledWrite",
    "ParkedConnections",
    "PgConnection",
    "PgReads",
    "PipelineStepFailed",
    "compiled",
    "read_call",
    "run_pipelined",
]

_LOCK_SQL = "SELECT share_token, share_token_expires_at FROM assessment_sessions WHERE id = %(id)s::uuid FOR UPDATE"

# One row: scoring_config as an object, the answers and the FC answers in (answered_at, block_id) order as two arrays
# each, the stored v1.2/functions FC value and the existing profile's submitted_at. Every part is one index lookup on
# the session id. The answers come in no particular order (both arrays in the same one) and are put in question order
# here, as ``load_session_inputs`` reads them: two ordered aggregates sorted the 248 rows twice on the server, which
# cost Postgres more than sorting them once costs Python.
_INPUTS_SQL = """
SELECT cfg.config, a.qids, a.vals, f.blocks, f.options,
       (SELECT s.scores_json FROM fc_scores s
        WHERE s.session_id = %(id)s::uuid AND s.version = %(version)s AND s.fc_kind = %(kind)s) AS fc_existing,
       p.found, p.submitted_at
FROM (SELECT json_object_agg(c.key, c.value) AS config FROM scoring_config c) cfg
CROSS JOIN (
    SELECT array_agg(r.question_id) AS qids, array_agg(r.answer_value) AS vals
    FROM assessment_responses r WHERE r.session_id = %(id)s::uuid) a
CROSS JOIN (
    SELECT array_agg(fr.block_id::text ORDER BY fr.answered_at, fr.block_id) AS blocks,
           array_agg(fr.option_id::text ORDER BY fr.answered_at, fr.block_id) AS options
    FROM fc_responses fr WHERE fr.session_id = %(id)s::uuid AND %(with_fc)s) f
LEFT JOIN LATERAL (SELECT true AS found, pr.submitted_at FROM profiles pr WHERE pr.session_id = %(id)s::uuid) p
    ON true
"""


class PipelineStepFailed(Exception):
    """Step ``index`` of a pipelined batch failed with the driver error ``cause``; the steps before it ran."""

    def __init__(self, index: int, cause: psycopg.Error, disconnected: bool) -> None:
        super().__init__(str(cause))
        self.index = index
        self.cause = cause
        self.disconnected = disconnected


@dataclass(frozen=True)
class PgReads:
    """What a scoring call reads: the locked session's token fields (None: no session), scoring_config, the inputs
    (None when a question was answered more than once: the caller's portable reader then picks the latest answer),
    and whether a profile exists with its submitted_at."""

    locked: tuple[str | None, datetime | None] | None
    config: dict[str, object]
    inputs: scoring.SessionInputs | None
    profile_exists: bool
    submitted_at: datetime | None


@dataclass(frozen=True)
class CompiledWrite:
    """A SQLAlchemy write construct compiled for one dialect, with the bind processors of its parameters."""

    sql: str
    processors: Mapping[str, Callable[[Any], Any]]

    def params(self, values: Mapping[str, object]) -> dict[str, object]:
        out = dict(values)
        for name, process in self.processors.items():
            if name in out:
                out[name] = process(out[name])
        return out


_COMPILED: dict[tuple[object, ...], CompiledWrite] = {}
_COMPILED_LOCK = threading.Lock()


def compiled(
    dialect: Dialect, key: tuple[object, ...], build: Callable[[], Any], column_keys: Sequence[str] | None
) -> CompiledWrite:
    """The construct ``build()`` compiled for ``dialect`` (for an INSERT, of ``column_keys``), cached by key."""
    full_key = (dialect.name, *key)
    found = _COMPILED.get(full_key)
    if found is not None:
        return found
    done = build().compile(dialect=dialect, column_keys=list(column_keys) if column_keys is not None else None)
    processors: dict[str, Callable[[Any], Any]] = {}
    for name, bind in done.binds.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors[name] = process
    result = CompiledWrite(str(done), processors)
    with _COMPILED_LOCK:
        _COMPILED[full_key] = result
    return result


class PgConnection:
    """A parked psycopg connection and the cursors it keeps, one per statement text.

    A psycopg cursor that runs the same query object again keeps its adaptation state (which dumper serves each
    parameter type); a new cursor per statement looked all of them up again, on every call.
    """

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw
        self._cursors: dict[str, psycopg.Cursor[Any]] = {}

    def cursor(self, statement: str) -> psycopg.Cursor[Any]:
        """This connection's cursor for ``statement`` (one statement at a time each: calls do not share it)."""
        found = self._cursors.get(statement)
        if found is None:
            found = self._cursors[statement] = self.raw.cursor()
        return found

    @property
    def broken(self) -> bool:
        return self.raw.broken or self.raw.closed


class ParkedConnections:
    """The engine's pool connections the fast path keeps checked out between calls, one call at a time each."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._idle: list[tuple[PoolProxiedConnection, PgConnection]] = []
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self, *, fresh: bool = False) -> Iterator[tuple[PgConnection, bool]]:
        """A connection for one transaction and whether it was parked (reused) rather than checked out.

        The body commits (``run_pipelined(commit=True)``); whatever it leaves open is rolled back. A connection that
        broke is invalidated (the pool drops it); a healthy one is parked for the next call. ``fresh`` skips the
        parked ones (the retry after a parked connection turned out dead).
        """
        parked: tuple[PoolProxiedConnection, PgConnection] | None = None
        if not fresh:
            with self._lock:
                parked = self._idle.pop() if self._idle else None
        reused = parked is not None
        if parked is None:
            pooled = self.engine.raw_connection()
            raw = pooled.driver_connection
            if not isinstance(raw, psycopg.Connection):
                pooled.close()
                raise TypeError("the pipelined path needs a psycopg connection")
            parked = (pooled, PgConnection(raw))
        pooled, conn = parked
        raw = conn.raw
        try:
            yield conn, reused
        finally:
            if not conn.broken and raw.pgconn.transaction_status != TransactionStatus.IDLE:
                with suppress(psycopg.Error):
                    raw.rollback()
            if conn.broken or raw.pgconn.transaction_status != TransactionStatus.IDLE:
                pooled.invalidate()
                pooled.close()
            else:
                with self._lock:
                    self._idle.append(parked)

    def dispose(self) -> None:
        """Returns every parked connection to the pool."""
        with self._lock:
            parked, self._idle = self._idle, []
        for pooled, _ in parked:
            pooled.close()


def _utc(value: datetime | None) -> datetime | None:
    # As UTCTimestamp reads it: aware UTC whatever the connection's TimeZone.
    if value is None:
        return None
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def read_call(conn: PgConnection, session_id: str, *, with_fc_responses: bool) -> PgReads:
    """Locks the session row and reads every input of a scoring call: one round trip (BEGIN goes with it)."""
    raw = conn.raw
    params = {
        "id": session_id,
        "version": scoring.FC_VERSION,
        "kind": scoring.FC_KIND,
        "with_fc": with_fc_responses,
    }
    lock = conn.cursor(_LOCK_SQL)
    inputs = conn.cursor(_INPUTS_SQL)
    try:
        with raw.pipeline():
            lock.execute(_LOCK_SQL, {"id": session_id})
            inputs.execute(_INPUTS_SQL, params)
    except psycopg.Error as exc:
        raise PipelineStepFailed(0 if lock.pgresult is None else 1, exc, raw.broken or raw.closed) from exc
    locked_row = lock.fetchone()
    row = inputs.fetchone()
    assert row is not None
    config, qids, values, blocks, options, fc_existing, found, submitted_at = row
    locked = None if locked_row is None else (locked_row[0], _utc(locked_row[1]))
    qids, values = qids or [], values or []
    session_inputs: scoring.SessionInputs | None = None
    if len(set(qids)) == len(qids):
        # Question ids are unique here, so sorting the pairs orders them by question id alone.
        answers = sorted(zip(qids, values, strict=True))
        session_inputs = scoring.SessionInputs(
            session_id,
            [{"question_id": q, "answer_value": v} for q, v in answers],
            [{"block_id": b, "option_id": o} for b, o in zip(blocks or (), options or (), strict=True)],
            fc_existing,
        )
    return PgReads(locked, dict(config or {}), session_inputs, bool(found), _utc(submitted_at))


def run_pipelined(
    conn: PgConnection,
    steps: Sequence[tuple[CompiledWrite, Sequence[Mapping[str, object]]]],
    *,
    commit: bool = False,
) -> None:
    """Runs each step (a statement with one or more parameter sets) in order, then COMMIT if ``commit``, in one round
    trip.

    Raises ``PipelineStepFailed`` naming the first step that failed (``len(steps)``: the COMMIT); the server skipped
    the steps after it.
    """
    raw = conn.raw
    cursors = []
    try:
        with raw.pipeline():
            for statement, rows in steps:
                cursor = conn.cursor(statement.sql)
                cursors.append(cursor)
                if len(rows) == 1:
                    cursor.execute(statement.sql, statement.params(rows[0]))
                else:
                    cursor.executemany(statement.sql, [statement.params(r) for r in rows])
            if commit:
                raw.commit()
    except psycopg.Error as exc:
        # Results are handed to the cursors in order: the first one without a result is the one that failed.
        failed = next((i for i, c in enumerate(cursors) if c.pgresult is None), len(cursors))
        raise PipelineStepFailed(failed, exc, raw.broken or raw.closed) from exc
