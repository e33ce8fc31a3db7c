"""The declarative ``sql`` job: fill columns of one table from SQL expressions over the row, declared in gatefill.toml.

::

    [job.fill_slug]
    kind = "sql"
    table = "posts"                 # the table to fill (optional: schema = "app")
    key = "id"                      # its primary key (one or more columns: key = ["a", "b"])
    where = "slug is null"          # the rows that need work
    set = { slug = "lower(title)" } # column = SQL expression over the row
    verify = "slug is not null"     # optional: must hold for every processed row

A candidate is one row matching ``where``, found by keyset pagination over the key; its key is the key's text (several
key columns: a JSON array of texts). ``process_batch`` locks the batch's rows by key (Postgres ``SELECT … FOR UPDATE``;
SQLite's write transaction, ``BEGIN IMMEDIATE``, already holds the database's lock) and evaluates ``where`` on what it
locked: a row a live writer deleted or changed so that it no longer matches is ``already_present``, never written. The
rows that still match are updated with one statement in a savepoint, which returns their new values and whether
``verify`` holds; a row that fails (an error, ``verify``, a value the ledger cannot carry) sends the batch through one
savepoint per row, so only that row fails. Expressions run as the user wrote them, inside the batch's transaction.

The before- and after-images hold only the key and the columns the job sets (``WrittenTable.partial_images``), so
rollback updates exactly those columns back, by key, and never deletes or re-inserts a row. On Postgres every value is
read as its text form (``CAST(col AS text)``) and bound untyped, so the server converts it to the column's type: text
I/O round-trips every type exactly. On SQLite values are kept as stored; a BLOB or an infinite REAL, which a JSON
image cannot carry, fails its row rather than being written without an exact before-image.

Identifiers (schema, table, key and set columns) must match a strict pattern and exist (the table's columns and primary
key are read from the catalog) and are quoted by SQLAlchemy; expressions must be one expression (no ``;``, no comments,
balanced parentheses and quotes) that the database can plan (``EXPLAIN``, which reads no rows); data values (keys) are
always bound parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable

from gatefill import ledger
from gatefill.config import Environment
from gatefill.db import Database, canonical_json
from gatefill.errors import ConfigError, UsageError
from gatefill.images import row_digest
from gatefill.job import (
    LOCAL_EXECUTOR,
    NOT_APPLICABLE,
    Baseline,
    BatchOutcome,
    Candidate,
    ChangeSink,
    ChartGuides,
    Check,
    Executor,
    GateCheck,
    Look,
    Measurement,
    ReportTable,
    RowChange,
    SeriesBucket,
    SessionOutcome,
    SoakChecks,
    SoakSettings,
    WrittenTable,
)
from gatefill.ledger import RunStatus

__all__ = ["KIND", "SqlDefinition", "SqlJob", "SqlSoakChecks"]

KIND = "sql"
#: The keys a ``[job.NAME]`` table of kind ``sql`` may have.
_KEYS = frozenset({"kind", "table", "schema", "key", "where", "set", "verify"})
#: A plain SQL identifier: what Postgres keeps without quoting (case aside), at most NAMEDATALEN - 1 characters.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: The one category of a candidate: a row that matches ``where``.
CATEGORY = "matches_where"
#: Candidates carry a creation time for the plan's batch order; a row has none the job knows of.
_NO_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)
#: Keys per statement (discovery pages, locks, updates, verification).
_CHUNK = 500
#: Keys listed in a check's evidence.
_LISTED = 20
#: SQLSTATE of "permission denied" (Postgres).
_INSUFFICIENT_PRIVILEGE = "42501"


def _bad(job: str, what: str) -> ConfigError:
    return ConfigError(f"job '{job}' (kind sql): {what}")


# ====================================================================================================================
# The declaration


def _identifier(job: str, what: str, value: object) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise _bad(
            job,
            f"{what} {value!r} is not a plain SQL identifier (letters, digits and _, not starting with a digit, "
            "at most 63 characters)",
        )
    return value


def expression_problem(text: str) -> str | None:
    """Why ``text`` cannot be inlined as one SQL expression (None: it can): a ``;``, a comment, an unterminated quote
    or unbalanced parentheses would let it end the statement or the parentheses it is put in."""
    depth, i = 0, 0
    while i < len(text):
        ch = text[i]
        if ch in "'\"":
            backslashes = ch == "'" and i > 0 and text[i - 1] in "eE" and not _word_char(text, i - 2)
            end = _quote_end(text, i, backslashes)
            if end < 0:
                return f"unterminated {ch} quote"
            i = end + 1
            continue
        tag = _DOLLAR_TAG.match(text, i) if ch == "$" and not _word_char(text, i - 1) else None
        if tag:
            end = text.find(tag.group(0), i + len(tag.group(0)))
            if end < 0:
                return "unterminated dollar quote"
            i = end + len(tag.group(0))
            continue
        if text.startswith(("--", "/*"), i):
            return "comments are not allowed"
        if ch == ";":
            return "';' is not allowed (one expression, not statements)"
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return "unbalanced ')'"
        i += 1
    return "unbalanced '('" if depth else None


_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


def _word_char(text: str, i: int) -> bool:
    return i >= 0 and (text[i].isalnum() or text[i] == "_")


def _quote_end(text: str, start: int, backslashes: bool) -> int:
    """Where the quote opened at ``start`` closes (a doubled quote is part of it), -1 if it never does."""
    quote, i = text[start], start + 1
    while i < len(text):
        if backslashes and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if text.startswith(quote * 2, i):
                i += 2
                continue
            return i
        i += 1
    return -1


def _expression(job: str, what: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(job, f"{what} must be a non-empty SQL expression (a string)")
    problem = expression_problem(value)
    if problem:
        raise _bad(job, f"{what} {value!r} is not one SQL expression: {problem}")
    return value.strip()


def _key_columns(job: str, value: object) -> tuple[str, ...]:
    raw = [value] if isinstance(value, str) else value
    if not isinstance(raw, list) or not raw:
        raise _bad(job, "key must be the primary key's column, or a non-empty list of its columns")
    key = tuple(_identifier(job, "key column", k) for k in raw)
    if len(set(key)) != len(key):
        raise _bad(job, f"key names a column twice: {list(key)}")
    return key


@dataclass(frozen=True)
class SqlDefinition:
    """A ``[job.NAME]`` table of kind ``sql``, validated: identifiers by pattern, expressions lexically."""

    name: str
    table: str
    key: tuple[str, ...]
    where: str
    set: tuple[tuple[str, str], ...]  # (column, expression), by column name
    verify: str | None = None
    schema: str | None = None

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any]) -> SqlDefinition:
        """The definition of ``[job.NAME]``; ``ConfigError`` (one line, exit 2) for anything that cannot be run."""
        unknown = sorted(set(table) - _KEYS)
        if unknown:
            raise _bad(name, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
        for required in ("table", "key", "where", "set"):
            if required not in table:
                raise _bad(name, f"'{required}' is missing")
        schema = None if table.get("schema") is None else _identifier(name, "schema", table["schema"])
        key = _key_columns(name, table["key"])
        raw_set = table["set"]
        if not isinstance(raw_set, Mapping) or not raw_set:
            raise _bad(name, 'set must be a table of column = "SQL expression", e.g. set = { slug = "lower(title)" }')
        assignments = []
        for column, expression in sorted(raw_set.items()):
            _identifier(name, "set column", column)
            if column in key:
                raise _bad(name, f"set column '{column}' is part of the key: rows are found and restored by their key")
            assignments.append((column, _expression(name, f"set.{column}", expression)))
        verify = None if table.get("verify") is None else _expression(name, "verify", table["verify"])
        return cls(
            name=name,
            table=_identifier(name, "table", table["table"]),
            key=key,
            where=_expression(name, "where", table["where"]),
            set=tuple(assignments),
            verify=verify,
            schema=schema,
        )

    @property
    def qualified(self) -> str:
        """The table as people write it (``schema.table``), for messages and reports."""
        return f"{self.schema}.{self.table}" if self.schema else self.table

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(column for column, _ in self.set)

    @property
    def digest(self) -> str:
        """A short hash of what the job writes (table, key, where, set, verify): its version."""
        body = {
            "schema": self.schema,
            "table": self.table,
            "key": list(self.key),
            "where": self.where,
            "set": dict(self.set),
            "verify": self.verify,
        }
        return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()[:16]


# ====================================================================================================================
# SQL building blocks


class _AsText(sa.types.TypeDecorator[Any]):
    """A value read as its text form (``CAST(col AS text)``) and bound untyped, so the server casts it to the column's
    type: exact for every Postgres type. SQLite gets ``NullType`` (values as stored) through ``with_variant``."""

    impl = sa.types.NullType
    cache_ok = True

    def column_expression(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.cast(column, sa.Text)


_VALUE = _AsText().with_variant(sa.types.NullType(), "sqlite")


class _Explain(Executable, ClauseElement):
    """``EXPLAIN <statement>``: the database parses and plans the statement, checks its names and types, and reads
    no row (neither dialect executes an explained statement without ANALYZE)."""

    inherit_cache = False

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement


@compiles(_Explain)
def _compile_explain(element: _Explain, compiler: SQLCompiler, **kw: Any) -> str:
    # Compiled on its own: the statement binds no parameter, and an UPDATE inside another element would make the
    # outer compiler take itself for an UPDATE's.
    return "EXPLAIN " + str(element.statement.compile(dialect=compiler.dialect))


def _sql(expression: str) -> sa.ColumnElement[Any]:
    """A user's expression inlined in parentheses (never parsed for bind parameters; ``%`` escaped for the driver)."""
    return sa.literal_column(f"({expression})")


