"""One SQLAlchemy engine per environment, dialect capabilities, portable column types, driver-error translation.

Phase code asks ``Database.caps`` what the dialect can do (RLS, advisory locks, ``SKIP LOCKED``, ``COPY``) instead of
branching on the dialect name. Driver exceptions are translated here, once, into ``gatefill.errors`` types whose
messages carry the URL with its password masked and are scrubbed of the password itself.

SQLite specifics: every connection runs with ``foreign_keys=ON``, WAL journaling and a busy timeout, and write
transactions open with ``BEGIN IMMEDIATE`` so that two writers queue on the lock instead of failing on an upgrade;
JSON is stored as TEXT and timestamps as fixed-width ISO-8601 UTC text (``2025-09-17T08:00:00.000000Z``), which sorts
and compares correctly as text.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from gatefill.config import Environment
from gatefill.errors import DatabaseError, DatabaseUnreachable

__all__ = [
    "Capabilities",
    "Database",
    "JSONValue",
    "PoolerFinding",
    "TextArray",
    "UTCTimestamp",
    "UUIDText",
    "canonical_json",
    "database_now",
    "detect_pooler",
    "format_utc",
    "insert_rows",
    "parse_utc",
]

_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_utc(value: datetime) -> str:
    """Fixed-width ISO-8601 UTC text; naive datetimes are taken to be UTC already."""
    # The format has no zone field, so an instant already in UTC is formatted as it is (a plan formats one per
    # candidate: converting each first cost more than the formatting).
    if value.tzinfo is not None and value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.strftime(_ISO_FORMAT)


def parse_utc(text: str) -> datetime:
    """Parses ISO-8601 text (``Z`` or an offset, or none meaning UTC) into an aware UTC datetime."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T", 1))
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def dumps_json(value: object) -> str:
    """Compact JSON as the platform writes it (integral floats as integers, as JavaScript prints them)."""
    return json.dumps(_js_numbers(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: object) -> str:
    """Sorted-key compact JSON with JS number forms: the same text before and after a trip through any JSON column."""
    return json.dumps(_js_numbers(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})


def _js_numbers(value: object) -> object:
    """``value`` with every integral float (below 1e21) made an int, containers copied as dicts and lists.

    JSON.stringify prints 90.0 as 90; jsonb keeps "90.0" as written, so values are normalised before sending. This
    runs over every JSON document gatefill writes (plans, ledger images, rows), so the exact built-in types are
    dispatched on first and plain scalars inside containers are not even passed down; subclasses (enums, ordered
    dicts) take the general ``isinstance`` rules, which give the same results.
    """
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return value
    if kind is dict:
        plain = _PLAIN_SCALARS
        return {k: v if type(v) in plain else _js_numbers(v) for k, v in cast("dict[Any, Any]", value).items()}
    if kind is list or kind is tuple:
        plain = _PLAIN_SCALARS
        return [v if type(v) in plain else _js_numbers(v) for v in cast("list[Any]", value)]
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 1e21 else value
    if isinstance(value, dict):
        return {k: _js_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_js_numbers(v) for v in value]
    return value


class UUIDText(sa.types.TypeDecorator[str]):
    """A UUID kept as lower-case hyphenated text in Python: native ``uuid`` on Postgres, TEXT on SQLite."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.UUID(as_uuid=False))
        return dialect.type_descriptor(sa.Text())


class JSONValue(sa.types.TypeDecorator[Any]):
    """A JSON document: ``jsonb`` on Postgres, compact JSON text on SQLite; Python sees decoded values."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB(none_as_null=True))
        return dialect.type_descriptor(sa.Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return _js_numbers(value)
        return dumps_json(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return json.loads(value)


class TextArray(sa.types.TypeDecorator[list[str]]):
    """A list of strings: ``text[]`` on Postgres, a JSON array in TEXT on SQLite."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(sa.Text()))
        return dialect.type_descriptor(sa.Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return json.dumps(list(value), ensure_ascii=False)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None or dialect.name == "postgresql":
            return value
        return json.loads(value)


class UTCTimestamp(sa.types.TypeDecorator[datetime]):
    """An instant: ``timestamptz`` on Postgres, fixed-width ISO-8601 UTC text on SQLite; Python sees aware UTC."""

    impl = sa.Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.DateTime(timezone=True))
        return dialect.type_descriptor(sa.Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = parse_utc(value)
        if dialect.name == "postgresql":
            return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return format_utc(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            return parse_utc(value)
        if isinstance(value, datetime):
            return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return value


@dataclass(frozen=True)
class Capabilities:
    """What the connected dialect (and the pooler in front of it) can do; phase code branches on these flags, never
    on the dialect's name."""

    dialect: str
    row_level_security: bool
    roles: bool
    advisory_locks: bool
    skip_locked: bool
    copy_from: bool
    #: SQL expression for "now" as stored in a UTCTimestamp column.
    now_sql: str
    #: A connection keeps its session (settings, prepared statements) from one transaction to the next; False
    #: behind a transaction-mode pooler, which hands each transaction whichever server connection is free.
    session_state: bool = True
    #: The server's statistics views (replication, WAL, checkpoints, vacuum, locks), which apply's health
    #: indicators read (``gatefill.indicators``).
    server_statistics: bool = False
    #: Another connection may read while this one writes, without waiting for it (apply reads its next page of work
    #: ahead); SQLite's single writer would make such a reader wait or fail with "database is locked".
    concurrent_reads: bool = False


POSTGRES_CAPS = Capabilities(
    "postgresql", True, True, True, True, True, "now()", server_statistics=True, concurrent_reads=True
)
POOLED_POSTGRES_CAPS = replace(POSTGRES_CAPS, session_state=False)
SQLITE_CAPS = Capabilities("sqlite", False, False, False, False, False, "strftime('%Y-%m-%dT%H:%M:%f000Z','now')")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


class Database:
    """The engine of one environment plus the error boundary around every use of it."""

    def __init__(
        self, env: Environment, *, create: bool = False, pool_size: int = 5, statement_timeout: float | None = None
    ) -> None:
        """``statement_timeout`` (seconds, Postgres only) bounds every statement on the engine's connections."""
        self.env = env
        self.display_url = env.display_url
        #: Statements a raw (pipelined) transaction sends after its BEGIN when the session cannot hold them.
        self.transaction_settings: tuple[str, ...] = ()
        url = env.url
        self._secret = url.password if isinstance(url.password, str) and url.password else None
        if env.is_sqlite:
            self.caps = SQLITE_CAPS
            path = url.database
            if path and path != ":memory:" and not create and not Path(path).is_file():
                raise DatabaseUnreachable(self.display_url, "no such database file (run `gatefill db init`)")
            if path and path != ":memory:" and create:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None hands transaction control to us, so BEGIN IMMEDIATE below really is the start.
            self.engine: Engine = sa.create_engine(
                url, connect_args={"isolation_level": None, "timeout": 30, "check_same_thread": False}
            )
            sa.event.listen(self.engine, "connect", _sqlite_on_connect)
            sa.event.listen(self.engine, "begin", _sqlite_on_begin)
        else:
            self.caps = POSTGRES_CAPS if env.pooler != "transaction" else POOLED_POSTGRES_CAPS
            connect_args: dict[str, Any] = {"connect_timeout": 5, "application_name": "gatefill"}
            if not self.caps.session_state:
                # psycopg prepares a statement (``_pg3_N``) on the fifth use; behind a transaction pooler the next
                # transaction may run on a server connection that never saw it ("does not exist") or already has
                # one of that name from another client ("already exists").
                connect_args["prepare_threshold"] = None
            self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=pool_size, connect_args=connect_args)
            if statement_timeout is not None:
                milliseconds = max(1, round(statement_timeout * 1000))
                if self.caps.session_state:
                    sa.event.listen(self.engine, "connect", partial(_pg_bound_statements, milliseconds))
                else:
                    self.transaction_settings = (f"SET LOCAL statement_timeout = {int(milliseconds)}",)
                    # A session SET would stay on the pooled server connection for the next client: each
                    # transaction sets it for itself instead (one more statement, no more round trips for the
                    # pipelined paths, which send it with their BEGIN).
                    sa.event.listen(self.engine, "begin", partial(_pg_local_settings, self.transaction_settings))

    def scrub(self, text: str) -> str:
        """The text with the database password (if any) masked."""
        return text.replace(self._secret, "***") if self._secret else text

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Re-raises driver errors as gatefill errors with masked, single-line messages."""
        try:
            yield
        except DBAPIError as exc:
            reason = self.scrub(_first_line(str(exc.orig)))
            if exc.connection_invalidated or _is_connect_error(exc):
                raise DatabaseUnreachable(self.display_url, reason) from exc
            raise DatabaseError(f"{self.display_url}: {reason}") from exc
        except SQLAlchemyError as exc:
            raise DatabaseError(f"{self.display_url}: {self.scrub(_first_line(str(exc)))}") from exc
        except self.engine.dialect.loaded_dbapi.Error as exc:
            # Raised below SQLAlchemy's wrapping: a raw pool checkout (engine.raw_connection) that cannot connect.
            raise self.driver_error(exc) from exc

    def driver_error(self, exc: Exception, *, disconnected: bool = False) -> DatabaseError:
        """The gatefill error for a driver exception raised below SQLAlchemy (a raw psycopg pipeline), masked like
        ``translate_errors``: ``DatabaseUnreachable`` when the connection is gone, else ``DatabaseError``."""
        reason = self.scrub(_first_line(str(exc)))
        text = str(exc).lower()
        if disconnected or (type(exc).__name__ == "OperationalError" and any(m in text for m in _CONNECT_MARKERS)):
            return DatabaseUnreachable(self.display_url, reason)
        return DatabaseError(f"{self.display_url}: {reason}")

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection for reads (and explicit transactions), inside the error boundary."""
        with self.translate_errors(), self.engine.connect() as conn:
            if self.caps.dialect == "sqlite":
                # Reads take a deferred BEGIN so they never queue behind a writer in WAL mode.
                conn = conn.execution_options(sqlite_begin="DEFERRED")
            yield conn

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A write transaction that commits on success and rolls back on any error."""
        with self.translate_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read_only(self) -> Iterator[Connection]:
        """A transaction that cannot write, rolled back at the end: where a user's query (``--throttle-query``)
        runs, so that it can only read."""
        sqlite = self.caps.dialect == "sqlite"
        with self.connect() as conn, conn.begin() as tx:
            conn.exec_driver_sql("PRAGMA query_only = ON" if sqlite else "SET TRANSACTION READ ONLY")
            try:
                yield conn
            finally:
                if sqlite:  # a connection setting, not a transaction's: the pooled connection must write again
                    conn.exec_driver_sql("PRAGMA query_only = OFF")
                tx.rollback()

    def ping(self) -> None:
        """Proves the database answers; raises ``DatabaseUnreachable`` otherwise."""
        with self.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()


_CONNECT_MARKERS = (
    "connection refused",
    "could not connect",
    "connection failed",
    "unable to open database",
    "timeout",
)


#: SQLSTATE of a statement the server cancelled (statement_timeout, pg_cancel_backend): the connection is fine.
_QUERY_CANCELED = "57014"


def _is_connect_error(exc: DBAPIError) -> bool:
    if getattr(exc.orig, "sqlstate", None) == _QUERY_CANCELED:
        return False
    text = str(exc.orig).lower()
    return isinstance(exc, sa.exc.OperationalError) and any(m in text for m in _CONNECT_MARKERS)


def _sqlite_on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _pg_bound_statements(milliseconds: int, dbapi_conn: Any, _record: object) -> None:
    """A session setting on each new connection, so a statement stuck behind a lock (or a runaway plan) ends on the
    server even when nobody is left to cancel it: a call given up on, a thread still waiting for its answer."""
    with dbapi_conn.cursor() as cur:
        cur.execute(f"SET statement_timeout = {int(milliseconds)}")
    dbapi_conn.commit()


def _pg_local_settings(statements: Sequence[str], conn: Connection) -> None:
    """The same bound as ``_pg_bound_statements`` for one transaction: behind a transaction pooler the session is
    not ours, so nothing may outlive the transaction."""
    for statement in statements:
        conn.exec_driver_sql(statement)


def _sqlite_on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
    conn.exec_driver_sql(f"BEGIN {mode}")


@dataclass(frozen=True)
class PoolerFinding:
    """What ``detect_pooler`` saw between gatefill and the server, against the environment's ``pooler`` setting."""

    configured: str
    #: "transaction" (transactions move between server connections), "proxy" (the server listens on another port
    #: than the URL names: a session pooler or a plain proxy), "direct", or "n/a" (SQLite).
    detected: str
    evidence: str

    @property
    def mismatch(self) -> bool:
        """The setting promises a session that the connection does not keep: commands would break."""
        return self.detected == "transaction" and self.configured != "transaction"

    def describe(self) -> str:
        if self.mismatch:
            return (
                f"MISMATCH: pooler = {self.configured!r} but {self.evidence}: a transaction-mode pooler; "
                'set pooler = "transaction" for this environment'
            )
        if self.detected == "n/a":
            return self.evidence
        advice = {
            "transaction": "pooler = 'transaction' fits",
            "proxy": "fine for pooler = 'none' or 'session' (a session pooler keeps the session)",
            "direct": "pooler = 'none' fits"
            + (
                "; 'transaction' works too but gives up prepared statements" if self.configured == "transaction" else ""
            ),
        }[self.detected]
        return f"{self.evidence} ({advice}; configured: {self.configured!r})"


def detect_pooler(db: Database) -> PoolerFinding:
    """Read-only: which server connection (backend pid) runs each of a few short transactions on two connections
    held open side by side. A direct connection, or a session pooler, keeps one backend per connection, never shared;
    a transaction pooler moves transactions between backends, and hands one backend to both connections in turn.
    The order (a, b, a, a, b, b, a) catches both ways a pool hands out its connections: the last one released (one
    backend shared) and round robin (a connection moving between backends)."""
    configured = db.env.pooler
    if db.caps.dialect != "postgresql":
        return PoolerFinding(configured, "n/a", "SQLite file: no server connection, no pooler")
    seen: dict[str, list[int]] = {"a": [], "b": []}
    port: int | None = None
    with db.translate_errors(), db.engine.connect() as a, db.engine.connect() as b:
        for name in "abaabba":
            conn = a if name == "a" else b
            with conn.begin():
                pid, port = conn.execute(sa.text("SELECT pg_backend_pid(), inet_server_port()")).one()
            seen[name].append(int(pid))
    shared = set(seen["a"]) & set(seen["b"])
    moved = [name for name, pids in seen.items() if len(set(pids)) > 1]
    if shared:
        pids = ", ".join(str(p) for p in sorted(shared))
        what = f"two connections open side by side both ran transactions on server backend {pids}"
        return PoolerFinding(configured, "transaction", what)
    if moved:
        pids = ", ".join(str(p) for p in dict.fromkeys(seen[moved[0]]))
        what = f"one connection's {len(seen[moved[0]])} transactions ran on server backends {pids}"
        return PoolerFinding(configured, "transaction", what)
    url_port = db.env.url.port or 5432
    if port is not None and int(port) != url_port:
        what = f"the server listens on port {port}, the URL names {url_port}, each connection kept its backend"
        return PoolerFinding(configured, "proxy", what)
    transactions = len(seen["a"]) + len(seen["b"])
    return PoolerFinding(configured, "direct", f"each connection kept its own backend over {transactions} transactions")


def database_now(conn: Connection) -> datetime:
    """The database server's clock now (aware UTC): the one clock every process sharing the database agrees on,
    which is what lease expiry is judged by."""
    if conn.dialect.name == "postgresql":
        value: datetime = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
        return value.astimezone(UTC)
    return parse_utc(conn.execute(sa.text("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now')")).scalar_one())


def insert_rows(conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Inserts ``rows`` (each a mapping of the same column names) into ``table`` in the caller's transaction.

    On Postgres with one COPY: the bulk writers of apply and the ledger send whole rows with JSON documents, and a
    multi-row INSERT through SQLAlchemy's per-value bind processing cost several times what COPY does, on both sides
    of the connection. Values are converted as the column types bind them (JSON as ``dumps_json`` text, so the
    stored ``jsonb`` equals what an INSERT stores), triggers fire as for an INSERT, and a failure is raised as the
    ``sqlalchemy.exc.DBAPIError`` an INSERT would raise (``IntegrityError`` for a unique violation; a lost connection
    invalidated). Elsewhere it is a plain executemany INSERT.
    """
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(table.insert(), list(rows))
        return
    names = list(rows[0])
    convert = [_copy_converter(table.c[name].type, conn.dialect) for name in names]
    columns = ", ".join(conn.dialect.identifier_preparer.quote(name) for name in names)
    statement = f"COPY {conn.dialect.identifier_preparer.format_table(table)} ({columns}) FROM STDIN"
    fairy = conn.connection
    driver = fairy.driver_connection
    try:
        with fairy.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[attr-defined]
            for row in rows:
                copy.write_row([c(row[name]) for c, name in zip(convert, names, strict=True)])
    except conn.dialect.loaded_dbapi.Error as exc:
        lost = conn.dialect.is_disconnect(exc, driver, None)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            statement, None, exc, conn.dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=conn.dialect
        ) from exc


def _copy_converter(column_type: sa.types.TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any]:
    """How a value of this column type goes into COPY: what its type would bind, JSON as compact text."""
    if isinstance(column_type, JSONValue):
        return lambda value: None if value is None else dumps_json(value)
    process = column_type.bind_processor(dialect)
    return process if process is not None else lambda value: value
