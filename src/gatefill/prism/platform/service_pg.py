"""The Postgres round trips of ``PrismService``'s scoring calls: the reads in one round trip, the writes in another.

A finalize through SQLAlchemy took ten statements, each a round trip plus the library's per-statement work, and
decoded ~250 answer rows one by one: about 9 ms of Python per call, twelve times the scoring itself. Here the row
lock and one query for every input go to the server together in one pipeline (the server still runs them in order,
and the second statement's snapshot is taken after the lock is granted, so it sees what a concurrent call for the
same session committed), and the writes and the COMMIT go together too. The write statements are the SQLAlchemy
constructs the portable path executes, compiled once per process for the connection's dialect, and their values
pass through SQLAlchemy's own bind processors for those columns and psycopg's own dumpers, so the rows written equal
the portable path's byte for byte.

The pipeline is driven through libpq (``psycopg.pq``) rather than psycopg's cursors: a cursor in pipeline mode
flushes the socket after every statement, and libpq's send runs while holding the GIL. On two cores with Postgres on
the same machine each send that wakes the server can leave the sending thread descheduled with the GIL in hand: with
twenty clients, 40 % of a worker's GIL time was spent inside ``send``. ``PgConnection.run`` queues a whole batch
(BEGIN or COMMIT included) and sends it with one flush, then waits for the results with the GIL released. Each
statement is prepared on the connection the first time it is sent with a given set of parameter types (in the same
batch), so the steady state sends no SQL text; a connection configured with ``prepare_threshold=None`` (a transaction
pooler that cannot keep prepared statements) gets unnamed statements instead. ``run_async`` sends the same batch and
waits for its results on the running event loop (``loop.add_reader``) instead of blocking a thread: the functions
server's finalize calls run that way, with no thread hand-off at all.

The connections are the engine's pool connections, but a call does not check one out of the pool each time: the
pool's checkout pings the server (``pool_pre_ping``, one more statement and round trip per call) and SQLAlchemy's
connection and transaction objects cost more Python than the call's own reads. ``ParkedConnections`` keeps the
connections it has used checked out and reuses them. A parked connection that the server has dropped fails on the
first batch of a call, which only reads; the caller then retries once on a fresh connection, which is what the ping
was for.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import select
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import ExecStatus, TransactionStatus
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.pool import PoolProxiedConnection

from gatefill.prism import scoring

__all__ = [
    "Batch",
    "CompiledWrite",
    "ParkedConnections",
    "PgConnection",
    "PgReads",
    "PgStatement",
    "PipelineStepFailed",
    "compiled",
    "read_batch",
    "read_call",
    "read_results",
    "run_pipelined",
    "write_batch",
]

_PLACEHOLDER = re.compile(r"%\((?P<name>[^)]+)\)s|%%")


@dataclass(frozen=True)
class PgStatement:
    """A statement in the server's own placeholder style (``$1``, ``$2``, ...) and the parameter names behind each."""

    sql: bytes
    names: tuple[str, ...]

    @classmethod
    def from_pyformat(cls, sql: str) -> PgStatement:
        """``sql`` with ``%(name)s`` placeholders (``%%`` a literal ``%``), as psycopg and SQLAlchemy write them."""
        names: list[str] = []
        numbers: dict[str, int] = {}

        def number(match: re.Match[str]) -> str:
            name = match.group("name")
            if name is None:
                return "%"
            if name not in numbers:
                names.append(name)
                numbers[name] = len(names)
            return f"${numbers[name]}"

        return cls(_PLACEHOLDER.sub(number, sql).encode("utf-8"), tuple(names))

    def values(self, params: Mapping[str, object]) -> list[object]:
        return [params[name] for name in self.names]


_BEGIN = PgStatement(b"BEGIN", ())
_COMMIT = PgStatement(b"COMMIT", ())
_ROLLBACK = PgStatement(b"ROLLBACK", ())
_LOCK = PgStatement.from_pyformat(
    "SELECT share_token, share_token_expires_at FROM assessment_sessions WHERE id = %(id)s::uuid FOR UPDATE"
)

