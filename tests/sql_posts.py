"""A small table for the ``sql`` job's tests (``posts``: some rows lack a slug), and exact snapshots of its rows.

Shared by tests/test_sql_job.py and tests/test_phases_both_jobs.py.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from gatefill.db import Database
from gatefill.jobs.sql import SqlJob

#: The README's example, as gatefill.toml declares it.
FILL_SLUG: dict[str, Any] = {
    "kind": "sql",
    "table": "posts",
    "key": "id",
    "where": "slug is null",
    "set": {"slug": "lower(title)"},
    "verify": "slug is not null",
}

_DDL = {
    "sqlite": "CREATE TABLE posts (id INTEGER PRIMARY KEY, title TEXT, slug TEXT, body TEXT, score REAL)",
    "postgresql": "CREATE TABLE posts (id integer PRIMARY KEY, title text, slug text, body text, score float8)",
}
#: Rows whose id is a multiple of this already have a slug: the job must leave them alone.
PRESET_EVERY = 5


def dialect_of(db: Database) -> str:
    return "sqlite" if db.engine.dialect.name == "sqlite" else "postgresql"


def make_posts(db: Database, n: int = 23) -> list[int]:
    """Creates ``posts`` with ``n`` rows; returns the ids the job should fill (slug NULL), in key order."""
    rows = [
        {
            "id": i,
            "title": f"Title {i} ÄÖ 'quoted'",
            "slug": f"kept-{i}" if i % PRESET_EVERY == 0 else None,
            "body": f"body {i}\nline two",
            "score": i / 3,
        }
        for i in range(1, n + 1)
    ]
    with db.begin() as conn:
        conn.exec_driver_sql(_DDL[dialect_of(db)])
        conn.execute(
            sa.text("INSERT INTO posts (id, title, slug, body, score) VALUES (:id, :title, :slug, :body, :score)"),
            rows,
        )
    return [r["id"] for r in rows if r["slug"] is None]


def fill_slug(**changes: Any) -> SqlJob:
    """The README's job, with some keys changed (``None`` removes a key)."""
    table = {k: v for k, v in {**FILL_SLUG, **changes}.items() if v is not None}
    return SqlJob.from_config("fill_slug", table)


def snapshot(db: Database, table: str = "posts", key: str = "id") -> dict[str, str]:
    """Every row of ``table`` as the database stores it, byte for byte, by key: Postgres' text form of the whole row;
    on SQLite ``quote()`` of every column, which shows each value's storage class (3 and 3.0 differ)."""
    with db.connect() as conn:
        if conn.dialect.name == "postgresql":
            rows = conn.execute(sa.text(f"SELECT CAST({key} AS text), CAST(t AS text) FROM {table} t"))
            return {k: v for k, v in rows}
        names = [c["name"] for c in sa.inspect(conn).get_columns(table)]
        quoted = " || '|' || ".join(f'quote("{n}")' for n in names)
        rows = conn.execute(sa.text(f"SELECT CAST({key} AS text), {quoted} FROM {table}"))
        return {k: v for k, v in rows}


def lowered(db: Database, i: int) -> str:
    """``lower(title)`` of row ``i`` as made: SQLite's ``lower`` folds ASCII letters only."""
    return f"title {i} " + ("ÄÖ" if dialect_of(db) == "sqlite" else "äö") + " 'quoted'"


def slugs(db: Database) -> dict[int, str | None]:
    with db.connect() as conn:
        return {int(i): s for i, s in conn.execute(sa.text("SELECT id, slug FROM posts ORDER BY id"))}
