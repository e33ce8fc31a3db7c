"""Exact rollback of a run by primary key: restore the before-images and delete the rows the run inserted.

The ledger (``gatefill_change_sets``) holds, for every row a run wrote, its primary key, its before-image (null: the
row was absent) and a digest of what the run wrote (``gatefill.images``; ledgers from before digests hold the whole
after-image, which is still read). Rollback addresses only those keys, so rows written by anyone else (live traffic
included) are never touched; nothing is ever selected by timestamp, which is how the original pipeline's rollback
deleted live users' rows and failed to undo overwritten ones (data model §3.1-3.2).

A row that changed since the run wrote it (its current values no longer digest to what the run wrote, or it was
deleted) is a *conflict*: restoring over it would destroy someone else's write, so rollback refuses, listing the
rows, unless forced. Execution is one transaction: every key is deleted (newest change first, so children go before
parents), then every before-image is inserted back whole (oldest change first), created_at and updated_at included;
restoring by DELETE + INSERT rather than UPDATE matters because the ``updated_at`` triggers would otherwise re-stamp the
row.
A job whose images hold only the columns it set (``WrittenTable.partial_images``, e.g. the ``sql`` job) has its
updated rows restored in place instead: an UPDATE of exactly those columns by key, which leaves every other column,
and the row itself (its foreign keys, its cascades), alone.
Verification reads every key back inside the same transaction before it commits, and the run moves to
``rolled_back`` in that transaction too. A dry run does all of it and then rolls the transaction back.

Memory stays bounded whatever the run's size: every pass (conflict check, deletes, restores, verification, the
script's sections) reads the ledger through one keyset-paginated reader, ``PAGE_SIZE`` changes at a time, together
with the current rows of that page's keys; what outlives a page is counters, the conflicts and the first
``LISTED_PROBLEMS`` verification problems.

``gatefill.reports.rollback_sql`` writes the same procedure as a script for ``psql`` or the ``sqlite3`` shell, reading
the ledger through the same pages (``LedgerPages``) and comparing values by the same column kinds (``column_kind``).
``gatefill.reports.rollback`` writes the result as ``rollback_report.md``.

Column types come from the job's table definitions (``WrittenTable.table``, or failing that the ``metadata``
argument): on SQLite the database itself cannot say which TEXT column holds JSON or a timestamp.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.db import Database, parse_utc
from gatefill.errors import DataError, GatefillError, UsageError
from gatefill.images import (
    KIND_ARRAY,
    KIND_BOOL,
    KIND_FLOAT,
    KIND_INT,
    KIND_JSON,
    KIND_TEXT,
    KIND_TIMESTAMP,
    KIND_UUID,
    column_kind,
    differing_columns,
    normal_value,
)
from gatefill.job import Check, Fence, WrittenTable
from gatefill.ledger import RunStatus

__all__ = [
    "DRY_RUN_REPORT_NAME",
    "KEY_CHUNK",
    "KIND_ARRAY",
    "KIND_BOOL",
    "KIND_FLOAT",
    "KIND_INT",
    "KIND_JSON",
    "KIND_TEXT",
    "KIND_TIMESTAMP",
    "KIND_UUID",
    "PAGE_SIZE",
    "REPORT_NAME",
    "ChangePages",
    "Conflict",
    "LedgerChange",
    "LedgerPages",
    "NothingToRollBack",
    "RollbackConflicts",
    "RollbackPlan",
    "RollbackResult",
    "RollbackVerificationFailed",
    "TableCounts",
    "changed_since_written",
    "column_kind",
    "current_rows",
    "load_changes",
    "normal_value",
    "plan_rollback",
    "rollback_run",
    "sequence_pages",
    "table_definitions",
    "written_image",
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
KEY_CHUNK = 500


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
    the ledger reads only the images it uses (see ``LedgerPages``): an image it did not read is None, and so is the
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
    #: What the run wrote: the digest of the row over ``after_columns`` (None: every column); a ledger written before
    #: digests has the whole after-image in ``after`` instead.
    after_digest: str | None = None
    after_columns: tuple[str, ...] | None = None
    after: Mapping[str, Any] | None = None


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
        if not self.columns:  # every changed column's mark in the digest collided: which ones is not known
            return f"{self.table} {self.row_key} changed since the run wrote it"
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

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "PASS" else 1

    def raise_for_verdict(self) -> None:
        """Raises what a refused rollback (``RollbackConflicts``) or a failed verification
        (``RollbackVerificationFailed``) is, naming ``report_path``; a dry run, or a rollback that committed, passes."""
        if self.refused:
            raise RollbackConflicts(self.run_id, self.conflicts, self.report_path)
        if not self.dry_run and not self.committed and self.changes:
            failed = [c for c in self.verification if c.verdict != "PASS"]
            raise RollbackVerificationFailed(self.run_id, failed, self.report_path)


# ---------------------------------------------------------------------------------------------------- column kinds


def table_definitions(
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
    kind = column_kind(column)
    if kind == KIND_INT:
        return int(text)
    if kind == KIND_FLOAT:
        return float(text)
    if kind == KIND_BOOL:
        return text == "True"
    if kind == KIND_TIMESTAMP:
        return parse_utc(text)
    if kind == KIND_UUID:
        return text.lower()  # as Postgres returns it
    return text


def changed_since_written(table: sa.Table, change: LedgerChange, row: Mapping[str, Any]) -> tuple[str, ...] | None:
    """None when ``row`` (as stored now) still holds what the run wrote; otherwise the columns that differ (() when
    the digest's per-column marks cannot tell: the row differs all the same)."""
    if change.after_digest is None:
        # A change recorded before digests: its whole after-image, compared column by column.
        differing = _differing(table, change.after or {}, row)
        return tuple(differing) if differing else None
    return differing_columns(table, change.after_digest, row, change.after_columns)


def written_image(table: sa.Table, change: LedgerChange, row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The values the run wrote to the row, when ``row`` (as stored now) still holds them: the row itself (its
    ``after_columns``), or a legacy after-image; None when the row changed or is gone."""
    if row is None or changed_since_written(table, change, row) is not None:
        return None
    if change.after_digest is None:
        return dict(change.after or {})
    names = change.after_columns if change.after_columns is not None else tuple(table.c.keys())
    return {name: row[name] for name in names}


def _differing(table: sa.Table, image: Mapping[str, Any], row: Mapping[str, Any]) -> list[str]:
    """Columns of ``image`` whose value differs from the stored ``row`` (both compared as values)."""
    return [
        name
        for name, value in image.items()
        if name in table.c
        and normal_value(column_kind(table.c[name]), value) != normal_value(column_kind(table.c[name]), row.get(name))
    ]


# ---------------------------------------------------------------------------------------------------- ledger pages


class ChangePages(Protocol):
    """A run's changes in pages, oldest or newest change first, with the images a pass asks for (an image not asked
    for is None); ``updated_only`` leaves out the changes that inserted their row."""

    def __call__(
        self, *, newest_first: bool = False, before: bool = True, after: bool = True, updated_only: bool = False
    ) -> Iterator[Sequence[LedgerChange]]: ...


def _change(
    run_id: str,
    defs: Mapping[str, tuple[sa.Table, WrittenTable]],
    rec: ledger.RecordedChange,
    *,
    before: bool,
    after: bool,
) -> LedgerChange:
    """A recorded change as a typed one, checked against the job's table definitions."""
    if rec.table not in defs:
        raise DataError(f"run {run_id} changed table {rec.table!r}, which the job does not declare")
    table, written = defs[rec.table]
    if set(rec.key) != set(written.primary_key):
        raise DataError(f"run {run_id}: key {rec.row_key} does not match {rec.table}{written.primary_key}")
    key = {c: _coerce_key(table.c[c], rec.key[c]) for c in written.primary_key}
    digest, columns, image = None, None, None
    if after:
        digest, columns = rec.after_digest, rec.after_columns
        if digest is None:
            image = _image(run_id, table, rec, rec.after, "after")
        elif columns is not None and not set(columns) <= _column_names(table):
            raise DataError(f"run {run_id}: {rec.table} {rec.row_key} has unknown after-columns {list(columns)!r}")
    return LedgerChange(
        rec.seq,
        rec.batch_no,
        rec.table,
        rec.row_key,
        key,
        rec.candidate,
        rec.inserted,
        _image(run_id, table, rec, rec.before, "before") if before and not rec.inserted else None,
        digest,
        columns,
        image,
    )


def _image(run_id: str, table: sa.Table, rec: ledger.RecordedChange, value: Any, which: str) -> dict[str, Any]:
    """A change's before- or after-image, which must name only columns of its table."""
    if not isinstance(value, dict):
        raise DataError(f"run {run_id}: {rec.table} {rec.row_key} has a {which}-image that is not an object")
    unknown = value.keys() - _column_names(table)
    if unknown:
        raise DataError(f"run {run_id}: {rec.table} {rec.row_key} has unknown column(s) {sorted(unknown)}")
    return value  # decoded for this change alone: nothing else holds it


@functools.cache
def _column_names(table: sa.Table) -> frozenset[str]:
    # Checked for every image read: built once per table rather than once per row.
    return frozenset(table.c.keys())


@dataclass(frozen=True)
class LedgerPages:
    """The one reader of a run's changes: pages of ``page_size`` changes from the ledger's change sets.

    Planning, execution, verification and the SQL script each make their passes through it, so none of them holds
    more than a page of changes (and the sets being expanded). ``first`` and ``upto`` are the run's oldest and
    newest change sequence numbers when reading began: every pass stays between them, so all passes see the same
    changes even on a connection that sees other transactions' commits between statements.
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
    ) -> LedgerPages:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        first, upto = ledger.change_range(conn, run_id)
        return cls(conn, run_id, defs, page_size, first, upto)

    def __call__(
        self, *, newest_first: bool = False, before: bool = True, after: bool = True, updated_only: bool = False
    ) -> Iterator[list[LedgerChange]]:
        if self.first is None or self.upto is None:
            return
        pages = ledger.change_pages(
            self.conn,
            self.run_id,
            page_size=self.page_size,
            newest_first=newest_first,
            seq_range=(self.first, self.upto),
        )
        for page in pages:
            changes = [
                _change(self.run_id, self.defs, rec, before=before, after=after)
                for rec in page
                if not (updated_only and rec.inserted)
            ]
            if changes:
                yield changes


def sequence_pages(changes: Sequence[LedgerChange], page_size: int) -> ChangePages:
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
    defs = table_definitions(tables, metadata)
    pages = LedgerPages.open(conn, run_id, defs, PAGE_SIZE)
    return [change for page in pages() for change in page]


def _chunks(items: Sequence[Any], size: int = KEY_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _key_clause(table: sa.Table, pk: Sequence[str], keys: Sequence[Mapping[str, Any]]) -> sa.ColumnElement[bool]:
    if len(pk) == 1:
        return table.c[pk[0]].in_([k[pk[0]] for k in keys])
    return sa.tuple_(*(table.c[c] for c in pk)).in_([tuple(k[c] for c in pk) for k in keys])


def current_rows(
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
) -> tuple[RollbackPlan, LedgerPages]:
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
    pages = LedgerPages.open(conn, run_id, defs, page_size)
    counts = {name: TableCounts(name) for name in defs}
    conflicts: list[Conflict] = []
    n = 0
    # Before-images are read too, though only after-images are compared: a malformed ledger row then stops the
    # rollback here, before any write.
    for page in pages():
        current = current_rows(conn, defs, page, lock=lock)
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
            differing = changed_since_written(defs[change.table][0], change, row)
            if differing is not None:
                conflicts.append(Conflict(change.table, change.row_key, "changed", differing))
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
    return _plan(conn, run_id, table_definitions(tables, metadata), lock=False, page_size=page_size)[0]


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
    conn: Connection, plan: RollbackPlan, pages: ChangePages, defs: Mapping[str, tuple[sa.Table, WrittenTable]]
) -> dict[str, TableCounts]:
    counts = {t.table: dataclasses.replace(t) for t in plan.tables}
    # Deletes first, newest change first (children before parents), then inserts, oldest first (parents first), so
    # no before-image meets a unique or foreign key still held by a row the run wrote. Newest page first, each page
    # newest change first, keeps that order across pages.
    for page in pages(newest_first=True, before=False, after=False):
        for group in _group_runs(page):
            table, written = defs[group[0].table]
            if written.partial_images and not group[0].inserted:
                continue  # restored in place below: the row is not the run's to delete
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
            table, written = defs[group[0].table]
            for part in _chunks(group):
                if written.partial_images:
                    counts[table.name].restored += _restore_in_place(conn, table, written.primary_key, part)
                    continue
                rows = [dict(c.before or {}) for c in part]
                # One executemany per identical column set; images of one table normally all have every column.
                for same in _by_columns(rows).values():
                    conn.execute(table.insert(), same)
                    counts[table.name].restored += len(same)
    return counts


def _restore_in_place(conn: Connection, table: sa.Table, pk: Sequence[str], changes: Sequence[LedgerChange]) -> int:
    """UPDATEs the columns of each partial before-image back by key (one executemany per column set); the rows it
    found. A row deleted since the run wrote it stays deleted: its image does not hold the whole row."""
    keys: dict[str, sa.BindParameter[Any]] = {c: sa.bindparam(f"gf_key_{i}") for i, c in enumerate(pk)}
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for change in changes:
        values = {c: v for c, v in (change.before or {}).items() if c not in pk}
        row = {f"gf_set_{c}": v for c, v in values.items()} | {keys[c].key: change.key[c] for c in pk}
        by_columns.setdefault(tuple(sorted(values)), []).append(row)
    found = 0
    for columns, rows in by_columns.items():
        if not columns:
            continue
        statement = (
            table.update()
            .where(*(table.c[c] == keys[c] for c in pk))
            .values({c: sa.bindparam(f"gf_set_{c}") for c in columns})
        )
        found += conn.execute(statement, rows).rowcount
    return found


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
    gone: int = 0  # partial images only: rows deleted since the run wrote them, which stay deleted
    inserted_problems: list[str] = field(default_factory=list)
    updated_problems: list[str] = field(default_factory=list)
    problems: int = 0

    def problem(self, into: list[str], text: str) -> None:
        self.problems += 1
        if len(into) < LISTED_PROBLEMS:
            into.append(text)


def _tally_change(
    tally: _Tally, definition: tuple[sa.Table, WrittenTable], change: LedgerChange, row: Mapping[str, Any] | None
) -> None:
    """Counts one change read back: an inserted row must be gone, an updated one equal to its before-image."""
    name = change.table
    if change.inserted:
        tally.inserted += 1
        if row is None:
            tally.absent += 1
        else:
            tally.problem(tally.inserted_problems, f"{name} {change.row_key} still present")
        return
    tally.updated += 1
    if row is None and definition[1].partial_images:
        tally.gone += 1  # deleted since (a forced rollback): an image of some columns cannot bring it back
        return
    if row is None:
        tally.problem(tally.updated_problems, f"{name} {change.row_key} missing after restore")
        return
    differing = _differing(definition[0], change.before or {}, row)
    if differing:
        tally.problem(
            tally.updated_problems, f"{name} {change.row_key} differs from its before-image: {', '.join(differing)}"
        )
    else:
        tally.equal += 1


def _verify(
    conn: Connection, pages: ChangePages, defs: Mapping[str, tuple[sa.Table, WrittenTable]]
) -> tuple[list[Check], tuple[str, ...]]:
    """Reads every key back: inserted keys must be absent, updated keys equal to their before-image.

    Returns the checks and the notes: the first ``LISTED_PROBLEMS`` problems, table by table (inserted keys first),
    and how many more there were.
    """
    tallies = {name: _Tally() for name in defs}
    for page in pages(after=False):
        current = current_rows(conn, defs, page, lock=False)
        for change in page:
            row = current.get((change.table, _canonical_key(defs, change)))
            _tally_change(tallies[change.table], defs[change.table], change, row)
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
                    "PASS" if tally.equal + tally.gone == tally.updated else "FAIL",
                    f"{name}: {tally.equal} of {tally.updated} rows equal their before-image in every column"
                    + (f" ({tally.gone} deleted since the run wrote them stay deleted)" if tally.gone else ""),
                    {"expected": tally.updated - tally.gone, "measured": tally.equal},
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
    """Undoes a run by primary key in one transaction, verifies it before commit and returns what it measured
    (``gatefill.reports.rollback`` writes it as ``rollback_report.md``, a dry run as ``rollback_dry_run.md``).

    ``dry_run`` performs every step and the verification, then rolls the transaction back (nothing changes; the
    result says what would happen). Without ``force``, conflicts refuse the rollback (a result with verdict REFUSED,
    whose ``raise_for_verdict`` raises ``RollbackConflicts``); with it, the before-images are restored over them. A
    rollback whose verification fails commits nothing (verdict FAIL). A run whose status cannot move to
    ``rolled_back`` (e.g. already rolled back, or still running) raises ``IllegalTransition`` before any write; a run
    that changed no data (not an apply run, or only planned), and a dry run of a rolled-back run, ``NothingToRollBack``.
    The ledger is read ``page_size`` changes at a time, in four passes: conflicts, deletes, restores, verification.
    ``fence`` (the run's lease, held by ``gatefill.commands.rollback_environment``) is proven first in the transaction;
    ``artifacts_dir`` is where the run's reports are (a refusal names the report of an earlier rollback).
    """
    defs = table_definitions(tables, metadata)
    with db.translate_errors(), db.engine.connect() as conn:
        trans = conn.begin()
        try:
            if fence is not None:
                fence(conn)
            plan, pages = _plan(conn, run_id, defs, lock=True, page_size=page_size)
            _refuse_early(plan, run_id, artifacts_dir, dry_run=dry_run)
            undone = _undo(conn, plan, pages, defs, now=now, dry_run=dry_run, force=force)
            if undone.committed:
                trans.commit()
            else:
                trans.rollback()
        except BaseException:
            if trans.is_active:
                trans.rollback()
            raise
    return _result(db, run_id, plan, undone, now=now, dry_run=dry_run, force=force)


def _refuse_early(plan: RollbackPlan, run_id: str, artifacts_dir: Path, *, dry_run: bool) -> None:
    """Refuses, before any write, a dry run of a rolled-back run and a rollback the run's status does not allow."""
    if dry_run and plan.status is RunStatus.ROLLED_BACK:
        raise NothingToRollBack(
            run_id,
            f"it was rolled back already (see {artifacts_dir / run_id / REPORT_NAME}); "
            "a dry run now would only find its rows gone",
        )
    if not dry_run and not plan.allowed:
        raise ledger.IllegalTransition(run_id, plan.status, RunStatus.ROLLED_BACK)


def _result(
    db: Database, run_id: str, plan: RollbackPlan, undone: _Undone, *, now: datetime, dry_run: bool, force: bool
) -> RollbackResult:
    """What the rollback measured, for its report."""
    return RollbackResult(
        run_id=run_id,
        environment=db.env.name,
        database=db.display_url,
        dry_run=dry_run,
        forced=force,
        refused=undone.refused,
        committed=undone.committed,
        status_before=plan.status,
        status_after=RunStatus.ROLLED_BACK if undone.committed else plan.status,
        status_allows_rollback=plan.allowed,
        changes=plan.changes,
        tables=tuple(undone.counts.values()),
        conflicts=plan.conflicts,
        verification=tuple(undone.checks),
        generated_at=now,
        notes=undone.notes,
    )


@dataclass(frozen=True)
class _Undone:
    """What the rollback's transaction did: counts per table, verification, and whether it was refused or
    committed (neither: a dry run, or a failed verification, both rolled back)."""

    counts: dict[str, TableCounts]
    checks: list[Check] = field(default_factory=list)
    notes: tuple[str, ...] = ()
    refused: bool = False
    committed: bool = False


def _undo(
    conn: Connection,
    plan: RollbackPlan,
    pages: LedgerPages,
    defs: Mapping[str, tuple[sa.Table, WrittenTable]],
    *,
    now: datetime,
    dry_run: bool,
    force: bool,
) -> _Undone:
    """Deletes, restores and verifies in the caller's transaction, and marks the run ``rolled_back`` when that is
    to be committed; conflicts refuse a real rollback that is not forced, before any write."""
    if plan.conflicts and not force and not dry_run:
        return _Undone({t.table: t for t in plan.tables}, refused=True)
    counts = _execute(conn, plan, pages, defs)
    checks, notes = _verify(conn, pages, defs)
    if dry_run or not all(c.verdict == "PASS" for c in checks):
        return _Undone(counts, checks, notes)
    n_deleted = sum(t.deleted for t in counts.values())
    n_restored = sum(t.restored for t in counts.values())
    reason = f"rollback: {n_deleted} inserted rows deleted, {n_restored} before-images restored"
    if plan.conflicts:
        reason += f", forced over {len(plan.conflicts)} conflict(s)"
    ledger.transition(conn, plan.run_id, RunStatus.ROLLED_BACK, now=now, reason=reason)
    return _Undone(counts, checks, notes, committed=True)
