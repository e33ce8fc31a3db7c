"""The functions server's call deadline (``serve functions --call-timeout``), on a real server and database.

A call stuck behind someone else's lock must answer 504 ``CALL_TIMEOUT`` when its deadline passes, whether it waits
on the event loop (finalizeAssessment on Postgres) or on a thread (SQLite, score_fc_session); on Postgres the stuck
statement must also end on the server (statement_timeout) while the lock is still held; and the server must serve
the same session normally once the lock is gone, with one profile and no leftover transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from gatefill.cli import app as cli
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.errors import DatabaseError, DatabaseUnreachable
from gatefill.prism.platform.server import create_app, serve_in_thread, server_database
from gatefill.prism.schema import assessment_sessions, fn_logs, profiles
from tests.conftest import Target, _conninfo, server_url
from tests.prism.conftest import KEY_ENV, SERVICE_KEY
from tests.prism.test_service_pg import _finished_sessions

#: Short, so each test waits about a second; the grace Postgres statements get on top is the server's own (1 s).
DEADLINE = 1.0


@contextmanager
def _server(target: Target) -> Iterator[httpx.Client]:
    """A functions server with a one-second call deadline on the target's database; yields a client for it."""
    env = Environment(target.env.name, target.env.kind, target.env.database_url, service_role_key_env=KEY_ENV)
    db = server_database(env, DEADLINE)
    try:
        app = create_app(env, db, service_role_key=SERVICE_KEY, call_timeout=DEADLINE)
        with serve_in_thread(app) as url, httpx.Client(base_url=f"{url}/functions/v1", timeout=30) as http:
            yield http
    finally:
        db.dispose()


def _post(http: httpx.Client, name: str, session_id: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = http.post(name, json={"session_id": session_id}, headers={"authorization": f"Bearer {SERVICE_KEY}"})
    return response, time.monotonic() - started


@contextmanager
def _holding_the_session(target: Target, session_id: str) -> Iterator[None]:
    """Another client's open transaction that blocks a finalize of ``session_id``: the session row's lock on
    Postgres, the database's write lock on SQLite. Released (rolled back) on exit."""
    if target.dialect == "sqlite":
        path = target.env.database_url.removeprefix("sqlite:///")
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    with psycopg.connect(_conninfo(target.env.database_url)) as pg:
        pg.execute("SELECT 1 FROM assessment_sessions WHERE id = %s FOR UPDATE", (session_id,))
        yield
        pg.rollback()


def _profiles(target: Target, session_id: str) -> int:
    with target.db.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).where(profiles.c.session_id == session_id)).scalar_one())