def _truth(expression: str | None) -> sa.ColumnElement[Any]:
    """1 where ``expression`` is true, else 0 (false and NULL alike, as a WHERE clause treats them)."""
    return sa.literal_column("1" if expression is None else f"CASE WHEN ({expression}) THEN 1 ELSE 0 END")


def _one_line(exc: BaseException) -> str:
    inner = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc
    text = str(inner).strip()
    return text.splitlines()[0][:300] if text else type(inner).__name__


def _raise_if_disconnected(exc: sa.exc.StatementError) -> None:
    """A lost connection is not a row's failure: it aborts the batch, which apply retries as a whole."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        raise exc


def _unrecordable(image: Mapping[str, Any]) -> str | None:
    """Why a value of ``image`` cannot go into the ledger's JSON images exactly (None: every one can)."""
    for column, value in image.items():
        if isinstance(value, bytes | bytearray | memoryview):
            return f"{column} holds a BLOB, which the ledger's JSON images cannot carry"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{column} holds {value}, which the ledger's JSON images cannot carry"
    return None


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class _Locked:
    """One row of a batch as read under its lock: its key as stored, whether ``where`` holds, its set columns."""

    text: str
    key: Mapping[str, Any]
    needs: bool
    before: Mapping[str, Any]


class _Rejected(Exception):
    """A row that must not be written (``verify`` fails, a value the ledger cannot carry): its savepoint rolls back."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


# ====================================================================================================================
# The job


class SqlJob:
    """A declarative ``sql`` backfill of one table (see the module docstring)."""

    kind = KIND

    def __init__(self, definition: SqlDefinition) -> None:
        self.definition = definition
        self.name = definition.name
        d = definition
        self.table = sa.Table(
            d.table,
            sa.MetaData(),
            *(sa.Column(c, _VALUE, primary_key=True) for c in d.key),
            *(sa.Column(c, _VALUE) for c in d.columns),
            schema=d.schema,
        )
        self.operation = f"{d.table}:update"
        self._checked: set[str] = set()  # databases (URL without password) whose catalog matched the definition

    @classmethod
    def from_config(cls, name: str, table: Mapping[str, Any]) -> SqlJob:
        """The job of a ``[job.NAME]`` table (the registry's factory for kind ``sql``)."""
        return cls(SqlDefinition.from_table(name, table))

    @property
    def versions(self) -> Mapping[str, str]:
        return {"sql_definition": self.definition.digest}

    def written_tables(self) -> Sequence[WrittenTable]:
        return (WrittenTable(self.definition.table, self.definition.key, self.table, partial_images=True),)

    def parse_key(self, text: str) -> str:
        """A key as typed (``--priority``): the value's text, or for several key columns a JSON array of them."""
        key = self.definition.key
        if len(key) == 1:
            if not text.strip():
                raise UsageError("an empty key")
            return text.strip()
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = None
        if not isinstance(values, list) or len(values) != len(key) or any(isinstance(v, dict | list) for v in values):
            raise UsageError(f"{text!r} is not a key of {self.definition.qualified}: give a JSON array of {list(key)}")
        return canonical_json([str(v) for v in values])

    # ---------------------------------------------------------------------------------------------- keys

    def _key_text(self, values: Sequence[Any]) -> str:
        texts = [str(v) for v in values]
        return texts[0] if len(texts) == 1 else canonical_json(texts)

    def _key_values(self, text: str) -> tuple[str, ...]:
        if len(self.definition.key) == 1:
            return (text,)
        return tuple(json.loads(text))

    def _key_cols(self) -> list[sa.Column[Any]]:
        return [self.table.c[c] for c in self.definition.key]

    def _set_cols(self) -> list[sa.Column[Any]]:
        return [self.table.c[c] for c in self.definition.columns]

    def _keys_in(self, keys: Sequence[Sequence[Any]]) -> sa.ColumnElement[bool]:
        cols = self._key_cols()
        if len(cols) == 1:
            return cols[0].in_([k[0] for k in keys])
        return sa.tuple_(*cols).in_([tuple(k) for k in keys])

    # ---------------------------------------------------------------------------------------------- the declaration

    def require_schema(self, db: Database) -> None:
        """``ConfigError`` (one line) unless the table, its key and set columns exist and every expression plans."""
        with db.connect() as conn:
            self._verify_catalog(conn)

    def _ensure(self, conn: Connection) -> None:
        if conn.engine.url.render_as_string(hide_password=True) not in self._checked:
            self._verify_catalog(conn)

    def _verify_catalog(self, conn: Connection) -> dict[str, Any]:
        """Checks the definition against the database's catalog and planner; the evidence, or ``ConfigError``."""
        d = self.definition
        inspector = sa.inspect(conn)
        if not inspector.has_table(d.table, schema=d.schema):
            raise _bad(d.name, f"table {d.qualified} does not exist in {_where(conn)}")
        columns = {c["name"]: c for c in inspector.get_columns(d.table, schema=d.schema)}
        missing = [c for c in (*d.key, *d.columns) if c not in columns]
        if missing:
            raise _bad(d.name, f"{d.qualified} has no column(s) {', '.join(missing)}")
        primary_key = tuple(inspector.get_pk_constraint(d.table, schema=d.schema).get("constrained_columns") or ())
        if set(primary_key) != set(d.key):
            found = list(primary_key) if primary_key else "none"
            raise _bad(d.name, f"key {list(d.key)} is not the primary key of {d.qualified} (its primary key: {found})")
        if conn.dialect.name == "sqlite":
            _require_key_affinity(d, columns)
        self._explain(conn)
        self._checked.add(conn.engine.url.render_as_string(hide_password=True))
        return {"table": d.qualified, "primary_key": list(primary_key), "columns": len(columns), "set": list(d.columns)}

    def _explain(self, conn: Connection) -> None:
        """Plans the update and the verification without running them; an error is the user's expression's.

        A role that may read the table but not update it (a read-only health check of production) cannot have an
        UPDATE planned: the expressions are then planned in a SELECT, and ``write_privileges`` says the rest."""
        d = self.definition
        update = self.table.update().where(_sql(d.where)).values({c: _sql(e) for c, e in d.set})
        reads = sa.select(*(_sql(e) for _, e in d.set)).select_from(self.table).where(_sql(d.where))
        select = sa.select(_truth(d.verify)).select_from(self.table)
        for what, statement in (("where/set", update), ("verify", select)):
            try:
                self._explain_one(conn, statement, reads if statement is update else None)
            except sa.exc.DBAPIError as exc:
                _raise_if_disconnected(exc)
                raise _bad(d.name, f"{what} does not plan on {d.qualified}: {_one_line(exc)}") from None

    def _explain_one(self, conn: Connection, statement: ClauseElement, if_read_only: ClauseElement | None) -> None:
        try:
            with conn.begin_nested():
                conn.execute(_Explain(statement)).all()
        except sa.exc.DBAPIError as exc:
            if if_read_only is None or getattr(exc.orig, "sqlstate", None) != _INSUFFICIENT_PRIVILEGE:
                raise
            with conn.begin_nested():
                conn.execute(_Explain(if_read_only)).all()

    def prechecks(self, conn: Connection, environment: str) -> list[Check]:
        """The definition against the catalog (``ConfigError`` if it does not fit), and the right to write the table."""
        evidence = self._verify_catalog(conn)
        d = self.definition
        summary = (
            f"{d.qualified} (primary key {', '.join(d.key)}): set {', '.join(d.columns)} where {d.where}"
            + (f"; verify {d.verify}" if d.verify else "")
            + "; every expression plans (EXPLAIN)"
        )
        definition = Check("sql_definition", "PASS", summary, {**evidence, "digest": d.digest}, "EXPLAIN UPDATE ...")
        return [definition, self._write_privileges(conn)]

    def _write_privileges(self, conn: Connection) -> Check:
        if conn.dialect.name != "postgresql":
            return Check(
                "write_privileges",
                NOT_APPLICABLE,
                f"{conn.dialect.name} has no roles, privileges or row-level security: there is nothing to check",
                {"dialect": conn.dialect.name},
            )
        relation = self.definition.qualified
        quoted = conn.dialect.identifier_preparer.format_table(self.table)  # as regclass reads a name
        row = conn.execute(_PRIVILEGES, {"relation": quoted}).one()
        passes_rls = bool(row.rolsuper or row.rolbypassrls or (row.owns and not row.forced) or not row.rls_on)
        ok = bool(row.may_write and passes_rls)
        summary = (
            f"{row.who}: SELECT, UPDATE on {relation} {'granted' if row.may_write else 'MISSING'}, "
            f"row-level security {'bypassed or off' if passes_rls else 'would filter the updates'}"
        )
        return Check("write_privileges", "PASS" if ok else "FAIL", summary, dict(row._mapping), _PRIVILEGES.text)

    # ---------------------------------------------------------------------------------------------- discovery

    def discover(self, conn: Connection, params: Mapping[str, Any]) -> Iterator[Candidate]:
        """Every row matching ``where``, in key order, a page of keys at a time (keyset pagination over the key).

        ``since`` does not apply: the job knows no timestamp of the table's rows."""
        self._ensure(conn)
        cols = self._key_cols()
        last: Sequence[Any] | None = None
        while True:
            query = sa.select(*cols).where(_sql(self.definition.where), *(c.is_not(None) for c in cols))
            if last is not None:
                after = [sa.bindparam(f"gf_after_{i}", v, type_=_VALUE) for i, v in enumerate(last)]
                query = query.where(cols[0] > after[0] if len(cols) == 1 else sa.tuple_(*cols) > sa.tuple_(*after))
            rows = conn.execute(query.order_by(*cols).limit(_CHUNK)).all()
            for row in rows:
                yield Candidate(self._key_text(row), CATEGORY, _NO_TIMESTAMP, (self.operation,))
            if len(rows) < _CHUNK:
                return
            last = tuple(rows[-1])

    # ---------------------------------------------------------------------------------------------- apply

    def executors(self) -> tuple[str, ...]:
        return (LOCAL_EXECUTOR,)

    @contextmanager
    def open_executor(self, name: str, env: Environment) -> Iterator[Executor | None]:
        if name != LOCAL_EXECUTOR:
            raise UsageError(f"unknown executor '{name}' (job {self.name} has only {LOCAL_EXECUTOR})")
        yield None

    def process_batch(
        self,
        conn: Connection,
        candidates: Sequence[Candidate],
        *,
        now: datetime,
        run_id: str,
        record: ChangeSink | None = None,
    ) -> BatchOutcome:
        """Locks the batch's rows, re-checks ``where`` on them, updates those that still match (see the module
        docstring) and hands the changes to ``record`` in the caller's transaction."""
        started = time.perf_counter()
        self._ensure(conn)
        locked: dict[str, _Locked] = {}
        for part in _chunks([self._key_values(c.key) for c in candidates]):
            locked.update(self._lock(conn, part))
        todo = [row for row in locked.values() if row.needs and _unrecordable(row.before) is None]
        written: dict[str, RowChange] = {}
        failed: dict[str, str] = {}
        for part in _chunks(todo):
            changes, errors = self._write(conn, part)
            written.update(changes)
            failed.update(errors)
        if record is not None and written:
            record(list(written.values()))
        outcome = BatchOutcome(changes=list(written.values()))
        seconds = (time.perf_counter() - started) / max(1, len(candidates))
        for c in candidates:
            result, reason = self._result(locked.get(c.key), written, failed)
            op: dict[str, Any] = {"op": self.operation, "result": result}
            if reason and result != "failed":
                op["reason"] = reason
            error = reason if result == "failed" else None
            outcome.sessions.append(SessionOutcome(c.key, result, [op], error, seconds))
        return outcome

    def _result(
        self, row: _Locked | None, written: Mapping[str, RowChange], failed: Mapping[str, str]
    ) -> tuple[str, str | None]:
        """A candidate's result and why (``already_present`` rows were left to whoever changed them)."""
        if row is None:
            return "already_present", "the row is gone (deleted since the plan)"
        if not row.needs:
            return "already_present", f"the row no longer matches where ({self.definition.where}) under its lock"
        problem = _unrecordable(row.before)
        if problem:
            return "failed", f"not written: {problem}"
        if row.text in failed:
            return "failed", failed[row.text]
        if row.text in written:
            return "written", None
        return "already_present", "the row did not match where when it was updated"

    def _lock(self, conn: Connection, keys: Sequence[Sequence[Any]]) -> dict[str, _Locked]:
        """The rows of ``keys``, locked until the transaction ends, with ``where`` evaluated on what was locked."""
        cols, values = self._key_cols(), self._set_cols()
        query = (
            sa.select(*cols, *values, _truth(self.definition.where))
            .where(self._keys_in(keys))
            .order_by(*cols)
            .with_for_update()  # Postgres; SQLite's BEGIN IMMEDIATE already holds the write lock
        )
        found: dict[str, _Locked] = {}
        n = len(cols)
        for row in conn.execute(query):
            key = dict(zip(self.definition.key, row[:n], strict=True))
            before = dict(zip(self.definition.columns, row[n:-1], strict=True))
            text = self._key_text(row[:n])
            found[text] = _Locked(text, key, bool(row[-1]), before)
        return found

    def _write(self, conn: Connection, rows: Sequence[_Locked]) -> tuple[dict[str, RowChange], dict[str, str]]:
        """Updates ``rows`` in one savepoint; if any fails, again one savepoint per row, so only the culprits fail.
        Returns the changes written and, per failed row, why."""
        try:
            with conn.begin_nested():
                return self._update(conn, rows), {}
        except sa.exc.StatementError as exc:
            _raise_if_disconnected(exc)
            if len(rows) == 1:
                return {}, {rows[0].text: f"update failed: {_one_line(exc)}"}
        except _Rejected as exc:
            if len(rows) == 1:
                return {}, {exc.key: exc.reason}
        written: dict[str, RowChange] = {}
        failed: dict[str, str] = {}
        for row in rows:
            try:
                with conn.begin_nested():
                    written.update(self._update(conn, [row]))
            except sa.exc.StatementError as exc:
                _raise_if_disconnected(exc)
                failed[row.text] = f"update failed: {_one_line(exc)}"
            except _Rejected as exc:
                failed[exc.key] = exc.reason
        return written, failed

    def _update(self, conn: Connection, rows: Sequence[_Locked]) -> dict[str, RowChange]:
        """One UPDATE of ``rows`` (still matching ``where``), returning each row's new values and ``verify``."""
        d = self.definition
        by_text = {row.text: row for row in rows}
        statement = (
            self.table.update()
            .where(self._keys_in([tuple(row.key.values()) for row in rows]), _sql(d.where))
            .values({c: _sql(e) for c, e in d.set})
            .returning(*self._key_cols(), *self._set_cols(), _truth(d.verify))
        )
        n = len(d.key)
        changes: dict[str, RowChange] = {}
        for returned in conn.execute(statement).all():
            text = self._key_text(returned[:n])
            after = dict(zip(d.columns, returned[n:-1], strict=True))
            if not returned[-1]:
                raise _Rejected(text, f"verify ({d.verify}) does not hold after the update: {_shown(after)}")
            problem = _unrecordable(after)
            if problem:
                raise _Rejected(text, f"not written: {problem}")
            row = by_text[text]
            key = dict(zip(d.key, returned[:n], strict=True))
            changes[text] = RowChange(d.table, key, dict(row.before), after, text)
        return changes

    # ---------------------------------------------------------------------------------------------- checks

    def post_checks(self, conn: Connection, run_id: str) -> list[Check]:
        """After apply: ``verify`` on every row the run wrote, re-read now."""
        return [self.verify_check(conn, run_id)]

    def written_keys(self, conn: Connection, run_id: str) -> list[tuple[str, ...]]:
        """The keys of the rows a run wrote, as its ledger lists them, in the order it wrote them."""
        pages = ledger.change_pages(conn, run_id, table=self.definition.table)
        return [tuple(str(c.key[k]) for k in self.definition.key) for page in pages for c in page]

    def verify_check(self, conn: Connection, run_id: str) -> Check:
        """``verify_processed``: ``verify`` holds on every row ``run_id`` wrote (N/A without ``verify`` or rows)."""
        d = self.definition
        query = f"SELECT key, CASE WHEN ({d.verify}) THEN 1 ELSE 0 END FROM {d.qualified} WHERE key IN (<rows of run>)"
        if d.verify is None:
            why = f"job {d.name} declares no verify expression: there is nothing to check on the rows it wrote"
            return Check("verify_processed", NOT_APPLICABLE, why, {"run_id": run_id})
        keys = self.written_keys(conn, run_id)
        if not keys:
            why = f"run {run_id} wrote no row of {d.qualified}: there is no processed row to check"
            return Check("verify_processed", NOT_APPLICABLE, why, {"run_id": run_id, "written": 0}, query)
        present, violating = 0, []
        for part in _chunks(keys):
            statement = sa.select(*self._key_cols(), _truth(d.verify)).where(self._keys_in(part))
            for row in conn.execute(statement):
                present += 1
                if not row[-1]:
                    violating.append(self._key_text(row[:-1]))
        evidence = {"run_id": run_id, "written": len(keys), "present": present, "violations": len(violating)}
        evidence["violating_keys"] = violating[:_LISTED]
        gone = f"; {len(keys) - present} deleted since" if present < len(keys) else ""
        summary = f"verify ({d.verify}) holds on {present - len(violating)} of {present} rows run {run_id} wrote{gone}"
        return Check("verify_processed", "FAIL" if violating else "PASS", summary, evidence, query)

    def matching_check(self, conn: Connection, *, gating: bool = True) -> Check:
        """``rows_matching_where``: the rows that still need work (their count is what discovery would find)."""
        d = self.definition
        cols = self._key_cols()
        n = int(conn.execute(sa.select(sa.func.count()).select_from(self.table).where(_sql(d.where))).scalar_one())
        sample = conn.execute(sa.select(*cols).where(_sql(d.where)).order_by(*cols).limit(_LISTED)).all()
        evidence = {"matching": n, "keys": [self._key_text(r) for r in sample]}
        summary = f"{n} row(s) of {d.qualified} match where ({d.where})"
        query = f"SELECT count(*) FROM {d.qualified} WHERE ({d.where})"
        return Check("rows_matching_where", "FAIL" if n else "PASS", summary, evidence, query, gating)

    def violations_check(self, conn: Connection) -> Check:
        """``verify_violations``: rows that need no work (``where`` not true) but on which ``verify`` does not hold."""
        d = self.definition
        if d.verify is None:
            why = f"job {d.name} declares no verify expression: there is nothing to check"
            return Check("verify_violations", NOT_APPLICABLE, why, {})
        done = _truth(d.where) == sa.literal_column("0")
        statement = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(1 - _truth(d.verify)), 0))
        checked, bad = conn.execute(statement.select_from(self.table).where(done)).one()
        sample = conn.execute(
            sa.select(*self._key_cols()).where(done, _truth(d.verify) == 0).order_by(*self._key_cols()).limit(_LISTED)
        ).all()
        evidence = {"checked": int(checked), "violations": int(bad), "keys": [self._key_text(r) for r in sample]}
        query = f"SELECT count(*) FROM {d.qualified} WHERE NOT ({d.where}) AND NOT ({d.verify}) (NULL as false)"
        summary = f"verify ({d.verify}) fails on {int(bad)} of {int(checked)} rows that need no work"
        verdict = "FAIL" if bad else ("PASS" if checked else "INCONCLUSIVE")
        return Check("verify_violations", verdict, summary, evidence, query)

    def health_checks(
        self,
        conn: Connection,
        *,
        since: datetime,
        now: datetime,
        row_level_security: bool,
        timings: dict[str, float] | None = None,
    ) -> list[Check]:
        """Rows still matching ``where`` (what a mini plan would do) and ``verify`` violations; ``since`` does not
        apply (the job knows no timestamp of the rows)."""
        self._ensure(conn)
        checks = []
        measures = (("rows_matching_where", self.matching_check), ("verify_violations", self.violations_check))
        for name, measure in measures:
            started = time.perf_counter()
            checks.append(measure(conn))
            if timings is not None:
                timings[name] = time.perf_counter() - started
        return checks

    def needs_backfill(self, checks: Sequence[Check]) -> bool:
        """Rows still match ``where``: exactly what discovery finds."""
        return any(int(c.evidence.get("matching", 0)) for c in checks if c.name == "rows_matching_where")

    def gate_checks(self, phase: str) -> Sequence[GateCheck]:
        return _GATE_CHECKS.get(phase, ())

    def newest_activity(self, conn: Connection, since: datetime) -> tuple[datetime | None, str]:
        return None, f"none: job {self.name} knows no timestamp column of {self.definition.qualified}"

    @contextmanager
    def soak_checks(self, env: Environment, settings: SoakSettings) -> Iterator[SoakChecks]:
        yield SqlSoakChecks(self)


