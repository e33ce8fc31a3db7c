"""The rollback of a run as a SQL script for ``psql`` or the ``sqlite3`` shell (``backfill_logs/rollback_<date>.sql``).

The script does what ``gatefill.rollback.rollback_run`` does, for an operator who runs it by hand: value literals that
reproduce the stored values exactly (floats bit for bit), a guard that refuses when rows changed since the run wrote
them, and verification inside the transaction that aborts it if a check fails. It reads the ledger through the
rollback's own page reader, so memory stays bounded whatever the run's size.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import base as postgresql_base
from sqlalchemy.dialects.sqlite import base as sqlite_base
from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.db import Database, dumps_json, format_utc
from gatefill.errors import DataError
from gatefill.job import WrittenTable
from gatefill.ledger import RunStatus
from gatefill.rollback import (
    KEY_CHUNK,
    KIND_ARRAY,
    KIND_BOOL,
    KIND_FLOAT,
    KIND_INT,
    KIND_JSON,
    KIND_TIMESTAMP,
    KIND_UUID,
    PAGE_SIZE,
    ChangePages,
    LedgerChange,
    LedgerPages,
    column_kind,
    current_rows,
    normal_value,
    sequence_pages,
    table_definitions,
    written_image,
)

__all__ = ["rollback_sql", "write_rollback_sql"]


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
    if kind == KIND_TIMESTAMP:
        instant = normal_value(KIND_TIMESTAMP, value)
        if pg:
            return _quote(instant.isoformat(timespec="microseconds")) + "::timestamptz"
        return _quote(format_utc(instant))
    if kind == KIND_JSON:
        return _quote(dumps_json(value)) + ("::jsonb" if pg else "")
    if kind == KIND_ARRAY:
        if pg:
            if not value:
                return "'{}'::text[]"
            return "ARRAY[" + ", ".join("NULL" if v is None else _quote(str(v)) for v in value) + "]::text[]"
        return _quote(json.dumps(list(value), ensure_ascii=False))  # as TextArray stores it
    if kind == KIND_UUID:
        return _text(str(value), pg) + ("::uuid" if pg else "")
    if kind == KIND_BOOL:
        return ("TRUE" if value else "FALSE") if pg else ("1" if value else "0")
    if kind == KIND_FLOAT:
        number = float(value)
        if not pg:
            return _sqlite_real(number)
        if math.isnan(number):
            return "'NaN'::float8"
        if math.isinf(number):
            return "'Infinity'::float8" if number > 0 else "'-Infinity'::float8"
        return _quote(repr(number)) + "::float8"  # Postgres parses with a correctly rounded strtod
    if kind == KIND_INT:
        return str(int(value))
    if isinstance(value, bool):
        return ("TRUE" if value else "FALSE") if pg else ("1" if value else "0")
    if isinstance(value, float) and not pg:
        return _sqlite_real(value)  # a column gatefill does not type (the sql job's): exact all the same
    if isinstance(value, int | float):
        return repr(value)
    return _text(str(value), pg)


#: Words either dialect reserves: such a name is quoted even when it is lower-case (``user``, ``order``).
_RESERVED = frozenset(postgresql_base.RESERVED_WORDS) | frozenset(sqlite_base.SQLiteIdentifierPreparer.reserved_words)


def _ident(name: str) -> str:
    plain = re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in _RESERVED
    return name if plain else '"' + name.replace('"', '""') + '"'


def _table_ident(table: sa.Table) -> str:
    return f"{_ident(table.schema)}.{_ident(table.name)}" if table.schema else _ident(table.name)


def _key_where(table: sa.Table, pk: Sequence[str], key: Mapping[str, Any], pg: bool) -> str:
    return " AND ".join(f"{_ident(c)} = {_literal(column_kind(table.c[c]), key[c], pg)}" for c in pk)


def _keys_in(table: sa.Table, pk: Sequence[str], keys: Sequence[Mapping[str, Any]], pg: bool) -> str:
    if len(pk) == 1:
        column = table.c[pk[0]]
        return f"{_ident(pk[0])} IN (" + ", ".join(_literal(column_kind(column), k[pk[0]], pg) for k in keys) + ")"
    rows = ", ".join("(" + ", ".join(_literal(column_kind(table.c[c]), k[c], pg) for c in pk) + ")" for k in keys)
    return "(" + ", ".join(_ident(c) for c in pk) + f") IN (VALUES {rows})"


def _row_matches(table: sa.Table, pk: Sequence[str], key: Mapping[str, Any], image: Mapping[str, Any], pg: bool) -> str:
    same = "IS NOT DISTINCT FROM" if pg else "IS"
    parts = [_key_where(table, pk, key, pg)]
    for name in _columns(table, image):
        if name not in pk:
            parts.append(f"{_ident(name)} {same} {_literal(column_kind(table.c[name]), image[name], pg)}")
    return f"EXISTS (SELECT 1 FROM {_table_ident(table)} WHERE " + " AND ".join(parts) + ")"


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
    pages: ChangePages,
    defs: Mapping[str, tuple[sa.Table, WrittenTable]],
    *,
    pg: bool,
    run_id: str,
    environment: str,
    database: str,
    generated_at: datetime,
    guard: bool,
    conn: Connection | None,
) -> None:
    """Writes the rollback script (see ``rollback_sql``) to ``out`` in two passes over the run's changes (``conn``:
    where the guard reads back what the run wrote).

    Pass one (newest change first, no images) counts the changes for the header and spools the DELETEs; pass two
    (oldest first) writes the guard straight to ``out`` and spools the INSERTs, the verification of each table and
    the after-commit counts, which are then copied in script order. Only a page of changes and one 500-key chunk
    per table and kind are in memory at a time.
    """
    with contextlib.ExitStack() as stack:
        spools = _Spools(stack)
        n, summary = _spool_deletes(pages, defs, spools, pg=pg, run_id=run_id)
        for line in _script_head(pg, run_id, environment, database, generated_at, guard, n, summary):
            out.write(line + "\n")
        if guard and n:
            out.write("\n-- 1. Guard: each row the run wrote still equals what it wrote.\n")
        _guard_and_spool_restores(out, pages, defs, spools, pg=pg, guard=guard, conn=conn)
        out.write("\n-- 2. Delete every row the run wrote, newest change first.\n")
        spools.copy("delete", out)
        out.write("\n-- 3. Insert the before-images back, oldest change first (every column, timestamps included;\n")
        out.write("--    a job whose images hold only the columns it set has them updated back in place, by key).\n")
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


def _spool_deletes(
    pages: ChangePages, defs: Mapping[str, tuple[sa.Table, WrittenTable]], spools: _Spools, *, pg: bool, run_id: str
) -> tuple[int, str]:
    """Pass one: spools a DELETE per change, newest first; returns the number of changes and the header's summary
    of them per table (in the order of each table's first change)."""
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
            if written.partial_images and not change.inserted:
                continue  # restored in place (step 3): the row is not the run's to delete
            where = _key_where(table, written.primary_key, change.key, pg)
            spools["delete"].write(f"DELETE FROM {_table_ident(table)} WHERE {where};\n")
    order = sorted(per_table, key=lambda name: -oldest[name])
    summary = "; ".join(f"{t}: {per_table[t][0]} inserted, {per_table[t][1]} updated" for t in order) or "none"
    return n, summary


_CHECK = "INSERT INTO gatefill_rollback_check (what, ok) SELECT"


def _guard_and_spool_restores(
    out: IO[str],
    pages: ChangePages,
    defs: Mapping[str, tuple[sa.Table, WrittenTable]],
    spools: _Spools,
    *,
    pg: bool,
    guard: bool,
    conn: Connection | None,
) -> None:
    """Pass two, oldest change first: the guard of each change straight to ``out``; its before-image INSERT, its
    verification and the after-commit counts (per chunk of keys) to their spools."""
    pending: dict[tuple[str, bool], list[Mapping[str, Any]]] = {}  # (table, inserted) → keys of the next chunk
    for page in pages(after=guard):
        images = _written_images(conn, defs, page) if guard else {}
        for change in page:
            name = change.table
            table, written = defs[name]
            pk = written.primary_key
            if guard:
                what = _quote(f"unchanged since the run wrote it: {name} {change.row_key}")
                image = images.get(change.seq)
                # A row that no longer holds what the run wrote (or is gone) already: the check fails as it stands.
                matches = _row_matches(table, pk, change.key, image, pg) if image is not None else "1 = 0"
                out.write(f"{_CHECK} {what}, {matches};\n")
            chunk = pending.setdefault((name, change.inserted), [])
            chunk.append(change.key)
            if not change.inserted:
                _spool_restore(spools, table, written, change, pg)
            if len(chunk) == KEY_CHUNK:
                _spool_counts(spools, defs, name, change.inserted, pending.pop((name, change.inserted)), pg)
    for name in defs:
        for inserted in (True, False):
            _spool_counts(spools, defs, name, inserted, pending.pop((name, inserted), []), pg)


def _written_images(
    conn: Connection | None, defs: Mapping[str, tuple[sa.Table, WrittenTable]], page: Sequence[LedgerChange]
) -> dict[int, dict[str, Any]]:
    """Per change (by ``seq``): the values the run wrote, which the guard checks the row still holds.

    The ledger keeps a digest of them, so they are read back from the row itself, now, where it still digests to what
    the run wrote (a legacy change carries its whole after-image instead). A change missing here had its row changed
    or deleted before the script was written."""
    digested = [c for c in page if c.after_digest is not None]
    if digested and conn is None:
        raise DataError("a guarded rollback script needs the database: the ledger keeps digests of what the run wrote")
    rows = current_rows(conn, defs, digested, lock=False) if conn is not None and digested else {}
    found: dict[int, dict[str, Any]] = {}
    for change in page:
        table, written = defs[change.table]
        row = rows.get((change.table, ledger.row_key({c: change.key[c] for c in written.primary_key})))
        image = written_image(table, change, row) if change.after_digest is not None else dict(change.after or {})
        if image is not None:
            found[change.seq] = image
    return found


def _spool_restore(spools: _Spools, table: sa.Table, written: WrittenTable, change: LedgerChange, pg: bool) -> None:
    """The INSERT of an updated row's before-image (for a partial image: the UPDATE of its columns by key), and its
    verification inside the transaction."""
    name, pk = table.name, written.primary_key
    before = change.before or {}
    cols = _columns(table, before)
    values = [_literal(column_kind(table.c[c]), before[c], pg) for c in cols]
    if written.partial_images:
        sets = ", ".join(f"{_ident(c)} = {v}" for c, v in zip(cols, values, strict=True) if c not in pk)
        where = _key_where(table, pk, change.key, pg)
        spools["insert"].write(f"UPDATE {_table_ident(table)} SET {sets} WHERE {where};\n")
    else:
        names = ", ".join(_ident(c) for c in cols)
        spools["insert"].write(f"INSERT INTO {_table_ident(table)} ({names}) VALUES ({', '.join(values)});\n")
    what = _quote(f"verify: equals its before-image: {name} {change.row_key}")
    spools[f"verify updated {name}"].write(f"{_CHECK} {what}, {_row_matches(table, pk, change.key, before, pg)};\n")


def _spool_counts(
    spools: _Spools,
    defs: Mapping[str, tuple[sa.Table, WrittenTable]],
    name: str,
    inserted: bool,
    keys: Sequence[Mapping[str, Any]],
    pg: bool,
) -> None:
    """Verification of one chunk of keys: in the transaction (inserted ones), and the counts after commit."""
    if not keys:
        return
    table, written = defs[name]
    where = _keys_in(table, written.primary_key, keys, pg)
    if inserted:
        what = _quote(f"verify: no {name} row the run inserted is still present")
        spools[f"verify inserted {name}"].write(
            f"{_CHECK} {what}, count(*) = 0 FROM {_table_ident(table)} WHERE {where};\n"
        )
        label = _quote(f"{name}: rows the run inserted, still present")
        spools[f"final inserted {name}"].write(
            f"SELECT {label} AS check_name, count(*) AS should_be_0 FROM {_table_ident(table)} WHERE {where};\n"
        )
    else:
        label = _quote(f"{name}: restored rows missing")
        spools[f"final updated {name}"].write(
            f"SELECT {label} AS check_name, {len(keys)} - count(*) AS should_be_0 "
            f"FROM {_table_ident(table)} WHERE {where};\n"
        )


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
    (1) unless ``guard`` is false, every row the run wrote must still hold what the run wrote (the values read back
    now where the row still digests to what the ledger recorded; a row changed already fails here); (2) DELETE every key
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
    defs = table_definitions(tables, metadata)
    text = io.StringIO()
    _write_script(
        text,
        sequence_pages(changes, PAGE_SIZE),
        defs,
        pg=pg,
        run_id=run_id,
        environment=environment,
        database=database,
        generated_at=generated_at,
        guard=guard,
        conn=conn_or_dialect if isinstance(conn_or_dialect, Connection) else None,
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
    defs = table_definitions(tables, metadata)
    with db.connect() as conn:
        ledger.get_run(conn, run_id, where=db.display_url)
        pg = _script_pg(conn.dialect.name)
        pages = LedgerPages.open(conn, run_id, defs, page_size)
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
                    conn=conn,
                )
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return path
