"""Exact rollback of a run by primary key: restore the before-images and delete the rows the run inserted.

The ledger (``gatefill_changes``) holds, for every row a run wrote, its primary key, its before-image (NULL: the row
was absent) and its after-image. Rollback addresses only those keys, so rows written by anyone else (live traffic
included) are never touched; nothing is ever selected by timestamp, which is how the original pipeline's rollback
deleted live users' rows and failed to undo overwritten ones (data model §3.1-3.2).

A row that changed since the run wrote it (its current values differ from the after-image, or it was deleted) is a
*conflict*: restoring over it would destroy someone else's write, so rollback refuses, listing the rows, unless
forced. Execution is one transaction: every key is deleted (newest change first, so children go before parents),
then every before-image is inserted back whole (oldest change first), created_at and updated_at included; restoring
by DELETE + INSERT rather than UPDATE matters because the ``updated_at`` triggers would otherwise re-stamp the row.
Verification reads every key back inside the same transaction before it commits, and the run moves to
``rolled_back`` in that transaction too. A dry run does all of it and then rolls the transaction back.

Memory stays bounded whatever the run's size: every pass (conflict check, deletes, restores, verification, the
script's sections) reads the ledger through one keyset-paginated reader, ``PAGE_SIZE`` changes at a time, together
with the current rows of that page's keys; what outlives a page is counters, the conflicts and the first
``LISTED_PROBLEMS`` verification problems.

``rollback_sql`` emits the same procedure as a script for ``psql`` or the ``sqlite3`` shell, with value literals
that reproduce the stored values exactly (floats bit for bit), a guard that refuses when rows changed since the run
wrote them, and verification inside the transaction that aborts it if a check fails.

Column types come from the job's table definitions (``WrittenTable.table``, or failing that the ``metadata``
argument): on SQLite the database itself cannot say which TEXT column holds JSON or a timestamp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.config import Environment
from gatefill.db import Database, JSONValue, TextArray, UTCTimestamp, UUIDText, dumps_json, format_utc, parse_utc
from gatefill.errors import DataError, GatefillError, UsageError
from gatefill.job import Check, Fence, Job, WrittenTable
from gatefill.lease import RunLease
from gatefill.ledger import RunStatus

__all__ = [
    "Conflict",
    "LedgerChange",
    "NothingToRollBack",
    "RollbackConflicts",
    "RollbackPlan",
    "RollbackResult",
    "RollbackVerificationFailed",
    "TableCounts",
    "load_changes",
    "plan_rollback",
    "render_report",
    "render_rollback",
    "rollback_command",
    "rollback_run",
    "rollback_sql",
    "write_rollback_sql",
]

REPORT_NAME = "rollback_report.md"
#: A dry run's report has a name of its own, so it never overwrites the report of a real rollback.
DRY_RUN_REPORT_NAME = "rollback_dry_run.md"
#: How many conflicts the one-line refusal names (the report lists them all).
LISTED_IN_ERROR = 5
#: How many verification problems the report lists (the rest are counted).
LISTED_PROBLEMS = 50
#: Ledger changes per page: no pass over a run's changes holds more than two pages of them at a time.
PAGE_SIZE = 2000
#: Keys per statement when reading, deleting or verifying rows in bulk.
_CHUNK = 500


# ---------------------------------------------------------------------------------------------------- errors


class RollbackConflicts(GatefillError):
    """Rows the run wrote changed since (or vanished), so restoring them would destroy someone else's write."""

    def __init__(self, run_id: str, conflicts: Sequence[Conflict], report: Path | None) -> None:
        self.run_id = run_id
        self.conflicts = list(conflicts)
        self.report = report
        shown = "; ".join(c.describe() for c in self.conflicts[:LISTED_IN_ERROR])
        more = f" (+{len(self.conflicts) - LISTED_IN_ERROR} more)" if len(self.conflicts) > LISTED_IN_ERROR else ""
        where = f"; all listed in {report}" if report is not None else ""
        super().__init__(
            f"rollback of run {run_id} refused, nothing changed: {len(self.conflicts)} row(s) changed since the run "
            f"wrote them: {shown}{more}{where}; use --force to restore the before-images anyway"
        )


class RollbackVerificationFailed(GatefillError):
    """After the rollback's writes, some key was not absent or not equal to its before-image; nothing was committed."""

    def __init__(self, run_id: str, failed: Sequence[Check], report: Path | None) -> None:
        self.run_id = run_id
        self.failed = list(failed)
        self.report = report
        shown = "; ".join(c.summary for c in self.failed)
        where = f" (see {report})" if report is not None else ""
        super().__init__(f"rollback of run {run_id} failed verification and was not committed: {shown}{where}")


class NothingToRollBack(UsageError):
    """The run changed no data (a soak or pipeline run, a plan never applied), or a dry run of an undone run."""

    def __init__(self, run_id: str, why: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} cannot be rolled back: {why}")


# ---------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LedgerChange:
    """One row change a run recorded, as rollback reads it back from the ledger (key values typed by column).

    ``inserted``: the row was absent before the run (no before-image), so undoing the change is a delete. A pass over
    the ledger reads only the images it uses (see ``_LedgerPages``): an image it did not read is None, and so is the
    before-image of an inserted row.
    """

    seq: int
    batch_no: int
    table: str
    row_key: str
    key: Mapping[str, Any]
    session_id: str | None
    inserted: bool
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None


@dataclass(frozen=True)
class Conflict:
    """A row the run wrote that no longer equals its after-image: changed columns, or deleted altogether."""

    table: str
    row_key: str
    reason: str  # "changed" | "deleted"
    columns: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.reason == "deleted":
            return f"{self.table} {self.row_key} deleted since the run wrote it"
        return f"{self.table} {self.row_key} changed since the run wrote it: {', '.join(self.columns)}"


@dataclass
class TableCounts:
    """Per table: what the ledger says the run did and what rollback measured doing about it."""

    table: str
    inserted_by_run: int = 0  # ledger changes with no before-image
    updated_by_run: int = 0  # ledger changes with a before-image
    deleted: int = 0  # rows the DELETEs of inserted keys removed (rowcount)
    already_absent: int = 0  # inserted keys that were gone before rollback touched them
    replaced: int = 0  # rows the DELETEs of updated keys removed before their before-image went back
    restored: int = 0  # before-images inserted

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RollbackPlan:
    """What undoing a run takes: its changes counted per table, and the rows that changed since the run wrote them.

    The plan holds no changes: execution and verification read the ledger again page by page, so undoing a run of
    any size takes bounded memory (the conflicts aside, which are listed in full).
    """

    run_id: str
    status: RunStatus
    changes: int
    tables: tuple[TableCounts, ...]  # every declared table; only inserted_by_run and updated_by_run are filled in
    conflicts: tuple[Conflict, ...]

    @property
    def allowed(self) -> bool:
        """Whether the run's status may move to ``rolled_back`` at all."""
        return RunStatus.ROLLED_BACK in ledger.TRANSITIONS[self.status]


