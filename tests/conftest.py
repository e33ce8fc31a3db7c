"""Shared fixtures: real SQLite files and real Postgres databases, each test getting a fresh copy of an initialised one.

Postgres is found through ``GATEFILL_TEST_DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``).
The run creates one template database (schema + reference data) per worker, clones it per test with
``CREATE DATABASE ... TEMPLATE`` (cheap) and drops everything it created. If the server cannot be reached, the whole
run stops with one line saying how to point it at a server: the Postgres half is never silently skipped.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.schema import init_schema, load_reference_data
from tests.pgbouncer import PgBouncer, pgbouncer_binary, start_pgbouncer

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
RUN_ID = uuid.uuid4().hex[:8]


def server_url() -> str:
    return os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_PG)


def _conninfo(url: str) -> str:
    # psycopg wants a libpq URL; SQLAlchemy-style driver suffixes are tolerated in the variable.
    return url.replace("postgresql+psycopg://", "postgresql://")


def _with_database(url: str, name: str) -> str:
    base, _, _ = _conninfo(url).rpartition("/")
    query = ""
    if "?" in url:
        query = "?" + url.split("?", 1)[1]
    return f"{base}/{name}{query}"


def _admin() -> psycopg.Connection:
    return psycopg.connect(_conninfo(server_url()), autocommit=True, connect_timeout=5)


def pytest_sessionstart(session: pytest.Session) -> None:
    try:
        with _admin() as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.exit(
            f"Postgres unreachable ({reason}); start it or set GATEFILL_TEST_DATABASE_URL=postgresql://USER@HOST:PORT/DB",
            returncode=2,
        )
    try:
        pgbouncer_binary()
    except RuntimeError as exc:
        # The pooled half of the suite is never skipped: without PgBouncer the run stops here.
        pytest.exit(str(exc), returncode=2)


#: Fixtures that give the same test on SQLite and Postgres (and, for tests marked ``pooled``, through PgBouncer in
#: transaction mode), with their scope: ``target`` (a fresh database per test) and ``live`` (a functions server per
#: module, tests/prism/conftest.py).
_DIALECT_FIXTURES = {"target": "function", "live": "module"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for name, scope in _DIALECT_FIXTURES.items():
        if name in metafunc.fixturenames and not any(
            m.name == "parametrize" and name in m.args[0] for m in metafunc.definition.iter_markers()
        ):
            pooled = metafunc.definition.get_closest_marker("pooled") is not None
            params = ["sqlite", "postgresql", *(["pooled"] if pooled else [])]
            metafunc.parametrize(name, params, indirect=True, scope=scope)  # type: ignore[arg-type]


def create_pg_database(template: str | None = None) -> str:
    """Creates a uniquely named database (optionally from a template) and returns its name."""
    name = f"gf_test_{RUN_ID}_{uuid.uuid4().hex[:10]}"
    with _admin() as conn:
        if template:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
            )
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_pg_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def pg_env(name: str, env_name: str = "test", kind: str = "staging") -> Environment:
    url = _with_database(server_url(), name).replace("postgresql://", "postgresql+psycopg://", 1)
    return Environment(name=env_name, kind="production" if kind == "production" else "staging", database_url=url)


_POOLER: list[PgBouncer] = []


def pgbouncer() -> PgBouncer:
    """This test process's PgBouncer (transaction mode, round robin; see tests/pgbouncer.py), started on first use.

    ``GATEFILL_TEST_POOLER_URL`` points the pooled tests at another transaction pooler instead (its database part is
    replaced per test)."""
    if not _POOLER:
        _POOLER.append(start_pgbouncer(_conninfo(server_url())))
        atexit.register(_POOLER[0].stop)
    return _POOLER[0]


def pooled_url(name: str) -> str:
    """The libpq URL of database ``name`` through the transaction pooler."""
    other = os.environ.get("GATEFILL_TEST_POOLER_URL")
    if other:
        return _with_database(other, name)
    return pgbouncer().url(_conninfo(server_url()), name)


def pooled_env(name: str, env_name: str = "test", kind: str = "staging") -> Environment:
    """Database ``name`` reached through the transaction pooler, with ``pooler = "transaction"``."""
    url = pooled_url(name).replace("postgresql://", "postgresql+psycopg://", 1)
    return Environment(
        name=env_name,
        kind="production" if kind == "production" else "staging",
        database_url=url,
        pooler="transaction",
    )


def sqlite_env(path: Path, env_name: str = "test", kind: str = "staging") -> Environment:
    return Environment(
        name=env_name, kind="production" if kind == "production" else "staging", database_url=f"sqlite:///{path}"
    )


@dataclass
class Target:
    """A fresh, initialised PRISM database of one dialect for one test."""

    dialect: str
    env: Environment
    db: Database

    @property
    def url(self) -> str:
        return self.env.database_url


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = create_pg_database()
    db = Database(pg_env(name))
    try:
        init_schema(db)
        load_reference_data(db)
    finally:
        db.dispose()
    yield name
    drop_pg_database(name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    db = Database(sqlite_env(path), create=True)
    try:
        init_schema(db)
        load_reference_data(db)
    finally:
        db.dispose()  # the last connection to close checkpoints the WAL into the file
    assert not path.with_name(path.name + "-wal").exists()
    return path


def _pg_copy(template: str, kind: str) -> Iterator[Target]:
    """A fresh copy of the template database, reached directly or (``pooled``) through the transaction pooler."""
    name = create_pg_database(template)
    env = pooled_env(name) if kind == "pooled" else pg_env(name)
    db = Database(env)
    try:
        yield Target(kind, env, db)
    finally:
        db.dispose()
        drop_pg_database(name)


@pytest.fixture
def pg_target(pg_template: str) -> Iterator[Target]:
    yield from _pg_copy(pg_template, "postgresql")


@pytest.fixture
def sqlite_target(sqlite_template: Path, tmp_path: Path) -> Iterator[Target]:
    path = tmp_path / "prism.db"
    shutil.copyfile(sqlite_template, path)
    env = sqlite_env(path)
    db = Database(env)
    try:
        yield Target("sqlite", env, db)
    finally:
        db.dispose()


@pytest.fixture
def pooled_target(pg_template: str) -> Iterator[Target]:
    """A fresh Postgres database reached through PgBouncer in transaction mode."""
    yield from _pg_copy(pg_template, "pooled")


@pytest.fixture
def target(request: pytest.FixtureRequest) -> Target:
    """The same test on a fresh SQLite file and on a fresh Postgres database (and, marked ``pooled``, through
    PgBouncer in transaction mode): ``pytest_generate_tests`` gives the parameter."""
    fixture = {"sqlite": "sqlite_target", "postgresql": "pg_target", "pooled": "pooled_target"}[request.param]
    result: Target = request.getfixturevalue(fixture)
    return result


@pytest.fixture
def empty_pg() -> Iterator[str]:
    """A fresh, empty Postgres database (no schema); yields its name."""
    name = create_pg_database()
    try:
        yield name
    finally:
        drop_pg_database(name)


def table_digests(db: Database) -> dict[str, str]:
    """Every table of the database (public schema) and a digest of its rows: what "nothing written" compares.

    Rows are read in scan order (a table nobody wrote to reads back in the same order), through the driver's own
    cursor: 40k answer rows take a second less than through SQLAlchemy's rows."""
    found: dict[str, str] = {}
    with db.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        for table in sorted(sa.inspect(conn).get_table_names()):
            cursor.execute(f'SELECT * FROM "{table}"')
            found[table] = hashlib.sha256(repr(cursor.fetchall()).encode()).hexdigest()
        cursor.close()
    return found