def _where(conn: Connection) -> str:
    return conn.engine.url.render_as_string(hide_password=True)


def _shown(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} = {v!r}" for k, v in values.items())[:200]


def _require_key_affinity(d: SqlDefinition, columns: Mapping[str, Mapping[str, Any]]) -> None:
    """Keys are bound as text; SQLite converts text to the column's affinity, but a column declared without a type
    (or BLOB) has none, so its integer keys would never match."""
    for name in d.key:
        if isinstance(columns[name]["type"], sa.types.NullType | sa.types.LargeBinary):
            raise _bad(
                d.name,
                f"key column {name} of {d.qualified} has no type affinity on SQLite (declared "
                f"{str(columns[name]['type'])!r}): declare it INTEGER or TEXT",
            )


#: What the final gate's checklist cites from each phase. Not ``rows_matching_where`` of health: the health the
#: pipeline records is the one that found the work for the production apply ("production healthy" judges after it);
#: the soak's other checks only observe.
_GATE_CHECKS: dict[str, tuple[GateCheck, ...]] = {
    "soak": (GateCheck("verify_processed", "verify holds on every row the staging apply wrote"),),
    "health": (GateCheck("verify_violations", "verify holds on every production row that needs no work"),),
}

_PRIVILEGES = sa.text(
    "SELECT current_user AS who, r.rolsuper, r.rolbypassrls, "
    # One privilege per call: with a list, has_table_privilege is true when ANY of them is held.
    "has_table_privilege(current_user, CAST(:relation AS regclass), 'SELECT') "
    "AND has_table_privilege(current_user, CAST(:relation AS regclass), 'UPDATE') AS may_write, "
    "c.relrowsecurity AS rls_on, c.relforcerowsecurity AS forced, "
    "pg_has_role(current_user, c.relowner, 'MEMBER') AS owns "
    "FROM pg_roles r, pg_class c WHERE r.rolname = current_user AND c.oid = CAST(:relation AS regclass)"
)