@dataclass(frozen=True)
class RollbackResult:
    """The outcome of one rollback (or dry run), every number measured in its transaction."""

    run_id: str
    environment: str
    database: str
    dry_run: bool
    forced: bool
    refused: bool
    committed: bool
    status_before: RunStatus
    status_after: RunStatus
    status_allows_rollback: bool
    changes: int
    tables: tuple[TableCounts, ...]
    conflicts: tuple[Conflict, ...]
    verification: tuple[Check, ...]
    generated_at: datetime
    report_path: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def verified(self) -> bool:
        """Every verification query passed (a run without changes has nothing to verify and counts as verified)."""
        if self.refused:
            return False
        return (bool(self.verification) or self.changes == 0) and all(c.verdict == "PASS" for c in self.verification)

    @property
    def verdict(self) -> str:
        if self.refused:
            return "REFUSED"
        return "PASS" if self.verified else "FAIL"


# ---------------------------------------------------------------------------------------------------- column kinds

_TS, _JSON, _ARRAY, _UUID, _FLOAT, _BOOL, _INT, _TEXT = (
    "timestamp",
    "json",
    "array",
    "uuid",
    "float",
    "bool",
    "int",
    "text",
)


def _kind(column: sa.Column[Any]) -> str:
    """How a column's values are compared and written as literals."""
    t = column.type
    if isinstance(t, UTCTimestamp):
        return _TS
    if isinstance(t, JSONValue):
        return _JSON
    if isinstance(t, TextArray):
        return _ARRAY
    if isinstance(t, UUIDText):
        return _UUID
    if isinstance(t, sa.Boolean):
        return _BOOL
    if isinstance(t, sa.Float):
        return _FLOAT
    if isinstance(t, sa.Integer):
        return _INT
    return _TEXT


def _definitions(
    tables: Sequence[WrittenTable], metadata: sa.MetaData | None
) -> dict[str, tuple[sa.Table, WrittenTable]]:
    """The Core definition (with gatefill's logical column types) of every written table."""
    found: dict[str, tuple[sa.Table, WrittenTable]] = {}
    for written in tables:
        table = written.table
        if table is None and metadata is not None:
            table = metadata.tables.get(written.name)
        if table is None:
            raise DataError(
                f"rollback needs the column types of table {written.name!r}: pass WrittenTable(..., table=...) "
                "or the job's metadata"
            )
        missing = [c for c in written.primary_key if c not in table.c]
        if missing:
            raise DataError(f"table {written.name!r} has no primary-key column(s) {missing}")
        found[written.name] = (table, written)
    return found


def _coerce_key(column: sa.Column[Any], text: str) -> Any:
    # ledger.row_key keeps every key value as str(); bring it back to the column's Python type.
    kind = _kind(column)
    if kind == _INT:
        return int(text)
    if kind == _FLOAT:
        return float(text)
    if kind == _BOOL:
        return text == "True"
    if kind == _TS:
        return parse_utc(text)
    if kind == _UUID:
        return text.lower()  # as Postgres returns it
    return text


def _canon_json(value: Any) -> Any:
    # Value semantics: 90 and 90.0 are the same JSON number (jsonb and JSON.stringify agree), true is not 1.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        f = float(value)
        return int(f) if f.is_integer() and abs(f) < 1e21 else f
    if isinstance(value, Mapping):
        return {str(k): _canon_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canon_json(v) for v in value]
    return value


def _normal(kind: str, value: Any) -> Any:
    """A value in a form where equality means "the same stored value" for the column's kind."""
    if value is None:
        return None
    if kind == _TS:
        instant = parse_utc(value) if isinstance(value, str) else value
        if isinstance(instant, datetime):
            return instant.astimezone(UTC) if instant.tzinfo else instant.replace(tzinfo=UTC)
        return instant
    if kind in (_JSON, _ARRAY):
        return json.dumps(_canon_json(value), sort_keys=True, ensure_ascii=False)
    if kind == _FLOAT and isinstance(value, int | float) and not isinstance(value, bool):
        return repr(float(value))  # exact: repr round-trips, and NaN equals itself as text
    if kind == _BOOL:
        return bool(value)
    if kind == _UUID:
        return str(value).lower()
    return value


def _differing(table: sa.Table, image: Mapping[str, Any], row: Mapping[str, Any]) -> list[str]:
    """Columns of ``image`` whose value differs from the stored ``row`` (both compared as values)."""
    return [
        name
        for name, value in image.items()
        if name in table.c and _normal(_kind(table.c[name]), value) != _normal(_kind(table.c[name]), row.get(name))
    ]


# ---------------------------------------------------------------------------------------------------- ledger pages


class _Pages(Protocol):
    """A run's changes in pages, oldest or newest change first, with the images a pass asks for (an image not asked
    for is None); ``updated_only`` leaves out the changes that inserted their row."""

    def __call__(
        self, *, newest_first: bool = False, before: bool = True, after: bool = True, updated_only: bool = False
    ) -> Iterator[Sequence[LedgerChange]]: ...


def _change(
    run_id: str, defs: Mapping[str, tuple[sa.Table, WrittenTable]], row: sa.Row[Any], *, before: bool, after: bool
) -> LedgerChange:
    """A ledger row as a typed change, checked against the job's table definitions."""
    if row.table_name not in defs:
        raise DataError(f"run {run_id} changed table {row.table_name!r}, which the job does not declare")
    table, written = defs[row.table_name]
    raw = json.loads(row.row_key)
    if set(raw) != set(written.primary_key):
        raise DataError(f"run {run_id}: key {row.row_key} does not match {row.table_name}{written.primary_key}")
    key = {c: _coerce_key(table.c[c], raw[c]) for c in written.primary_key}
    inserted = bool(row.inserted)
    return LedgerChange(
        row.id,
        row.batch_no,
        row.table_name,
        row.row_key,
        key,
        row.session_id,
        inserted,
        _image(run_id, table, row, "before") if before and not inserted else None,
        _image(run_id, table, row, "after") if after else None,
    )


def _image(run_id: str, table: sa.Table, row: sa.Row[Any], which: str) -> dict[str, Any]:
    """A change's before- or after-image, which must name only columns of its table."""
    value = getattr(row, which)
    if not isinstance(value, dict):
        raise DataError(f"run {run_id}: {row.table_name} {row.row_key} has a {which}-image that is not an object")
    unknown = value.keys() - _column_names(table)
    if unknown:
        raise DataError(f"run {run_id}: {row.table_name} {row.row_key} has unknown column(s) {sorted(unknown)}")
    return value  # decoded for this row alone: nothing else holds it


@functools.cache
def _column_names(table: sa.Table) -> frozenset[str]:
    # Checked for every image read: built once per table rather than once per row.
    return frozenset(table.c.keys())