# One row: scoring_config as an object, the answers and the FC answers in (answered_at, block_id) order as two arrays
# each, the stored v1.2/functions FC value and the existing profile's submitted_at. Every part is one index lookup on
# the session id. The answers come in no particular order (both arrays in the same one) and are put in question order
# here, as ``load_session_inputs`` reads them: two ordered aggregates sorted the 248 rows twice on the server, which
# cost Postgres more than sorting them once costs Python.
_INPUTS = PgStatement.from_pyformat(
    """
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
)


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

    statement: PgStatement
    processors: Mapping[str, Callable[[Any], Any]]

    def values(self, params: Mapping[str, object]) -> list[object]:
        """The statement's positional values for ``params``, each through its column's bind processor."""
        out = self.statement.values(params)
        for i, name in enumerate(self.statement.names):
            process = self.processors.get(name)
            if process is not None:
                out[i] = process(out[i])
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
    result = CompiledWrite(PgStatement.from_pyformat(str(done)), processors)
    with _COMPILED_LOCK:
        _COMPILED[full_key] = result
    return result


# Names of the statements this process prepares: never reused, so a connection that comes back from the pool with
# statements an earlier PgConnection prepared on it cannot collide with them.
_STATEMENT_NAMES = itertools.count()
_AUTO_FORMATS: dict[int, list[PyFormat]] = {}
# A prepared statement's cache key: its text and the parameter types it was prepared with.
_PreparedKey = tuple[bytes, tuple[int, ...]]
# For each command libpq will answer: its index in the batch and, for a PREPARE, its cache key.
_Expected = tuple[int, _PreparedKey | None]
#: Statements to send together, each with its positional values (empty: none).
Batch = Sequence[tuple[PgStatement, Sequence[object]]]


class PgConnection:
    """A parked psycopg connection whose batches go through libpq's pipeline: one flush out, results read to the sync.

    One batch at a time (calls do not share a connection). Outside ``run`` the connection is an ordinary psycopg
    connection in the state the batch left (a transaction open after BEGIN, idle after COMMIT), so psycopg's own
    ``rollback`` still cleans up after a failed call.
    """

    def __init__(self, raw: psycopg.Connection[Any], settings: Sequence[str] = ()) -> None:
        self.raw = raw
        self.pgconn = raw.pgconn
        #: Sent after each BEGIN (``SET LOCAL ...``) when the session cannot keep them (a transaction pooler).
        self.settings = tuple(PgStatement(text.encode("utf-8"), ()) for text in settings)
        # Dumps parameters and loads rows exactly as this connection's cursors would (its adapters, its encoding).
        self.adapt = Transformer(raw)
        self.prepare = raw.prepare_threshold is not None
        self._prepared: dict[_PreparedKey, bytes] = {}
        self._poll = select.poll()
        self._poll.register(self.pgconn.socket, select.POLLIN)

    @property
    def broken(self) -> bool:
        return self.raw.broken or self.raw.closed

    @property
    def disconnected(self) -> bool:
        return self.pgconn.status == pq.ConnStatus.BAD

    def run(self, batch: Batch) -> list[pq.abc.PGresult]:
        """Sends every statement of ``batch`` with its values in one pipeline and one flush; returns each one's result.

        Raises ``PipelineStepFailed`` naming the first statement that failed (the server skipped the ones after it);
        when the connection itself failed, the first statement without a result.
        """
        expected: list[_Expected] = []
        groups: list[list[pq.abc.PGresult]] = []
        with self._batch(batch, expected, groups):
            for writable in self._exchange(groups):
                self._wait(writable)
        return self._results(expected, groups)

    async def run_async(self, batch: Batch) -> list[pq.abc.PGresult]:
        """``run`` on the running event loop: the same batch and results, waiting for the socket without a thread."""
        expected: list[_Expected] = []
        groups: list[list[pq.abc.PGresult]] = []
        with self._batch(batch, expected, groups):
            for writable in self._exchange(groups):
                await self._ready(writable=writable)
        return self._results(expected, groups)

    @contextmanager
    def _batch(self, batch: Batch, expected: list[_Expected], groups: list[list[pq.abc.PGresult]]) -> Iterator[None]:
        """Queues ``batch`` in pipeline mode for the body to exchange; a driver error becomes ``PipelineStepFailed``
        and pipeline mode is left whatever happened."""
        try:
            try:
                self._start(batch, expected)
                yield
            except psycopg.Error as exc:
                raise self._lost(batch, expected, groups, exc) from exc
        finally:
            self._end()

    def _exchange(self, groups: list[list[pq.abc.PGresult]]) -> Iterator[bool]:
        """Flushes the queued batch, then appends every command's results to ``groups``, in order, up to the sync
        point. Yields whenever the socket is not ready: True to wait until it can be written (or read), False until
        it can be read; the driver waits, on a thread or on the event loop."""
        pgconn = self.pgconn
        while pgconn.flush():
            # The socket's buffer is full: wait until it drains, reading what the server sends meanwhile.
            yield True
            pgconn.consume_input()
        current: list[pq.abc.PGresult] = []
        while True:
            if pgconn.is_busy():
                yield False
                pgconn.consume_input()
                continue
            result = pgconn.get_result()
            if result is None:
                groups.append(current)
                current = []
            elif result.status == ExecStatus.PIPELINE_SYNC:
                return
            else:
                current.append(result)

    def _start(self, batch: Batch, expected: list[_Expected]) -> None:
        self.pgconn.enter_pipeline_mode()
        for index, (statement, values) in enumerate(batch):
            self._send(index, statement, values, expected)
        self.pgconn.pipeline_sync()

    def _lost(
        self, batch: Batch, expected: list[_Expected], groups: list[list[pq.abc.PGresult]], exc: psycopg.Error
    ) -> PipelineStepFailed:
        """The failure of a batch whose connection failed: named by its first command without a result."""
        for _, key in expected[len(groups) :]:
            if key is not None:
                self._prepared.pop(key, None)
        failed = expected[len(groups)][0] if len(groups) < len(expected) else len(batch)
        return PipelineStepFailed(failed, exc, self.disconnected)

    def _end(self) -> None:
        pgconn = self.pgconn
        if pgconn.pipeline_status != pq.PipelineStatus.OFF:
            try:
                pgconn.exit_pipeline_mode()
            except psycopg.Error:
                # Results still pending (the connection failed mid-batch): it cannot be used again.
                self.raw.close()

    def _results(self, expected: list[_Expected], groups: list[list[pq.abc.PGresult]]) -> list[pq.abc.PGresult]:
        results: list[pq.abc.PGresult] = []
        for position, ((index, key), group) in enumerate(zip(expected, groups, strict=True)):
            status = group[0].status if group else ExecStatus.FATAL_ERROR
            if status not in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK):
                # This command failed (the ones after it were skipped): the PREPAREs among them never happened.
                for _, skipped in expected[position:]:
                    if skipped is not None:
                        self._prepared.pop(skipped, None)
                error = self._error(group[0] if group else None)
                if isinstance(error, psycopg.errors.InvalidSqlStatementName):
                    # Someone deallocated our statements (DEALLOCATE ALL, DISCARD ALL): prepare afresh next time.
                    self._prepared.clear()
                raise PipelineStepFailed(index, error, self.disconnected)
            if key is None:
                results.append(group[0])
        return results

    def rollback(self) -> None:
        """Rolls the open transaction back, keeping the prepared statements.

        Not psycopg's ``rollback``: it also deallocates every prepared statement of the connection (it cannot tell
        whether its own survived the transaction), ours included, which the next batch would then miss.
        """
        self.run([(_ROLLBACK, ())])

    async def rollback_async(self) -> None:
        await self.run_async([(_ROLLBACK, ())])

    def _send(
        self,
        index: int,
        statement: PgStatement,
        values: Sequence[object],
        expected: list[_Expected],
    ) -> None:
        pgconn = self.pgconn
        if not values:
            pgconn.send_query_params(statement.sql, None)
            expected.append((index, None))
            return
        formats = _AUTO_FORMATS.get(len(values))
        if formats is None:
            formats = _AUTO_FORMATS.setdefault(len(values), [PyFormat.AUTO] * len(values))
        params = self.adapt.dump_sequence(values, formats)
        types = tuple(self.adapt.types or ())
        if not self.prepare:
            pgconn.send_query_params(statement.sql, params, types, self.adapt.formats)
            expected.append((index, None))
            return
        key = (statement.sql, types)
        name = self._prepared.get(key)
        if name is None:
            # Prepared in this batch, just before its first use; forgotten again if the PREPARE does not succeed.
            name = self._prepared[key] = b"gf_%d" % next(_STATEMENT_NAMES)
            pgconn.send_prepare(name, statement.sql, types)
            expected.append((index, key))
        pgconn.send_query_prepared(name, params, self.adapt.formats)
        expected.append((index, None))

    def _wait(self, writable: bool) -> None:
        """Waits, without the GIL, until the socket can be read (or written, for ``writable``), or has failed."""
        fd = self.pgconn.socket
        if writable:
            self._poll.modify(fd, select.POLLIN | select.POLLOUT)
        try:
            while not self._poll.poll():
                pass
        finally:
            if writable:
                self._poll.modify(fd, select.POLLIN)

    async def _ready(self, *, writable: bool) -> None:
        """Waits on the event loop until the socket can be read (or written, or either for ``writable``)."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.pgconn.socket

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        if writable:
            loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
            if writable:
                loop.remove_writer(fd)

    def _error(self, result: pq.abc.PGresult | None) -> psycopg.Error:
        if result is None:
            return psycopg.OperationalError("no result from the server")
        return psycopg.errors.error_from_result(result, encoding=self.raw.info.encoding)

    def row(self, result: pq.abc.PGresult) -> tuple[Any, ...] | None:
        """The first row of a query's result, loaded as this connection's cursors load it (None: no rows)."""
        if result.ntuples == 0:
            return None
        self.adapt.set_pgresult(result)
        row: tuple[Any, ...] = self.adapt.load_row(0, tuple)
        return row


