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

``rollback_sql`` emits the same procedure as a script for ``psql`` or the ``sqlite3`` shell, with value literals
that reproduce the stored values exactly (floats bit for bit), a guard that refuses when rows changed since the run
wrote them, and verification inside the transaction that aborts it if a check fails.

Column types come from the job's table definitions (``WrittenTable.table``, or failing that the ``metadata``
argument): on SQLite the database itself cannot say which TEXT column holds JSON or a timestamp.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.config import Environment
from gatefill.db import Database, JSONValue, TextArray, UTCTimestamp, UUIDText, dumps_json, format_utc, parse_utc
from gatefill.errors import DataError, GatefillError
from gatefill.job import Check, WrittenTable
from gatefill.ledger import RunStatus

__all__ = [
    "Conflict",
    "LedgerChange",
    "RollbackConflicts",
    "RollbackPlan",
    "RollbackResult",
    "RollbackStep",
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
#: How many conflicts the one-line refusal names (the report lists them all).
LISTED_IN_ERROR = 5
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


# ---------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LedgerChange:
    """One row change a run recorded, as rollback reads it back from the ledger (key values typed by column)."""

    seq: int
    batch_no: int
    table: str
    row_key: str
    key: Mapping[str, Any]
    session_id: str | None
    before: Mapping[str, Any] | None
    after: Mapping[str, Any]


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


@dataclass(frozen=True)
class RollbackStep:
    """Undo one change: ``delete`` a row the run inserted, or ``restore`` (delete, then insert) its before-image."""

    table: str
    row_key: str
    key: Mapping[str, Any]
    action: str  # "delete" | "restore"
    before: Mapping[str, Any] | None


@dataclass(frozen=True)
class RollbackPlan:
    """What undoing a run takes: its changes, the steps (newest change first) and the rows that changed since."""

    run_id: str
    status: RunStatus
    changes: tuple[LedgerChange, ...]
    steps: tuple[RollbackStep, ...]
    conflicts: tuple[Conflict, ...]

    @property
    def allowed(self) -> bool:
        """Whether the run's status may move to ``rolled_back`` at all."""
        return RunStatus.ROLLED_BACK in ledger.TRANSITIONS[self.status]


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


# ---------------------------------------------------------------------------------------------------- planning


def load_changes(
    conn: Connection, run_id: str, tables: Sequence[WrittenTable], *, metadata: sa.MetaData | None = None
) -> list[LedgerChange]:
    """Every change the run recorded, oldest first, with typed keys; a table the job does not declare is an error."""
    defs = _definitions(tables, metadata)
    return _load_changes(conn, run_id, defs)


def _load_changes(
    conn: Connection, run_id: str, defs: Mapping[str, tuple[sa.Table, WrittenTable]]
) -> list[LedgerChange]:
    out: list[LedgerChange] = []
    for row in ledger.changes_for(conn, run_id):
        if row.table_name not in defs:
            raise DataError(f"run {run_id} changed table {row.table_name!r}, which the job does not declare")
        table, written = defs[row.table_name]
        raw = json.loads(row.row_key)
        if set(raw) != set(written.primary_key):
            raise DataError(f"run {run_id}: key {row.row_key} does not match {row.table_name}{written.primary_key}")
        key = {c: _coerce_key(table.c[c], raw[c]) for c in written.primary_key}
        before = dict(row.before) if row.before is not None else None
        for image in (before, row.after):
            unknown = sorted(set(image or {}) - set(table.c.keys()))
            if unknown:
                raise DataError(f"run {run_id}: {row.table_name} {row.row_key} has unknown column(s) {unknown}")
        out.append(
            LedgerChange(
                row.id, row.batch_no, row.table_name, row.row_key, key, row.session_id, before, dict(row.after)
            )
        )
    return out


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
    """(table, row_key) → the row as stored now, for every key the run wrote that still exists."""
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


def _unfinished_batches(conn: Connection, run_id: str) -> list[int]:
    """Batches the functions executor started (intents recorded) but whose ledger rows have not committed."""
    if not sa.inspect(conn).has_table("gatefill_fn_intents"):
        return []
    rows = conn.execute(
        sa.text("SELECT DISTINCT batch_no FROM gatefill_fn_intents WHERE run_id = :run ORDER BY batch_no"),
        {"run": run_id},
    )
    return [int(n) for (n,) in rows]


def _plan(
    conn: Connection, run_id: str, defs: Mapping[str, tuple[sa.Table, WrittenTable]], *, lock: bool
) -> RollbackPlan:
    where = conn.engine.url.render_as_string(hide_password=True)
    if not sa.inspect(conn).has_table(ledger.runs.name):
        raise ledger.RunNotFound(run_id, f"{where} (it has no run ledger)")
    query = sa.select(ledger.runs.c.status).where(ledger.runs.c.id == run_id)
    # Locking the run row serialises a rollback against a resume of the same run (Postgres; SQLite's BEGIN IMMEDIATE
    # already serialises writers); a read-only plan takes no lock.
    status_text = conn.execute(query.with_for_update() if lock else query).scalar_one_or_none()
    if status_text is None:
        raise ledger.RunNotFound(run_id, where)
    unfinished = _unfinished_batches(conn, run_id)
    if unfinished:
        # Their calls may have written rows the ledger does not list yet: undoing only the listed ones is not exact.
        raise DataError(
            f"run {run_id} has functions batch(es) {unfinished} whose written rows are not in the ledger yet; "
            f"finish them with `gatefill apply {run_id}` before rolling back"
        )
    changes = _load_changes(conn, run_id, defs)
    current = _current_rows(conn, defs, changes, lock=lock)
    conflicts: list[Conflict] = []
    for change in changes:
        row = current.get((change.table, _canonical_key(defs, change)))
        if row is None:
            conflicts.append(Conflict(change.table, change.row_key, "deleted"))
            continue
        differing = _differing(defs[change.table][0], change.after, row)
        if differing:
            conflicts.append(Conflict(change.table, change.row_key, "changed", tuple(differing)))
    steps = tuple(
        RollbackStep(c.table, c.row_key, c.key, "delete" if c.before is None else "restore", c.before)
        for c in reversed(changes)
    )
    return RollbackPlan(run_id, RunStatus(status_text), tuple(changes), steps, tuple(conflicts))


def _canonical_key(defs: Mapping[str, tuple[sa.Table, WrittenTable]], change: LedgerChange) -> str:
    # The ledger's row_key text may have been written from differently typed values; rebuild it from typed ones.
    return ledger.row_key({c: change.key[c] for c in defs[change.table][1].primary_key})


def plan_rollback(
    conn: Connection, run_id: str, tables: Sequence[WrittenTable], *, metadata: sa.MetaData | None = None
) -> RollbackPlan:
    """Read-only: the run's changes, the undo steps (newest change first) and the rows that changed since."""
    return _plan(conn, run_id, _definitions(tables, metadata), lock=False)


# ---------------------------------------------------------------------------------------------------- execution


def _group_runs(steps: Sequence[RollbackStep]) -> Iterator[list[RollbackStep]]:
    """Consecutive steps of the same table and action, so bulk statements keep the steps' order between tables."""
    group: list[RollbackStep] = []
    for step in steps:
        if group and (group[-1].table, group[-1].action) != (step.table, step.action):
            yield group
            group = []
        group.append(step)
    if group:
        yield group


def _execute_steps(
    conn: Connection, plan: RollbackPlan, defs: Mapping[str, tuple[sa.Table, WrittenTable]]
) -> dict[str, TableCounts]:
    counts = {name: TableCounts(name) for name in defs}
    for change in plan.changes:
        if change.before is None:
            counts[change.table].inserted_by_run += 1
        else:
            counts[change.table].updated_by_run += 1
    # Deletes first (newest change first: children before parents), then inserts (oldest first: parents first), so
    # no before-image meets a unique or foreign key still held by a row the run wrote.
    for group in _group_runs(plan.steps):
        table, written = defs[group[0].table]
        for part in _chunks(group):
            removed = conn.execute(
                table.delete().where(_key_clause(table, written.primary_key, [s.key for s in part]))
            ).rowcount
            tc = counts[table.name]
            if group[0].action == "delete":
                tc.deleted += removed
                tc.already_absent += len(part) - removed
            else:
                tc.replaced += removed
    restores = [s for s in reversed(plan.steps) if s.action == "restore"]
    for group in _group_runs(restores):
        table, _ = defs[group[0].table]
        for part in _chunks(group):
            rows = [dict(s.before or {}) for s in part]
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


def _verify(
    conn: Connection, plan: RollbackPlan, defs: Mapping[str, tuple[sa.Table, WrittenTable]]
) -> tuple[list[Check], list[str]]:
    """Reads every key back: inserted keys must be absent, updated keys equal to their before-image."""
    current = _current_rows(conn, defs, plan.changes, lock=False)
    checks: list[Check] = []
    problems: list[str] = []
    for name, (table, written) in defs.items():
        inserted = [c for c in plan.changes if c.table == name and c.before is None]
        updated = [c for c in plan.changes if c.table == name and c.before is not None]
        if not inserted and not updated:
            continue
        pk = ", ".join(written.primary_key)
        absent = 0
        for change in inserted:
            if (name, _canonical_key(defs, change)) in current:
                problems.append(f"{name} {change.row_key} still present")
            else:
                absent += 1
        equal = 0
        for change in updated:
            row = current.get((name, _canonical_key(defs, change)))
            if row is None:
                problems.append(f"{name} {change.row_key} missing after restore")
                continue
            differing = _differing(table, change.before or {}, row)
            if differing:
                problems.append(f"{name} {change.row_key} differs from its before-image: {', '.join(differing)}")
            else:
                equal += 1
        if inserted:
            ok = absent == len(inserted)
            checks.append(
                Check(
                    f"{name}: rows the run inserted are absent",
                    "PASS" if ok else "FAIL",
                    f"{name}: {absent} of {len(inserted)} rows the run inserted are absent",
                    {"expected": len(inserted), "measured": absent},
                    f"SELECT * FROM {name} WHERE ({pk}) IN (<{len(inserted)} inserted keys>)",
                )
            )
        if updated:
            ok = equal == len(updated)
            checks.append(
                Check(
                    f"{name}: before-images restored exactly",
                    "PASS" if ok else "FAIL",
                    f"{name}: {equal} of {len(updated)} rows equal their before-image in every column",
                    {"expected": len(updated), "measured": equal},
                    f"SELECT * FROM {name} WHERE ({pk}) IN (<{len(updated)} updated keys>), compared column by column",
                )
            )
    return checks, problems


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
) -> RollbackResult:
    """Undoes a run by primary key in one transaction, verifies it before commit and writes ``rollback_report.md``.

    ``dry_run`` performs every step and the verification, then rolls the transaction back (nothing changes; the
    report says what would happen). Without ``force``, conflicts refuse the rollback (``RollbackConflicts``, after the
    report is written); with it, the before-images are restored over them. A run whose status cannot move to
    ``rolled_back`` (e.g. already rolled back, or still running) raises ``IllegalTransition`` before any write.
    """
    defs = _definitions(tables, metadata)
    refused = committed = False
    counts: dict[str, TableCounts] = {}
    checks: list[Check] = []
    problems: list[str] = []
    with db.translate_errors(), db.engine.connect() as conn:
        trans = conn.begin()
        try:
            plan = _plan(conn, run_id, defs, lock=True)
            if not dry_run and not plan.allowed:
                raise ledger.IllegalTransition(run_id, plan.status, RunStatus.ROLLED_BACK)
            if plan.conflicts and not force and not dry_run:
                refused = True
            else:
                counts = _execute_steps(conn, plan, defs)
                checks, problems = _verify(conn, plan, defs)
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
    if not counts:
        counts = {name: TableCounts(name) for name in defs}
        for change in plan.changes:
            if change.before is None:
                counts[change.table].inserted_by_run += 1
            else:
                counts[change.table].updated_by_run += 1
    notes = tuple(problems[:50]) + ((f"... {len(problems) - 50} more",) if len(problems) > 50 else ())
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
        changes=len(plan.changes),
        tables=tuple(counts.values()),
        conflicts=plan.conflicts,
        verification=tuple(checks),
        generated_at=now,
        notes=notes,
    )
    path = artifacts_dir / run_id / REPORT_NAME
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
    """
    dialect = conn_or_dialect if isinstance(conn_or_dialect, str) else conn_or_dialect.dialect.name
    if dialect not in ("postgresql", "sqlite"):
        raise DataError(f"no rollback script for dialect {dialect!r}")
    pg = dialect == "postgresql"
    defs = _definitions(tables, metadata)
    for change in changes:
        if change.table not in defs:
            raise DataError(f"run {run_id} changed table {change.table!r}, which the job does not declare")
    per_table: dict[str, list[int]] = {}
    for change in changes:
        n = per_table.setdefault(change.table, [0, 0])
        n[0 if change.before is None else 1] += 1
    summary = "; ".join(f"{t}: {n[0]} inserted, {n[1]} updated" for t, n in per_table.items()) or "none"
    shell = "psql -v ON_ERROR_STOP=1 -f THIS_FILE" if pg else "sqlite3 DATABASE_FILE < THIS_FILE"
    out = [
        f"-- gatefill rollback of run {_one_line(run_id)}",
        f"-- environment: {_one_line(environment)} ({_one_line(database)})",
        f"-- generated at: {format_utc(generated_at)}",
        f"-- ledger changes: {len(changes)} ({summary})",
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
            "SET client_encoding = 'UTF8';",
            "SET standard_conforming_strings = on;",
            "BEGIN;",
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
    check = "INSERT INTO gatefill_rollback_check (what, ok) SELECT"
    run = _quote(run_id)
    allowed_from = ", ".join(
        _quote(s.value) for s, targets in ledger.TRANSITIONS.items() if RunStatus.ROLLED_BACK in targets
    )
    out += [
        "",
        "-- 0. The run must still be in a status that may become rolled_back (so the script cannot run twice).",
        f"{check} {_quote(f'run may become rolled_back: {run_id}')}, EXISTS (SELECT 1 FROM {ledger.runs.name} "
        f"WHERE id = {run} AND status IN ({allowed_from}));",
    ]
    if guard and changes:
        out += ["", "-- 1. Guard: each row the run wrote still equals what it wrote."]
        for change in changes:
            table, written = defs[change.table]
            what = _quote(f"unchanged since the run wrote it: {change.table} {change.row_key}")
            out.append(f"{check} {what}, {_row_matches(table, written.primary_key, change.key, change.after, pg)};")
    out += ["", "-- 2. Delete every row the run wrote, newest change first."]
    for change in reversed(changes):
        table, written = defs[change.table]
        out.append(f"DELETE FROM {_ident(table.name)} WHERE {_key_where(table, written.primary_key, change.key, pg)};")
    out += ["", "-- 3. Insert the before-images back, oldest change first (every column, timestamps included)."]
    for change in changes:
        if change.before is None:
            continue
        table, _ = defs[change.table]
        cols = _columns(table, change.before)
        values = ", ".join(_literal(_kind(table.c[c]), change.before[c], pg) for c in cols)
        out.append(f"INSERT INTO {_ident(table.name)} ({', '.join(_ident(c) for c in cols)}) VALUES ({values});")
    out += ["", "-- 4. Verify inside the transaction (a failed check aborts it: nothing is committed)."]
    finals: list[str] = []
    for name, (table, written) in defs.items():
        inserted = [c.key for c in changes if c.table == name and c.before is None]
        for part in _chunks(inserted):
            where = _keys_in(table, written.primary_key, part, pg)
            label = f"{name}: rows the run inserted, still present"
            what = _quote(f"verify: no {name} row the run inserted is still present")
            out.append(f"{check} {what}, count(*) = 0 FROM {_ident(name)} WHERE {where};")
            finals.append(
                f"SELECT {_quote(label)} AS check_name, count(*) AS should_be_0 FROM {_ident(name)} WHERE {where};"
            )
        for change in changes:
            if change.table != name or change.before is None:
                continue
            what = _quote(f"verify: equals its before-image: {name} {change.row_key}")
            out.append(f"{check} {what}, {_row_matches(table, written.primary_key, change.key, change.before, pg)};")
        updated = [c.key for c in changes if c.table == name and c.before is not None]
        for part in _chunks(updated):
            where = _keys_in(table, written.primary_key, part, pg)
            label = f"{name}: restored rows missing"
            finals.append(
                f"SELECT {_quote(label)} AS check_name, {len(part)} - count(*) AS should_be_0 "
                f"FROM {_ident(name)} WHERE {where};"
            )
    now_sql = "now()" if pg else "strftime('%Y-%m-%dT%H:%M:%f000Z', 'now')"
    out += [
        "",
        "-- 5. Record the rollback in the run ledger, as `gatefill rollback` does.",
        f"INSERT INTO {ledger.run_events.name} (run_id, at, from_status, to_status, reason) "
        f"SELECT id, {now_sql}, status, 'rolled_back', 'rollback script' FROM {ledger.runs.name} WHERE id = {run};",
        f"UPDATE {ledger.runs.name} SET status = 'rolled_back', updated_at = {now_sql}, finished_at = {now_sql} "
        f"WHERE id = {run};",
        "COMMIT;",
        "",
        "-- 6. After commit: counts that should all be 0.",
        *finals,
    ]
    return "\n".join(out) + "\n"


def write_rollback_sql(
    db: Database,
    run_id: str,
    tables: Sequence[WrittenTable],
    path: Path,
    *,
    now: datetime | None = None,
    metadata: sa.MetaData | None = None,
    guard: bool = True,
) -> Path:
    """Writes the run's rollback script (e.g. ``backfill_logs/rollback_<YYYY-MM-DD>.sql``) and returns its path."""
    defs = _definitions(tables, metadata)
    with db.connect() as conn:
        ledger.get_run(conn, run_id, where=db.display_url)
        changes = _load_changes(conn, run_id, defs)
        text = rollback_sql(
            conn,
            changes,
            tables,
            run_id=run_id,
            environment=db.env.name,
            database=db.display_url,
            generated_at=now or datetime.now(UTC),
            metadata=metadata,
            guard=guard,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- CLI glue


def rollback_command(
    env: Environment,
    run_id: str,
    *,
    dry_run: bool,
    force: bool,
    artifacts_dir: Path,
    now: datetime | None = None,
) -> RollbackResult:
    """What ``gatefill rollback RUN --env NAME [--dry-run] [--force]`` does: finds the run's job and rolls it back."""
    with Database(env) as db:
        with db.connect() as conn:
            if not sa.inspect(conn).has_table(ledger.runs.name):
                raise ledger.RunNotFound(run_id, f"{db.display_url} (it has no run ledger)")
            run = ledger.get_run(conn, run_id, where=db.display_url)
        return rollback_run(
            db,
            run_id,
            _job_tables(run.job),
            now=now or datetime.now(UTC),
            artifacts_dir=artifacts_dir,
            dry_run=dry_run,
            force=force,
        )


def _job_tables(job: str) -> Sequence[WrittenTable]:
    # The CLI wiring is the one place that maps a job's name to its code (as cli.py does for plan and apply).
    if job == "prism":
        from gatefill.prism.job import PrismJob

        return PrismJob().written_tables()
    raise DataError(f"the run belongs to job {job!r}, which this gatefill does not know")