@dataclass(frozen=True)
class _LedgerPages:
    """The one reader of a run's changes: pages of ``page_size`` changes from the ledger, keyset-paginated on id.

    Planning, execution, verification and the SQL script each make their passes through it, so none of them holds
    more than a page of changes (the previous page may still be alive while the next one is read). ``first`` and
    ``upto`` are the run's oldest and newest change ids when reading began: every pass stays between them, so all
    passes see the same changes even on a connection that sees other transactions' commits between statements.
    """

    conn: Connection
    run_id: str
    defs: Mapping[str, tuple[sa.Table, WrittenTable]]
    page_size: int
    first: int | None
    upto: int | None

    @classmethod
    def open(
        cls, conn: Connection, run_id: str, defs: Mapping[str, tuple[sa.Table, WrittenTable]], page_size: int
    ) -> _LedgerPages:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        c = ledger.changes.c
        first, upto = conn.execute(sa.select(sa.func.min(c.id), sa.func.max(c.id)).where(c.run_id == run_id)).one()
        return cls(conn, run_id, defs, page_size, first, upto)

    def __call__(
        self, *, newest_first: bool = False, before: bool = True, after: bool = True, updated_only: bool = False
    ) -> Iterator[list[LedgerChange]]:
        if self.first is None or self.upto is None:
            return
        c = ledger.changes.c
        # The images are most of a change's bytes and of its decoding time: a pass reads only those it uses, and
        # learns whether the row was inserted from "before IS NULL" (NULL is how the ledger records "absent").
        columns: list[sa.ColumnElement[Any]] = [c.id, c.batch_no, c.table_name, c.row_key, c.session_id]
        columns.append(c.before.is_(None).label("inserted"))
        columns += [c.before] if before else []
        columns += [c.after] if after else []
        # Each page must be a range scan of the primary key from the last id read. "run_id || ''" keeps the index on
        # (run_id, table_name, row_key) out of it: SQLite's planner (it has no statistics) and Postgres' (with stale
        # ones) would otherwise read all the run's changes through that index and sort them, for every page.
        query = sa.select(*columns).where(c.run_id.concat("") == self.run_id, c.id.between(self.first, self.upto))
        if updated_only:
            query = query.where(c.before.is_not(None))
        query = query.order_by(c.id.desc() if newest_first else c.id).limit(self.page_size)
        last: int | None = None
        while True:
            page = query if last is None else query.where(c.id < last if newest_first else c.id > last)
            # Fetched whole before it is used: a pass may write between pages (SQLite would see an open cursor).
            rows = self.conn.execute(page).all()
            if not rows:
                return
            last = rows[-1].id
            changes = [_change(self.run_id, self.defs, row, before=before, after=after) for row in rows]
            del rows
            yield changes
            if len(changes) < self.page_size:
                return


def _sequence_pages(changes: Sequence[LedgerChange], page_size: int) -> _Pages:
    """Pages over changes already in memory (``rollback_sql``'s argument), in the ledger reader's shape."""

    def read(
        *, newest_first: bool = False, before: bool = True, after: bool = True, updated_only: bool = False
    ) -> Iterator[Sequence[LedgerChange]]:
        order: Sequence[int] = range(len(changes) - 1, -1, -1) if newest_first else range(len(changes))
        if updated_only:
            order = [i for i in order if not changes[i].inserted]
        for start in range(0, len(order), page_size):
            yield [changes[i] for i in order[start : start + page_size]]

    return read


def load_changes(
    conn: Connection, run_id: str, tables: Sequence[WrittenTable], *, metadata: sa.MetaData | None = None
) -> list[LedgerChange]:
    """Every change the run recorded, oldest first, with typed keys and both images; a table the job does not declare
    is an error. All of them in memory at once: for inspecting small runs (rollback itself reads page by page)."""
    defs = _definitions(tables, metadata)
    pages = _LedgerPages.open(conn, run_id, defs, PAGE_SIZE)
    return [change for page in pages() for change in page]


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _key_clause(table: sa.Table, pk: Sequence[str], keys: Sequence[Mapping[str, Any]]) -> sa.ColumnElement[bool]:
    if len(pk) == 1:
        return table.c[pk[0]].in_([k[pk[0]] for k in keys])
    return sa.tuple_(*(table.c[c] for c in pk)).in_([tuple(k[c] for c in pk) for k in keys])


def _current_rows(
    conn: Connection,
    defs: Mapping[str, tuple[sa.Table, WrittenTable]],
    changes: Sequence[LedgerChange],
    *,
    lock: bool,
) -> dict[tuple[str, str], dict[str, Any]]:
    """(table, row_key) → the row as stored now, for every key of ``changes`` (one page) that still exists."""
    by_table: dict[str, list[LedgerChange]] = {}
    for change in changes:
        by_table.setdefault(change.table, []).append(change)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for name, items in by_table.items():
        table, written = defs[name]
        for part in _chunks(items):
            query = sa.select(table).where(_key_clause(table, written.primary_key, [c.key for c in part]))
            if lock:
                # Holds the rows until commit (Postgres), so no live write slips in between the check and the undo.
                query = query.with_for_update()
            for row in conn.execute(query):
                values = dict(row._mapping)
                found[(name, ledger.row_key({c: values[c] for c in written.primary_key}))] = values
    return found


def _canonical_key(defs: Mapping[str, tuple[sa.Table, WrittenTable]], change: LedgerChange) -> str:
    # The ledger's row_key text may have been written from differently typed values; rebuild it from typed ones.
    return ledger.row_key({c: change.key[c] for c in defs[change.table][1].primary_key})


# ---------------------------------------------------------------------------------------------------- planning