#: A pool connection checked out for the fast path, and its pipeline.
Parked = tuple[PoolProxiedConnection, PgConnection]


def _open(conn: PgConnection) -> bool:
    """Whether a transaction was left open on a connection that still works."""
    return not conn.broken and conn.pgconn.transaction_status != TransactionStatus.IDLE


class ParkedConnections:
    """The engine's pool connections the fast path keeps checked out between calls, one call at a time each."""

    def __init__(self, engine: Engine, settings: Sequence[str] = ()) -> None:
        """``settings``: statements each transaction sends after its BEGIN (``Database.transaction_settings``)."""
        self.engine = engine
        self.settings = tuple(settings)
        self._idle: list[Parked] = []
        self._lock = threading.Lock()

    def take(self, *, fresh: bool = False) -> tuple[Parked, bool]:
        """A connection for one transaction and whether it was parked (reused) rather than checked out.

        ``fresh`` skips the parked ones (the retry after a parked connection turned out dead). A checkout from the
        pool blocks (it may connect); only the first calls of a process, or a retry, do it.
        """
        parked = None if fresh else self._parked()
        if parked is not None:
            return parked, True
        return self._checkout(), False

    def _parked(self) -> Parked | None:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def _checkout(self) -> Parked:
        pooled = self.engine.raw_connection()
        raw = pooled.driver_connection
        if not isinstance(raw, psycopg.Connection):
            pooled.close()
            raise TypeError("the pipelined path needs a psycopg connection")
        return pooled, PgConnection(raw, self.settings)

    def give_back(self, parked: Parked) -> None:
        """Parks a healthy idle connection for the next call; invalidates one that broke or is still in a
        transaction (the pool drops it)."""
        pooled, conn = parked
        if conn.broken or conn.pgconn.transaction_status != TransactionStatus.IDLE:
            pooled.invalidate()
            pooled.close()
        else:
            with self._lock:
                self._idle.append(parked)

    @contextmanager
    def transaction(self, *, fresh: bool = False) -> Iterator[tuple[PgConnection, bool]]:
        """``take`` for the body; afterwards whatever it left open is rolled back and the connection given back.

        The body commits (``run_pipelined(commit=True)``).
        """
        parked, reused = self.take(fresh=fresh)
        conn = parked[1]
        try:
            yield conn, reused
        finally:
            if _open(conn):
                with suppress(PipelineStepFailed, psycopg.Error):
                    conn.rollback()
            self.give_back(parked)

    @asynccontextmanager
    async def transaction_async(self, *, fresh: bool = False) -> AsyncIterator[tuple[PgConnection, bool]]:
        """``transaction`` for a body on the event loop (``PgConnection.run_async``).

        Without a parked connection the checkout runs on a thread: it may connect (up to the connect timeout when
        the server is down or restarting), and on the loop that would stall every other call of the process.
        """
        parked = None if fresh else self._parked()
        reused = parked is not None
        if parked is None:
            checkout = asyncio.get_running_loop().run_in_executor(None, self._checkout)
            try:
                # Shielded: a call cancelled meanwhile must not lose the connection its thread is checking out.
                parked = await asyncio.shield(checkout)
            except asyncio.CancelledError:
                checkout.add_done_callback(self._park_orphan)
                raise
        conn = parked[1]
        try:
            yield conn, reused
        finally:
            if _open(conn):
                with suppress(PipelineStepFailed, psycopg.Error):
                    await conn.rollback_async()
            self.give_back(parked)

    def _park_orphan(self, checkout: asyncio.Future[Parked]) -> None:
        """Parks the connection of a checkout whose call was cancelled before it finished (a failure: nothing)."""
        if not checkout.cancelled() and checkout.exception() is None:
            self.give_back(checkout.result())

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