def _timeout_events(target: Target) -> list[dict[str, Any]]:
    """The payloads of the call_timeout events, once the server's call thread has written them (up to 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        with target.db.connect() as conn:
            payloads = [
                row[0] for row in conn.execute(sa.select(fn_logs.c.payload).where(fn_logs.c.evt == "call_timeout"))
            ]
        if payloads or time.monotonic() > deadline:
            return payloads
        time.sleep(0.05)


def _admin_rows(query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(_conninfo(server_url()), autocommit=True) as admin:
        return admin.execute(query, params).fetchall()


def _database_name(target: Target) -> str:
    return target.env.database_url.rsplit("/", 1)[1].split("?", 1)[0]


def test_a_finalize_stuck_behind_a_lock_answers_504_at_its_deadline_and_the_session_finalizes_afterwards(
    target: Target,
) -> None:
    (respondent,) = _finished_sessions(target, 1, seed=11)
    with _server(target) as http:
        with _holding_the_session(target, respondent.session_id):
            response, took = _post(http, "finalizeAssessment", respondent.session_id)
            assert response.status_code == 504
            assert response.json() == {"error": "the call did not finish within 1 s", "code": "CALL_TIMEOUT"}
            # At the deadline, not at the database's own waits (busy_timeout 30 s on SQLite, none on Postgres).
            assert DEADLINE * 0.9 <= took < DEADLINE + 4
        response, _ = _post(http, "finalizeAssessment", respondent.session_id)
        assert response.status_code == 200, response.text
        assert response.json()["ok"] is True
        # The soak counts the timeout with the failed calls: the server wrote its event once it could.
        (event,) = _timeout_events(target)
        assert event["fn"] == "finalizeAssessment" and event["session_id"] == respondent.session_id
        assert event["timeout_s"] == DEADLINE
    assert _profiles(target, respondent.session_id) == 1
    with target.db.connect() as conn:
        status = conn.execute(
            sa.select(assessment_sessions.c.status).where(assessment_sessions.c.id == respondent.session_id)
        ).scalar_one()
    assert status == "completed"
    if target.dialect == "postgresql":
        # The call given up on kept nothing open: no transaction left idle, no lock waiter. Its backend, whose
        # client hung up, may take a moment to finish exiting (it releases the lock before it leaves the view);
        # a transaction really left open would stay.
        deadline = time.monotonic() + 5
        while True:
            leftovers = _admin_rows(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND (state LIKE 'idle in transaction%%' OR wait_event_type = 'Lock')",
                _database_name(target),
            )
            if leftovers == [(0,)] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert leftovers == [(0,)]


def _lock_waiters(name: str) -> int:
    rows = _admin_rows("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", name)
    return int(rows[0][0])


def test_a_statement_of_a_call_on_a_thread_ends_on_the_postgres_server_while_the_lock_is_still_held(
    pg_target: Target,
) -> None:
    """score_fc_session runs on a call thread, which the deadline cannot stop: its upsert, waiting for a row lock,
    must still end on the server (the server's statement_timeout), not wait for as long as the lock is held."""
    (respondent,) = _finished_sessions(pg_target, 1, seed=12)
    name = _database_name(pg_target)
    with _server(pg_target) as http:
        assert _post(http, "score_fc_session", respondent.session_id)[0].status_code == 200
        with psycopg.connect(_conninfo(pg_target.env.database_url)) as holder:
            holder.execute("SELECT 1 FROM fc_scores WHERE session_id = %s FOR UPDATE", (respondent.session_id,))
            response, took = _post(http, "score_fc_session", respondent.session_id)
            assert response.status_code == 504 and response.json()["code"] == "CALL_TIMEOUT"
            assert took < DEADLINE + 4
            # Written while the other client still holds its lock: the event does not wait for the stuck call.
            assert [e["fn"] for e in _timeout_events(pg_target)] == ["score_fc_session"]
            # The upsert is still waiting right after the answer, and gives up within its grace.
            deadline = time.monotonic() + 10
            while _lock_waiters(name) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _lock_waiters(name) == 0
            assert time.monotonic() - (deadline - 10) < 5
            # ... while the other client's lock was held all along.
            assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            holder.rollback()
        response, _ = _post(http, "score_fc_session", respondent.session_id)
        assert response.status_code == 200, response.text


def test_a_statement_timeout_is_a_database_error_not_an_unreachable_database(pg_target: Target) -> None:
    bounded = Database(pg_target.env, statement_timeout=0.2)
    try:
        with bounded.connect() as conn:
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar_one() == "200ms"
        with pytest.raises(DatabaseError) as raised, bounded.translate_errors(), bounded.begin() as conn:
            conn.execute(sa.text("SELECT pg_sleep(2)"))
        assert not isinstance(raised.value, DatabaseUnreachable)
        assert "statement timeout" in str(raised.value)
        with bounded.connect() as conn:  # the same pool goes on working
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        bounded.dispose()
    with pg_target.db.connect() as conn:  # an engine without the setting keeps the server's default
        assert conn.execute(sa.text("SHOW statement_timeout")).scalar_one() == "0"


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_serve_functions_refuses_a_call_timeout_that_is_not_a_positive_number(value: str) -> None:
    result = CliRunner().invoke(cli, ["serve", "functions", "--env", "staging", "--call-timeout", value])
    assert result.exit_code == 2
    assert "--call-timeout" in result.output