def _plan(
    conn: Connection, run_id: str, defs: Mapping[str, tuple[sa.Table, WrittenTable]], *, lock: bool, page_size: int
) -> tuple[RollbackPlan, _LedgerPages]:
    """The plan, and the reader the rollback's later passes use (it stops at the changes the plan counted)."""
    where = conn.engine.url.render_as_string(hide_password=True)
    if not sa.inspect(conn).has_table(ledger.runs.name):
        raise ledger.RunNotFound(run_id, f"{where} (it has no run ledger)")
    query = sa.select(ledger.runs.c.status, ledger.runs.c.phase).where(ledger.runs.c.id == run_id)
    # Locking the run row serialises a rollback against a resume of the same run (Postgres; SQLite's BEGIN IMMEDIATE
    # already serialises writers); a read-only plan takes no lock.
    run = conn.execute(query.with_for_update() if lock else query).first()
    if run is None:
        raise ledger.RunNotFound(run_id, where)
    status_text = run.status
    if run.phase != ledger.APPLY_PHASE:
        raise NothingToRollBack(run_id, f"it is a {run.phase} run, which changes no data (only apply runs do)")
    if status_text == RunStatus.PLANNED.value:
        raise NothingToRollBack(run_id, "it is only planned: nothing was applied")
    unfinished = ledger.pending_batches(conn, run_id)
    if unfinished:
        # Their calls may have written rows the ledger does not list yet: undoing only the listed ones is not exact.
        raise DataError(
            f"run {run_id} has functions batch(es) {unfinished} whose written rows are not in the ledger yet; "
            f"finish them with `gatefill apply {run_id}` before rolling back"
        )
    pages = _LedgerPages.open(conn, run_id, defs, page_size)
    counts = {name: TableCounts(name) for name in defs}
    conflicts: list[Conflict] = []
    n = 0
    # Before-images are read too, though only after-images are compared: a malformed ledger row then stops the
    # rollback here, before any write.
    for page in pages():
        current = _current_rows(conn, defs, page, lock=lock)
        for change in page:
            n += 1
            if change.inserted:
                counts[change.table].inserted_by_run += 1
            else:
                counts[change.table].updated_by_run += 1
            row = current.get((change.table, _canonical_key(defs, change)))
            if row is None:
                conflicts.append(Conflict(change.table, change.row_key, "deleted"))
                continue
            differing = _differing(defs[change.table][0], change.after or {}, row)
            if differing:
                conflicts.append(Conflict(change.table, change.row_key, "changed", tuple(differing)))
    plan = RollbackPlan(run_id, RunStatus(status_text), n, tuple(counts.values()), tuple(conflicts))
    return plan, pages


def plan_rollback(
    conn: Connection,
    run_id: str,
    tables: Sequence[WrittenTable],
    *,
    metadata: sa.MetaData | None = None,
    page_size: int = PAGE_SIZE,
) -> RollbackPlan:
    """Read-only: the run's changes counted per table, its status, and the rows that changed since it wrote them."""
    return _plan(conn, run_id, _definitions(tables, metadata), lock=False, page_size=page_size)[0]


# ---------------------------------------------------------------------------------------------------- execution


def _group_runs(changes: Sequence[LedgerChange]) -> Iterator[list[LedgerChange]]:
    """Consecutive changes of the same table and kind, so bulk statements keep the changes' order between tables."""
    group: list[LedgerChange] = []
    for change in changes:
        if group and (group[-1].table, group[-1].inserted) != (change.table, change.inserted):
            yield group
            group = []
        group.append(change)
    if group:
        yield group


def _execute(
    conn: Connection, plan: RollbackPlan, pages: _Pages, defs: Mapping[str, tuple[sa.Table, WrittenTable]]
) -> dict[str, TableCounts]:
    counts = {t.table: dataclasses.replace(t) for t in plan.tables}
    # Deletes first, newest change first (children before parents), then inserts, oldest first (parents first), so
    # no before-image meets a unique or foreign key still held by a row the run wrote. Newest page first, each page
    # newest change first, keeps that order across pages.
    for page in pages(newest_first=True, before=False, after=False):
        for group in _group_runs(page):
            table, written = defs[group[0].table]
            for part in _chunks(group):
                removed = conn.execute(
                    table.delete().where(_key_clause(table, written.primary_key, [c.key for c in part]))
                ).rowcount
                tc = counts[table.name]
                if group[0].inserted:
                    tc.deleted += removed
                    tc.already_absent += len(part) - removed
                else:
                    tc.replaced += removed
    for page in pages(after=False, updated_only=True):
        for group in _group_runs(page):
            table, _ = defs[group[0].table]
            for part in _chunks(group):
                rows = [dict(c.before or {}) for c in part]
                # One executemany per identical column set; images of one table normally all have every column.
                for same in _by_columns(rows).values():
                    conn.execute(table.insert(), same)
                    counts[table.name].restored += len(same)
    return counts