def _begin(raw: psycopg.Connection[Any]) -> PgStatement:
    """The BEGIN psycopg itself would send on this connection (its isolation level and access mode, if set)."""
    words = ["BEGIN"]
    if raw.isolation_level is not None:
        words.append("ISOLATION LEVEL " + raw.isolation_level.name.replace("_", " "))
    if raw.read_only is not None:
        words.append("READ ONLY" if raw.read_only else "READ WRITE")
    if raw.deferrable is not None:
        words.append("DEFERRABLE" if raw.deferrable else "NOT DEFERRABLE")
    return _BEGIN if len(words) == 1 else PgStatement(" ".join(words).encode("ascii"), ())


def read_batch(conn: PgConnection, session_id: str, *, with_fc_responses: bool) -> Batch:
    """BEGIN (and the connection's per-transaction settings), the session row's lock and the query for every input
    of a scoring call (``read_results`` reads the last two).

    A failure names the inputs (the last statement) or, at any lower index, the lock (BEGIN went with it).
    """
    params = {
        "id": session_id,
        "version": scoring.FC_VERSION,
        "kind": scoring.FC_KIND,
        "with_fc": with_fc_responses,
    }
    return [
        (_begin(conn.raw), ()),
        *((setting, ()) for setting in conn.settings),
        (_LOCK, _LOCK.values(params)),
        (_INPUTS, _INPUTS.values(params)),
    ]


