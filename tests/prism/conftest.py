"""Live functions servers for the PRISM HTTP tests: a real uvicorn on 127.0.0.1 in a thread, per module and dialect.

As in httpx's own suite, the server runs in a thread on a socket bound to a free port, with signal handlers off
(``serve_in_thread``);
each module gets its own database (a copy of the session's initialised template) so module-scoped servers never
see another module's rows. Tests isolate themselves from the shared rate limiter by naming a client address of
their own (``X-Forwarded-For``, which uvicorn trusts from 127.0.0.1 only).
"""

from __future__ import annotations

import random
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gatefill.clock import Clock, RealClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.platform.server import create_app, serve_in_thread
from gatefill.prism.sandbox.simulator import Respondent, new_respondent, write_answers, write_session
from tests.conftest import create_pg_database, drop_pg_database, pg_env, pooled_env, sqlite_env

#: The service-role key of every test server; tests grep responses, logs and rows for it.
# Fixed, not random: the key appears in test ids, which must be identical on every xdist worker.
SERVICE_KEY = "sk-test-6ec2f8019aa64e3698c6c39d6c8cad25"
KEY_ENV = "GATEFILL_TEST_SERVICE_ROLE_KEY"


@contextmanager
def run_server(app: FastAPI) -> Iterator[str]:
    """Serves ``app`` on a free port of 127.0.0.1 in a thread; yields the base URL and stops it afterwards."""
    with serve_in_thread(app) as url:
        yield url


@dataclass
class Live:
    """A running functions server and the database behind it."""

    dialect: str
    env: Environment
    db: Database
    server_db: Database
    base_url: str
    clock: Clock
    http: httpx.Client
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    @property
    def functions_url(self) -> str:
        return f"{self.base_url}/functions/v1"

    def post(
        self,
        name: str,
        body: Any = None,
        *,
        key: bool = False,
        ip: str | None = None,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        sent = dict(headers or {})
        if key:
            sent["authorization"] = f"Bearer {SERVICE_KEY}"
        if ip:
            sent["x-forwarded-for"] = ip
        if content is None:
            return self.http.post(f"{self.functions_url}/{name}", json=body, headers=sent)
        return self.http.post(f"{self.functions_url}/{name}", content=content, headers=sent)

    def respondent(
        self, *, at: datetime | None = None, answers: bool = True, fc: bool = True, abandon: bool = False
    ) -> Respondent:
        """A session written as the frontend writes it: the row, then (optionally) all answers and FC choices."""
        r = new_respondent(self.rng, answer_ms=60_000, abandon=abandon)
        if not fc:
            r = Respondent(r.session_id, r.share_token, r.ip, r.answers, (), r.answer_ms, r.abandon_after)
        started = at or self.clock.now()
        write_session(self.db, r, started)
        if answers:
            write_answers(self.db, r, started, r.answer_ms)
        return r


def _module_database(kind: str, request: pytest.FixtureRequest, tmp: Path) -> tuple[Environment, str | None]:
    if kind == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp / "prism.db"
        shutil.copyfile(template, path)
        env = sqlite_env(path)
        return Environment(env.name, env.kind, env.database_url, service_role_key_env=KEY_ENV), None
    name = create_pg_database(request.getfixturevalue("pg_template"))
    env = pooled_env(name) if kind == "pooled" else pg_env(name)
    return Environment(env.name, env.kind, env.database_url, service_role_key_env=KEY_ENV, pooler=env.pooler), name


@pytest.fixture(scope="module")
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A fault-injection-enabled functions server on a fresh module database (SQLite and Postgres, and through
    PgBouncer for modules marked ``pooled``; tests/conftest.py gives the parameter)."""
    env, pg_name = _module_database(request.param, request, tmp_path_factory.mktemp("live"))
    # Small pool: parallel workers and other suites share one Postgres (max_connections 100); calls queue instead.
    server_db = Database(env, pool_size=8)
    db = Database(env)
    clock = RealClock()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(KEY_ENV, SERVICE_KEY)
            app = create_app(env, server_db, clock=clock, allow_fault_injection=True)
        with run_server(app) as url, httpx.Client(timeout=30) as http:
            yield Live(request.param, env, db, server_db, url, clock, http)
    finally:
        db.dispose()
        server_db.dispose()
        if pg_name:
            drop_pg_database(pg_name)


@contextmanager
def refused_writes(
    live: Live,
    table: str,
    session_id: str,
    *,
    sqlite_key: str = "NEW.session_id",
    pg_key: str = "NEW.session_id::text",
) -> Iterator[None]:
    """A trigger that refuses writes of ``session_id``'s rows to ``table`` (the error a broken table would raise)."""
    name = f"gf_refuse_{uuid.uuid4().hex[:10]}"
    if live.dialect == "sqlite":
        create = [
            f"CREATE TRIGGER {name} BEFORE INSERT ON {table} WHEN {sqlite_key} = '{session_id}' "
            "BEGIN SELECT RAISE(ABORT, 'test: write refused'); END"
        ]
        drop = [f"DROP TRIGGER {name}"]
    else:
        create = [
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF {pg_key} = TG_ARGV[0] THEN RAISE EXCEPTION 'test: write refused'; END IF; "
            "RETURN NEW; END $$",
            f"CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION {name}('{session_id}')",
        ]
        drop = [f"DROP TRIGGER {name} ON {table}", f"DROP FUNCTION {name}()"]
    with live.db.begin() as conn:
        for statement in create:
            conn.exec_driver_sql(statement)
    try:
        yield
    finally:
        with live.db.begin() as conn:
            for statement in drop:
                conn.exec_driver_sql(statement)