# ====================================================================================================================
# The soak


#: Soak checks in report order; only ``verify_processed`` gates: the others describe the table, and the sql job reads
#: no application signal at all (``app_signals`` says so: N/A, never PASS).
CHECK_NAMES = ("verify_processed", "rows_matching_where", "rows_as_written", "app_signals")


class SqlSoakChecks:
    """What a staging soak of a ``sql`` job measures at each look: ``verify`` on the rows the soaked apply run wrote
    (gating), the rows still matching ``where`` and the rows changed since the run wrote them (observed).

    The job knows no timestamp of the table's rows, so each look measures the table as it is when the look is taken
    (a look taken late, of a past cutoff, sees later writes too; its evidence says so)."""

    def __init__(self, job: SqlJob) -> None:
        self._job = job
        self.job = job.name

    @property
    def check_names(self) -> tuple[str, ...]:
        return CHECK_NAMES

    def params(self) -> dict[str, Any]:
        d = self._job.definition
        return {"table": d.qualified, "where": d.where, "verify": d.verify, "sql_definition": d.digest}

    def measure_baseline(self, db: Database, start: datetime, end: datetime) -> Baseline:
        why = f"job {self.job} compares no rate with a baseline: its checks hold or fail on the rows themselves"
        return Baseline(start=start, end=end, summary=why, evidence={})

    def measure(self, db: Database, look: Look) -> list[Check]:
        with db.connect() as conn:
            run, why = self._apply_run(conn, look.run_id)
            if run is None:
                processed = Check("verify_processed", NOT_APPLICABLE, why, {})
                as_written = Check("rows_as_written", NOT_APPLICABLE, why, {}, gating=False)
            else:
                processed = self._job.verify_check(conn, run.id)
                as_written = self._as_written(conn, run.id)
            matching = self._job.matching_check(conn, gating=False)
        note = {"measured": "the table as it was when the look was taken (the job knows no row timestamps)"}
        app = Check(
            "app_signals",
            NOT_APPLICABLE,
            f"job {self.job} reads no application metrics or probes: error rates and latency are not measured",
            {},
            gating=False,
        )
        return [_noted(processed, note), _noted(matching, note), _noted(as_written, note), app]

    def _apply_run(self, conn: Connection, soak_run_id: str) -> tuple[ledger.Run | None, str]:
        """The apply run the soak watches (its ``--after`` run, else this job's latest finished one), or why none."""
        soak = ledger.get_run(conn, soak_run_id, with_plan=False)
        if soak.parent_run_id:
            run = ledger.get_run(conn, soak.parent_run_id, with_plan=False)
            if run.job != self.job:
                return None, f"apply run {run.id} is of job {run.job}, not {self.job}: none of its rows is this job's"
            return run, ""
        finished = (RunStatus.SUCCEEDED, RunStatus.COMPLETED_WITH_ERRORS)
        for run in ledger.list_runs(conn, phase=ledger.APPLY_PHASE, limit=200):
            if run.job == self.job and run.status in finished:
                return run, ""
        return None, f"no finished apply run of job {self.job} here (soak with --after RUN): no processed row to check"

    def _as_written(self, conn: Connection, run_id: str) -> Check:
        """Rows the run wrote whose set columns no longer hold what it wrote (a live writer changed them since)."""
        job, d = self._job, self._job.definition
        # What the run wrote per key: a digest over the set columns (a ledger from before digests: the values).
        images = {
            job._key_text([str(c.key[k]) for k in d.key]): (c.after_digest, c.after_columns, c.after)
            for page in ledger.change_pages(conn, run_id, table=d.table)
            for c in page
        }
        changed: list[str] = []
        present = 0
        keys = [job._key_values(text) for text in images]
        for part in _chunks(keys):
            for row in conn.execute(sa.select(*job._key_cols(), *job._set_cols()).where(job._keys_in(part))):
                present += 1
                text = job._key_text(row[: len(d.key)])
                now = dict(zip(d.columns, row[len(d.key) :], strict=True))
                digest, columns, after = images.get(text, (None, None, None))
                if (row_digest(job.table, now, columns) != digest) if digest is not None else (now != after):
                    changed.append(text)
        evidence = {"run_id": run_id, "written": len(images), "present": present, "changed": len(changed)}
        evidence["changed_keys"] = changed[:_LISTED]
        summary = (
            f"{present - len(changed)} of {len(images)} rows run {run_id} wrote still hold what it wrote "
            f"({len(changed)} changed since, {len(images) - present} deleted)"
        )
        verdict = NOT_APPLICABLE if not images else ("PASS" if not changed and present == len(images) else "FAIL")
        if not images:
            summary = f"run {run_id} wrote no row of {d.qualified}"
        return Check("rows_as_written", verdict, summary, evidence, "rows of the run (change sets) re-read", False)

    def series(self, db: Database, start: datetime, end: datetime, bucket_seconds: float) -> list[SeriesBucket]:
        return []  # no rate or event over time: the checks count rows, not traffic

    def report_tables(self, measurements: Sequence[Measurement]) -> list[ReportTable]:
        rows = []
        for m in measurements:
            processed, matching = m.check("verify_processed"), m.check("rows_matching_where")
            rows.append(
                [
                    str(m.seq),
                    m.window_end.isoformat(),
                    processed.summary if processed else "",
                    str(matching.evidence.get("matching", "")) if matching else "",
                ]
            )
        headers = ("look", "cutoff", "verify on the processed rows", "rows matching where")
        note = f"Job {self.job} ({self._job.definition.qualified}): each look reads the table as it was then."
        return [ReportTable("Rows of the apply run, per look", headers, rows, note)]

    def chart_guides(self, measurements: Sequence[Measurement], end: datetime) -> ChartGuides:
        return ChartGuides()


def _noted(check: Check, note: Mapping[str, Any]) -> Check:
    return Check(check.name, check.verdict, check.summary, {**check.evidence, **note}, check.query, check.gating)