def read_results(conn: PgConnection, session_id: str, results: Sequence[pq.abc.PGresult]) -> PgReads:
    """What ``read_batch``'s statements returned."""
    lock, inputs = results[-2], results[-1]
    locked_row = conn.row(lock)
    row = conn.row(inputs)
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


def read_call(conn: PgConnection, session_id: str, *, with_fc_responses: bool) -> PgReads:
    """BEGIN, lock the session row and read every input of a scoring call: one round trip.

    Raises ``PipelineStepFailed`` (index 0: BEGIN, a setting or the lock, 1: the inputs).
    """
    batch = read_batch(conn, session_id, with_fc_responses=with_fc_responses)
    try:
        results = conn.run(batch)
    except PipelineStepFailed as exc:
        exc.index = 1 if exc.index >= len(batch) - 1 else 0
        raise
    return read_results(conn, session_id, results)


def write_batch(
    steps: Sequence[tuple[CompiledWrite, Sequence[Mapping[str, object]]]], *, commit: bool
) -> tuple[Batch, list[int]]:
    """Each step's statement once per parameter set, in order, then COMMIT if ``commit``; and for each entry of the
    batch (one more: the COMMIT) the index of its step (``len(steps)`` for the COMMIT)."""
    batch: list[tuple[PgStatement, Sequence[object]]] = []
    step_of: list[int] = []
    for index, (statement, rows) in enumerate(steps):
        for row in rows:
            batch.append((statement.statement, statement.values(row)))
            step_of.append(index)
    if commit:
        batch.append((_COMMIT, ()))
    step_of.append(len(steps))
    return batch, step_of


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
    batch, step_of = write_batch(steps, commit=commit)
    try:
        conn.run(batch)
    except PipelineStepFailed as exc:
        exc.index = step_of[min(exc.index, len(step_of) - 1)]
        raise
