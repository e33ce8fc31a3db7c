"""``db.insert_rows``: the bulk writer of apply and the ledger (COPY on Postgres) stores what an INSERT stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from gatefill.db import JSONValue, TextArray, UTCTimestamp, UUIDText, insert_rows
from tests.conftest import Target, _admin

METADATA = sa.MetaData()


def _twin(name: str) -> sa.Table:
    return sa.Table(
        name,
        METADATA,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("session_id", UUIDText()),
        sa.Column("label", sa.Text()),
        sa.Column("score", sa.Float(53)),
        sa.Column("flag", sa.Boolean()),
        sa.Column("doc", JSONValue()),
        sa.Column("tags", TextArray()),
        sa.Column("at", UTCTimestamp()),
    )


BY_COPY = _twin("rows_by_copy")
BY_INSERT = _twin("rows_by_insert")

ROWS: list[dict[str, Any]] = [
    {
        "id": 1,
        "session_id": "7f0c1a6e-3b1d-4c3e-9a51-0d6f2b1e8c01",
        "label": "tab\there, newline\nthere, back\\slash, quote ' and \" and é",
        "score": 0.1 + 0.2,
        "flag": True,
        # An integral float is stored as JavaScript prints it (90, not 90.0), nested values too.
        "doc": {"Te": 90.0, "list": [1.5, 2.0, None, "x"], "nested": {"z": -0.0, "big": 1e300}, "u": "ü"},
        "tags": ["a", "b c", "d,e", 'quo"te'],
        "at": datetime(2025, 9, 17, 8, 0, 0, 123456, tzinfo=UTC),
    },
    {
        "id": 2,
        "session_id": None,
        "label": None,
        "score": 90,  # an int into a float column
        "flag": False,
        "doc": None,
        "tags": None,
        "at": datetime(2025, 9, 17, 10, 30, tzinfo=timezone(timedelta(hours=2))),  # another offset, same instant
    },
    {
        "id": 3,
        "session_id": "00000000-0000-4000-8000-000000000000",
        "label": "",
        "score": -1234.5678,
        "flag": None,
        "doc": [],
        "tags": [],
        "at": "2025-09-17T08:00:00.000001Z",  # text, as UTCTimestamp accepts it
    },
]


@pytest.fixture
def tables(target: Target) -> Target:
    METADATA.create_all(target.db.engine)
    return target


def _stored(target: Target, table: sa.Table) -> list[dict[str, Any]]:
    with target.db.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.id))]


def test_rows_stored_by_insert_rows_equal_rows_stored_by_an_insert(tables: Target) -> None:
    with tables.db.begin() as conn:
        insert_rows(conn, BY_COPY, ROWS)
        conn.execute(BY_INSERT.insert(), ROWS)
        insert_rows(conn, BY_COPY, [])  # nothing to do is not an error
    by_copy, by_insert = _stored(tables, BY_COPY), _stored(tables, BY_INSERT)
    assert by_copy == by_insert
    doc = by_copy[0]["doc"]
    assert doc["Te"] == 90 and type(doc["Te"]) is int and doc["list"] == [1.5, 2, None, "x"] and doc["u"] == "ü"
    assert by_copy[1]["at"] == by_copy[0]["at"].replace(hour=8, minute=30, microsecond=0)
    if tables.dialect == "postgresql":
        # The stored documents are the same jsonb values, down to their text (number forms included).
        with tables.db.connect() as conn:
            texts = conn.execute(
                sa.text("SELECT c.doc::text, i.doc::text FROM rows_by_copy c JOIN rows_by_insert i USING (id)")
            ).all()
        assert all(a == b for a, b in texts) and texts[0][0] is not None and '"Te": 90' in texts[0][0]


def test_a_duplicate_key_raises_integrity_error_and_a_savepoint_keeps_the_rest(tables: Target) -> None:
    with tables.db.begin() as conn:
        insert_rows(conn, BY_COPY, ROWS[:1])
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
            insert_rows(conn, BY_COPY, ROWS)  # id 1 again
        insert_rows(conn, BY_COPY, ROWS[1:])
    assert [r["id"] for r in _stored(tables, BY_COPY)] == [1, 2, 3]


@pytest.mark.parametrize("target", ["postgresql"], indirect=True)
def test_a_lost_connection_is_raised_as_an_invalidated_dbapi_error(tables: Target) -> None:
    with tables.db.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        with _admin() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(sa.exc.DBAPIError) as raised:
            insert_rows(conn, BY_COPY, ROWS)
        assert raised.value.connection_invalidated
        assert isinstance(raised.value.orig, psycopg.OperationalError)
    assert _stored(tables, BY_COPY) == []  # the pool hands out a fresh connection afterwards