def _by_columns(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(tuple(sorted(row)), []).append(row)
    return out


@dataclass
class _Tally:
    """What verification measured for one table; problems are kept only as far as the report can list them."""

    inserted: int = 0
    absent: int = 0
    updated: int = 0
    equal: int = 0
    inserted_problems: list[str] = field(default_factory=list)
    updated_problems: list[str] = field(default_factory=list)
    problems: int = 0

    def problem(self, into: list[str], text: str) -> None:
        self.problems += 1
        if len(into) < LISTED_PROBLEMS:
            into.append(text)


def _verify(
    conn: Connection, pages: _Pages, defs: Mapping[str, tuple[sa.Table, WrittenTable]]
) -> tuple[list[Check], tuple[str, ...]]:
    """Reads every key back: inserted keys must be absent, updated keys equal to their before-image.

    Returns the checks and the notes: the first ``LISTED_PROBLEMS`` problems, table by table (inserted keys first),
    and how many more there were.
    """
    tallies = {name: _Tally() for name in defs}
    for page in pages(after=False):
        current = _current_rows(conn, defs, page, lock=False)
        for change in page:
            name, tally = change.table, tallies[change.table]
            row = current.get((name, _canonical_key(defs, change)))
            if change.inserted:
                tally.inserted += 1
                if row is None:
                    tally.absent += 1
                else:
                    tally.problem(tally.inserted_problems, f"{name} {change.row_key} still present")
                continue
            tally.updated += 1
            if row is None:
                tally.problem(tally.updated_problems, f"{name} {change.row_key} missing after restore")
                continue
            differing = _differing(defs[name][0], change.before or {}, row)
            if differing:
                tally.problem(
                    tally.updated_problems,
                    f"{name} {change.row_key} differs from its before-image: {', '.join(differing)}",
                )
            else:
                tally.equal += 1
    checks: list[Check] = []
    listed: list[str] = []
    for name, (_, written) in defs.items():
        tally = tallies[name]
        listed += tally.inserted_problems + tally.updated_problems
        pk = ", ".join(written.primary_key)
        if tally.inserted:
            checks.append(
                Check(
                    f"{name}: rows the run inserted are absent",
                    "PASS" if tally.absent == tally.inserted else "FAIL",
                    f"{name}: {tally.absent} of {tally.inserted} rows the run inserted are absent",
                    {"expected": tally.inserted, "measured": tally.absent},
                    f"SELECT * FROM {name} WHERE ({pk}) IN (<{tally.inserted} inserted keys>)",
                )
            )
        if tally.updated:
            checks.append(
                Check(
                    f"{name}: before-images restored exactly",
                    "PASS" if tally.equal == tally.updated else "FAIL",
                    f"{name}: {tally.equal} of {tally.updated} rows equal their before-image in every column",
                    {"expected": tally.updated, "measured": tally.equal},
                    f"SELECT * FROM {name} WHERE ({pk}) IN (<{tally.updated} updated keys>), compared column by column",
                )
            )
    # Each table keeps its first LISTED_PROBLEMS of each kind, which is all the first LISTED_PROBLEMS overall can use.
    total = sum(t.problems for t in tallies.values())
    more = (f"... {total - LISTED_PROBLEMS} more",) if total > LISTED_PROBLEMS else ()
    return checks, tuple(listed[:LISTED_PROBLEMS]) + more


def rollback_run(
    db: Database,
    run_id: str,
    tables: Sequence[WrittenTable],
    *,
    now: datetime,
    artifacts_dir: Path,
    dry_run: bool = False,
    force: bool = False,
    metadata: sa.MetaData | None = None,
    page_size: int = PAGE_SIZE,
    fence: Fence | None = None,
) -> RollbackResult:
    """Undoes a run by primary key in one transaction, verifies it before commit and writes ``rollback_report.md``
    (a dry run writes ``rollback_dry_run.md``, so it never replaces the report of a real rollback).

    ``dry_run`` performs every step and the verification, then rolls the transaction back (nothing changes; the
    report says what would happen). Without ``force``, conflicts refuse the rollback (``RollbackConflicts``, after the
    report is written); with it, the before-images are restored over them. A run whose status cannot move to
    ``rolled_back`` (e.g. already rolled back, or still running) raises ``IllegalTransition`` before any write; a run
    that changed no data (not an apply run, or only planned), and a dry run of a rolled-back run, ``NothingToRollBack``.
    The ledger is read ``page_size`` changes at a time, in four passes: conflicts, deletes, restores, verification.
    ``fence`` (the run's lease, held by ``rollback_command``) is proven first in the transaction.
    """
    defs = _definitions(tables, metadata)
    refused = committed = False
    checks: list[Check] = []
    notes: tuple[str, ...] = ()
    with db.translate_errors(), db.engine.connect() as conn:
        trans = conn.begin()
        try:
            if fence is not None:
                fence(conn)
            plan, pages = _plan(conn, run_id, defs, lock=True, page_size=page_size)
            if dry_run and plan.status is RunStatus.ROLLED_BACK:
                raise NothingToRollBack(
                    run_id,
                    f"it was rolled back already (see {artifacts_dir / run_id / REPORT_NAME}); "
                    "a dry run now would only find its rows gone",
                )
            counts = {t.table: t for t in plan.tables}
            if not dry_run and not plan.allowed:
                raise ledger.IllegalTransition(run_id, plan.status, RunStatus.ROLLED_BACK)
            if plan.conflicts and not force and not dry_run:
                refused = True
            else:
                counts = _execute(conn, plan, pages, defs)
                checks, notes = _verify(conn, pages, defs)
                ok = all(c.verdict == "PASS" for c in checks)
                if not dry_run and ok:
                    n_deleted = sum(t.deleted for t in counts.values())
                    n_restored = sum(t.restored for t in counts.values())
                    reason = f"rollback: {n_deleted} inserted rows deleted, {n_restored} before-images restored"
                    if plan.conflicts:
                        reason += f", forced over {len(plan.conflicts)} conflict(s)"
                    ledger.transition(conn, run_id, RunStatus.ROLLED_BACK, now=now, reason=reason)
                    committed = True
            if committed:
                trans.commit()
            else:
                trans.rollback()
        except BaseException:
            if trans.is_active:
                trans.rollback()
            raise
    result = RollbackResult(
        run_id=run_id,
        environment=db.env.name,
        database=db.display_url,
        dry_run=dry_run,
        forced=force,
        refused=refused,
        committed=committed,
        status_before=plan.status,
        status_after=RunStatus.ROLLED_BACK if committed else plan.status,
        status_allows_rollback=plan.allowed,
        changes=plan.changes,
        tables=tuple(counts.values()),
        conflicts=plan.conflicts,
        verification=tuple(checks),
        generated_at=now,
        notes=notes,
    )
    path = artifacts_dir / run_id / (DRY_RUN_REPORT_NAME if dry_run else REPORT_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = dataclasses.replace(result, report_path=path)
    path.write_text(render_report(result), encoding="utf-8")
    if refused:
        raise RollbackConflicts(run_id, plan.conflicts, path)
    if not dry_run and not committed and plan.changes:
        raise RollbackVerificationFailed(run_id, [c for c in checks if c.verdict != "PASS"], path)
    return result


# ---------------------------------------------------------------------------------------------------- report


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_report(result: RollbackResult) -> str:
    """``rollback_report.md``: what was restored and deleted per table, conflicts, verification with its counts."""
    mode = "DRY RUN: executed inside a transaction that was then rolled back" if result.dry_run else "executed"
    if result.refused:
        mode = "REFUSED: nothing was changed"
    elif not result.dry_run and not result.committed:
        mode = "FAILED verification: the transaction was rolled back, nothing was changed"
    status = (
        f"{result.status_before.value} → {result.status_after.value}"
        if result.committed
        else f"{result.status_before.value} (unchanged)"
    )
    lines = [
        f"# Rollback report: run `{result.run_id}`",
        "",
        "| | |",
        "|---|---|",
        f"| verdict | **{result.verdict}** |",
        f"| mode | {mode} |",
        f"| forced | {'yes (--force): before-images restored over the conflicts below' if result.forced else 'no'} |",
        f"| environment | {_cell(result.environment)} (`{_cell(result.database)}`) |",
        f"| run status | {status} |",
        f"| generated at | {format_utc(result.generated_at)} |",
        f"| ledger changes | {result.changes} (`gatefill_changes WHERE run_id = '{_cell(result.run_id)}'`) |",
        f"| conflicts | {len(result.conflicts)} |",
        "",
    ]
    if not result.status_allows_rollback:
        lines += [
            f"Note: a run in status `{result.status_before.value}` cannot become `rolled_back`; "
            "a real rollback would be refused.",
            "",
        ]
    lines += [
        "Every key comes from the run's ledger; rows the run did not write are never addressed, and nothing is "
        "selected by timestamp. Rows are deleted by primary key, then before-images are inserted back whole.",
        "",
        "## Rows per table",
        "",
        "| table | inserted by the run | deleted | already absent | updated by the run | restored |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in result.tables:
        lines.append(
            f"| {t.table} | {t.inserted_by_run} | {t.deleted} | {t.already_absent} | {t.updated_by_run} | "
            f"{t.restored} |"
        )
    if result.refused:
        lines += ["", "(Refused before any write: the deleted/restored columns are zero because nothing ran.)"]
    lines += ["", "## Conflicts: rows changed since the run wrote them", ""]
    if not result.conflicts:
        lines.append("None: every row the run wrote still equals its after-image in every column.")
    else:
        lines += ["| table | key | what differs |", "|---|---|---|"]
        for c in result.conflicts:
            what = "deleted since the run wrote it" if c.reason == "deleted" else "changed: " + ", ".join(c.columns)
            lines.append(f"| {c.table} | `{_cell(c.row_key)}` | {_cell(what)} |")
    lines += ["", "## Verification (inside the transaction, before commit)", ""]
    if not result.verification:
        lines.append("Not run: " + ("the rollback was refused." if result.refused else "the run changed no rows."))
    else:
        lines += ["| check | expected | measured | verdict | query |", "|---|---:|---:|---|---|"]
        for check in result.verification:
            lines.append(
                f"| {_cell(check.name)} | {check.evidence.get('expected')} | {check.evidence.get('measured')} | "
                f"{check.verdict} | `{_cell(check.query)}` |"
            )
    if result.notes:
        lines += ["", "## Problems found by verification", ""] + [f"- {_cell(n)}" for n in result.notes]
    return "\n".join(lines) + "\n"


def render_rollback(result: RollbackResult) -> list[str]:
    """Short plain lines for the terminal."""
    head = "dry run of rollback" if result.dry_run else "rollback"
    lines = [f"{head} of run {result.run_id} on {result.environment} ({result.database}): {result.verdict}"]
    for t in result.tables:
        if t.inserted_by_run or t.updated_by_run:
            lines.append(
                f"  {t.table}: {t.deleted}/{t.inserted_by_run} inserted rows deleted"
                f" ({t.already_absent} already absent), {t.restored}/{t.updated_by_run} before-images restored"
            )
    for check in result.verification:
        lines.append(f"  {check.verdict:<4} {check.summary}")
    if result.conflicts:
        lines.append(f"  {len(result.conflicts)} conflict(s){' overwritten (--force)' if result.forced else ''}")
    if result.dry_run:
        lines.append("  nothing was changed (dry run)")
    elif result.committed:
        lines.append(f"  run {result.run_id}: {result.status_before.value} → {result.status_after.value}")
    if result.report_path is not None:
        lines.append(f"  report: {result.report_path}")
    return lines


# ---------------------------------------------------------------------------------------------------- SQL script


def _quote(text: str) -> str:
    if "\x00" in text:
        raise DataError("a text value contains a NUL character, which neither psql nor sqlite3 scripts can carry")
    return "'" + text.replace("'", "''") + "'"


def _text(text: str, pg: bool) -> str:
    """A text literal; on SQLite, carriage returns go through ``char(13)`` because the sqlite3 shell drops them."""
    if pg or "\r" not in text:
        return _quote(text)
    return "(" + " || char(13) || ".join(_quote(part) for part in text.split("\r")) + ")"


def _sqlite_real(value: float) -> str:
    """An SQLite expression that evaluates to exactly ``value``.

    SQLite's own decimal parser is not correctly rounded (3.40 misreads about 1 in 10,000 values written by ``repr``),
    so a non-integral float is written as an integer mantissa (exact below 2**53) scaled by powers of two, each of
    which is exact in binary floating point.
    """
    if math.isnan(value):
        return "NULL"  # SQLite stores NaN as NULL itself
    if math.isinf(value):
        return "9e999" if value > 0 else "-9e999"
    if value.is_integer() and abs(value) < 2**53:
        return repr(value)
    mantissa, exponent = math.frexp(value)
    m, e = int(mantissa * 2**53), exponent - 53
    while m % 2 == 0 and e < 0:
        m //= 2
        e += 1
    expr = f"CAST({m} AS REAL)"
    op = "/" if e < 0 else "*"
    remaining = abs(e)
    while remaining:
        step = min(remaining, 62)
        expr += f" {op} {2**step}"
        remaining -= step
    return f"({expr})"


def _literal(kind: str, value: Any, pg: bool) -> str:
    """A literal of ``value`` in the column's stored representation for the dialect."""
    if value is None:
        return "NULL"
    if kind == _TS:
        instant = _normal(_TS, value)
        if pg:
            return _quote(instant.isoformat(timespec="microseconds")) + "::timestamptz"
        return _quote(format_utc(instant))
    if kind == _JSON:
        return _quote(dumps_json(value)) + ("::jsonb" if pg else "")
    if kind == _ARRAY:
        if pg:
            if not value:
                return "'{}'::text[]"
            return "ARRAY[" + ", ".join("NULL" if v is None else _quote(str(v)) for v in value) + "]::text[]"
        return _quote(json.dumps(list(value), ensure_ascii=False))  # as TextArray stores it
    if kind == _UUID:
        return _text(str(value), pg) + ("::uuid" if pg else "")
    if kind == _BOOL:
        return ("TRUE" if value else "FALSE") if pg else ("1" if value else "0")
    if kind == _FLOAT:
        number = float(value)
        if not pg:
            return _sqlite_real(number)
        if math.isnan(number):
            return "'NaN'::float8"
        if math.isinf(number):
            return "'Infinity'::float8" if number > 0 else "'-Infinity'::float8"
        return _quote(repr(number)) + "::float8"  # Postgres parses with a correctly rounded strtod
    if kind == _INT:
        return str(int(value))
    if isinstance(value, bool):
        return ("TRUE" if value else "FALSE") if pg else ("1" if value else "0")
    if isinstance(value, int | float):
        return repr(value)
    return _text(str(value), pg)


def _ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else '"' + name.replace('"', '""') + '"'


def _key_where(table: sa.Table, pk: Sequence[str], key: Mapping[str, Any], pg: bool) -> str:
    return " AND ".join(f"{_ident(c)} = {_literal(_kind(table.c[c]), key[c], pg)}" for c in pk)


def _keys_in(table: sa.Table, pk: Sequence[str], keys: Sequence[Mapping[str, Any]], pg: bool) -> str:
    if len(pk) == 1:
        column = table.c[pk[0]]
        return f"{_ident(pk[0])} IN (" + ", ".join(_literal(_kind(column), k[pk[0]], pg) for k in keys) + ")"
    rows = ", ".join("(" + ", ".join(_literal(_kind(table.c[c]), k[c], pg) for c in pk) + ")" for k in keys)
    return "(" + ", ".join(_ident(c) for c in pk) + f") IN (VALUES {rows})"


def _row_matches(table: sa.Table, pk: Sequence[str], key: Mapping[str, Any], image: Mapping[str, Any], pg: bool) -> str:
    same = "IS NOT DISTINCT FROM" if pg else "IS"
    parts = [_key_where(table, pk, key, pg)]
    for name in _columns(table, image):
        if name not in pk:
            parts.append(f"{_ident(name)} {same} {_literal(_kind(table.c[name]), image[name], pg)}")
    return f"EXISTS (SELECT 1 FROM {_ident(table.name)} WHERE " + " AND ".join(parts) + ")"


def _columns(table: sa.Table, image: Mapping[str, Any]) -> list[str]:
    # The table's column order reads better than jsonb's key order (which the ledger's images come back in).
    return [c.name for c in table.columns if c.name in image]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _script_pg(dialect: str) -> bool:
    """Whether the script is for psql (else the sqlite3 shell)."""
    if dialect not in ("postgresql", "sqlite"):
        raise DataError(f"no rollback script for dialect {dialect!r}")
    return dialect == "postgresql"


class _Spools:
    """Temporary files for the script's sections that are written in another order than they appear in the script.

    A section comes into being when first written to; ``copy`` appends it to the script (nothing if never written).
    """

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._files: dict[str, IO[str]] = {}

    def __getitem__(self, section: str) -> IO[str]:
        if section not in self._files:
            # newline="": a literal may hold a bare \r, which universal-newline reading would turn into \n. The
            # exit stack closes (and so deletes) the file.
            spool = tempfile.TemporaryFile("w+", encoding="utf-8", newline="")  # noqa: SIM115
            self._files[section] = self._stack.enter_context(spool)
        return self._files[section]

    def copy(self, section: str, out: IO[str]) -> None:
        spool = self._files.get(section)
        if spool is not None:
            spool.seek(0)
            shutil.copyfileobj(spool, out)


def _write_script(
    out: IO[str],
    pages: _Pages,
    defs: Mapping[str, tuple[sa.Table, WrittenTable]],
    *,
    pg: bool,
    run_id: str,
    environment: str,
    database: str,
    generated_at: datetime,
    guard: bool,
) -> None:
    """Writes the rollback script (see ``rollback_sql``) to ``out`` in two passes over the run's changes.

    Pass one (newest change first, no images) counts the changes for the header and spools the DELETEs; pass two
    (oldest first) writes the guard straight to ``out`` and spools the INSERTs, the verification of each table and
    the after-commit counts, which are then copied in script order. Only a page of changes and one 500-key chunk
    per table and kind are in memory at a time.
    """
    with contextlib.ExitStack() as stack:
        spools = _Spools(stack)
        per_table: dict[str, list[int]] = {}  # table → [inserted, updated]
        oldest: dict[str, int] = {}  # table → position of its oldest change, counted from the newest one
        n = 0
        for page in pages(newest_first=True, before=False, after=False):
            for change in page:
                if change.table not in defs:
                    raise DataError(f"run {run_id} changed table {change.table!r}, which the job does not declare")
                n += 1
                oldest[change.table] = n
                per_table.setdefault(change.table, [0, 0])[0 if change.inserted else 1] += 1
                table, written = defs[change.table]
                where = _key_where(table, written.primary_key, change.key, pg)
                spools["delete"].write(f"DELETE FROM {_ident(table.name)} WHERE {where};\n")
        # The header names the tables in the order of their first change.
        order = sorted(per_table, key=lambda name: -oldest[name])
        summary = "; ".join(f"{t}: {per_table[t][0]} inserted, {per_table[t][1]} updated" for t in order) or "none"
        for line in _script_head(pg, run_id, environment, database, generated_at, guard, n, summary):
            out.write(line + "\n")
        if guard and n:
            out.write("\n-- 1. Guard: each row the run wrote still equals what it wrote.\n")
        check = "INSERT INTO gatefill_rollback_check (what, ok) SELECT"
        pending: dict[tuple[str, bool], list[Mapping[str, Any]]] = {}  # (table, inserted) → keys of the next chunk

        def flush(name: str, inserted: bool) -> None:
            """Verification of one chunk of keys: in the transaction (inserted ones), and the counts after commit."""
            keys = pending.pop((name, inserted), [])
            if not keys:
                return
            table, written = defs[name]
            where = _keys_in(table, written.primary_key, keys, pg)
            if inserted:
                what = _quote(f"verify: no {name} row the run inserted is still present")
                spools[f"verify inserted {name}"].write(
                    f"{check} {what}, count(*) = 0 FROM {_ident(name)} WHERE {where};\n"
                )
                label = _quote(f"{name}: rows the run inserted, still present")
                spools[f"final inserted {name}"].write(
                    f"SELECT {label} AS check_name, count(*) AS should_be_0 FROM {_ident(name)} WHERE {where};\n"
                )
            else:
                label = _quote(f"{name}: restored rows missing")
                spools[f"final updated {name}"].write(
                    f"SELECT {label} AS check_name, {len(keys)} - count(*) AS should_be_0 "
                    f"FROM {_ident(name)} WHERE {where};\n"
                )

        for page in pages(after=guard):
            for change in page:
                name = change.table
                table, written = defs[name]
                pk = written.primary_key
                if guard:
                    what = _quote(f"unchanged since the run wrote it: {name} {change.row_key}")
                    out.write(f"{check} {what}, {_row_matches(table, pk, change.key, change.after or {}, pg)};\n")
                chunk = pending.setdefault((name, change.inserted), [])
                chunk.append(change.key)
                if not change.inserted:
                    before = change.before or {}
                    cols = _columns(table, before)
                    values = ", ".join(_literal(_kind(table.c[c]), before[c], pg) for c in cols)
                    spools["insert"].write(
                        f"INSERT INTO {_ident(name)} ({', '.join(_ident(c) for c in cols)}) VALUES ({values});\n"
                    )
                    what = _quote(f"verify: equals its before-image: {name} {change.row_key}")
                    spools[f"verify updated {name}"].write(
                        f"{check} {what}, {_row_matches(table, pk, change.key, before, pg)};\n"
                    )
                if len(chunk) == _CHUNK:
                    flush(name, change.inserted)
        for name in defs:
            flush(name, True)
            flush(name, False)
        out.write("\n-- 2. Delete every row the run wrote, newest change first.\n")
        spools.copy("delete", out)
        out.write("\n-- 3. Insert the before-images back, oldest change first (every column, timestamps included).\n")
        spools.copy("insert", out)
        out.write("\n-- 4. Verify inside the transaction (a failed check aborts it: nothing is committed).\n")
        for name in defs:
            spools.copy(f"verify inserted {name}", out)
            spools.copy(f"verify updated {name}", out)
        for line in _script_tail(pg, run_id):
            out.write(line + "\n")
        for name in defs:
            spools.copy(f"final inserted {name}", out)
            spools.copy(f"final updated {name}", out)


def _script_head(
    pg: bool, run_id: str, environment: str, database: str, generated_at: datetime, guard: bool, n: int, summary: str
) -> list[str]:
    """The script's lines up to the ledger check (step 0): header comments, session settings, BEGIN."""
    shell = "psql -v ON_ERROR_STOP=1 -f THIS_FILE" if pg else "sqlite3 DATABASE_FILE < THIS_FILE"
    out = [
        f"-- gatefill rollback of run {_one_line(run_id)}",
        f"-- environment: {_one_line(environment)} ({_one_line(database)})",
        f"-- generated at: {format_utc(generated_at)}",
        f"-- ledger changes: {n} ({summary})",
        "-- Undoes exactly the rows the run wrote, by primary key (never by timestamp): deletes the rows it inserted",
        "-- and restores the before-images of the rows it updated, in one transaction that aborts on any error,",
        "-- then marks the run rolled_back in the ledger (a second execution is refused).",
        f"-- Run with: {shell}",
    ]
    if guard:
        out.append("-- Refuses (stops before any write) if a row changed since the run wrote it; a script generated")
        out.append("-- with --force omits that guard.")
    if not pg:
        out.append("-- Non-integral floats are written as integer / 2^k: exact, which SQLite's decimal parser is not.")
    out.append("")
    if pg:
        out += [
            "\\set ON_ERROR_STOP on",
            # LOCAL, like the ON COMMIT DROP table: nothing outlives the transaction, so the script is as safe to run
            # through a transaction-mode pooler (whose sessions other clients share) as on a direct connection.
            "BEGIN;",
            "SET LOCAL client_encoding = 'UTF8';",
            "SET LOCAL standard_conforming_strings = on;",
            "CREATE TEMP TABLE gatefill_rollback_check (what text NOT NULL, ok boolean NOT NULL CHECK (ok))"
            " ON COMMIT DROP;",
        ]
    else:
        out += [
            ".bail on",
            "PRAGMA foreign_keys = ON;",
            ".timeout 30000",
            "BEGIN IMMEDIATE;",
            "DROP TABLE IF EXISTS temp.gatefill_rollback_check;",
            # SQLite's message names the constraint, not the row: the name says where to look.
            "CREATE TEMP TABLE gatefill_rollback_check (what TEXT NOT NULL, ok INTEGER NOT NULL"
            ' CONSTRAINT "rollback check failed, see the statement at the line named" CHECK (ok));',
        ]
    allowed_from = ", ".join(
        _quote(s.value) for s, targets in ledger.TRANSITIONS.items() if RunStatus.ROLLED_BACK in targets
    )
    out += [
        "",
        "-- 0. The run must still be in a status that may become rolled_back (so the script cannot run twice).",
        f"INSERT INTO gatefill_rollback_check (what, ok) SELECT {_quote(f'run may become rolled_back: {run_id}')}, "
        f"EXISTS (SELECT 1 FROM {ledger.runs.name} WHERE id = {_quote(run_id)} AND status IN ({allowed_from}));",
    ]
    return out


def _script_tail(pg: bool, run_id: str) -> list[str]:
    """Step 5 (mark the run rolled_back), COMMIT, and the heading of the after-commit counts."""
    run = _quote(run_id)
    now_sql = "now()" if pg else "strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')"
    return [
        "",
        "-- 5. Record the rollback in the run ledger, as `gatefill rollback` does.",
        f"INSERT INTO {ledger.run_events.name} (run_id, at, from_status, to_status, reason) "
        f"SELECT id, {now_sql}, status, 'rolled_back', 'rollback script' FROM {ledger.runs.name} WHERE id = {run};",
        f"UPDATE {ledger.runs.name} SET status = 'rolled_back', updated_at = {now_sql}, finished_at = {now_sql} "
        f"WHERE id = {run};",
        "COMMIT;",
        "",
        "-- 6. After commit: counts that should all be 0.",
    ]


def rollback_sql(
    conn_or_dialect: Connection | str,
    changes: Sequence[LedgerChange],
    tables: Sequence[WrittenTable],
    *,
    run_id: str,
    environment: str,
    database: str,
    generated_at: datetime,
    metadata: sa.MetaData | None = None,
    guard: bool = True,
) -> str:
    """The rollback as a script for ``psql -v ON_ERROR_STOP=1 -f FILE`` or ``sqlite3 DB < FILE``.

    One transaction: (0) the run's status must still allow ``rolled_back`` (so the script cannot run twice);
    (1) unless ``guard`` is false, every row the run wrote must still equal its after-image; (2) DELETE every key
    the run wrote, newest change first; (3) INSERT every before-image, oldest change first; (4) verify that inserted
    keys are absent and restored rows equal their before-images; (5) mark the run ``rolled_back`` in the ledger;
    COMMIT; then SELECTs printing counts that should be 0. A failed check is a CHECK violation that stops the
    script (``ON_ERROR_STOP`` / ``.bail on``, both set by the script itself) with the transaction uncommitted.
    ``database`` must be a display URL (no password). Nothing is selected by timestamp.

    ``changes`` (as ``load_changes`` returns them) are all in memory; ``write_rollback_sql`` writes the same script
    from the ledger page by page.
    """
    dialect = conn_or_dialect if isinstance(conn_or_dialect, str) else conn_or_dialect.dialect.name
    pg = _script_pg(dialect)
    defs = _definitions(tables, metadata)
    text = io.StringIO()
    _write_script(
        text,
        _sequence_pages(changes, PAGE_SIZE),
        defs,
        pg=pg,
        run_id=run_id,
        environment=environment,
        database=database,
        generated_at=generated_at,
        guard=guard,
    )
    return text.getvalue()


def write_rollback_sql(
    db: Database,
    run_id: str,
    tables: Sequence[WrittenTable],
    path: Path,
    *,
    now: datetime | None = None,
    metadata: sa.MetaData | None = None,
    guard: bool = True,
    page_size: int = PAGE_SIZE,
) -> Path:
    """Writes the run's rollback script (e.g. ``backfill_logs/rollback_<YYYY-MM-DD>.sql``) and returns its path.

    The script is ``rollback_sql``'s, written as the ledger is read, ``page_size`` changes at a time; it appears at
    ``path`` only once complete.
    """
    defs = _definitions(tables, metadata)
    with db.connect() as conn:
        ledger.get_run(conn, run_id, where=db.display_url)
        pg = _script_pg(conn.dialect.name)
        pages = _LedgerPages.open(conn, run_id, defs, page_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            with partial.open("w", encoding="utf-8") as out:
                _write_script(
                    out,
                    pages,
                    defs,
                    pg=pg,
                    run_id=run_id,
                    environment=db.env.name,
                    database=db.display_url,
                    generated_at=now or datetime.now(UTC),
                    guard=guard,
                )
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return path


# ---------------------------------------------------------------------------------------------------- CLI glue


def rollback_command(
    env: Environment,
    run_id: str,
    *,
    dry_run: bool,
    force: bool,
    artifacts_dir: Path,
    find_job: Callable[[str], Job],
    now: datetime | None = None,
) -> RollbackResult:
    """What ``gatefill rollback RUN --env NAME [--dry-run] [--force]`` does: finds the run's job (``find_job``, the
    registry's lookup by the name the ledger recorded) and rolls it back."""
    with Database(env) as db:
        with db.connect() as conn:
            if not sa.inspect(conn).has_table(ledger.runs.name):
                raise ledger.RunNotFound(run_id, f"{db.display_url} (it has no run ledger)")
            run = ledger.get_run(conn, run_id, where=db.display_url)
        tables = find_job(run.job).written_tables()
        # The run's lease: a rollback never interleaves with an apply (or another rollback) of the same run.
        with RunLease(db, run_id, "rollback") as lease:
            return rollback_run(
                db,
                run_id,
                tables,
                now=now or datetime.now(UTC),
                artifacts_dir=artifacts_dir,
                dry_run=dry_run,
                force=force,
                fence=lease.fence,
            )
