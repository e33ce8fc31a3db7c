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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.sandbox.seed import SeedReport, seed_scenario
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


class SeededTemplates:
    """Per test process, each scenario seeded once per dialect into a template, and copied into a test's database
    instead of seeded there again: a scenario takes 3-4 s to seed and dozens of tests start from one."""

    def __init__(self, pg_template: str, sqlite_template: Path, directory: Path) -> None:
        self.pg_template = pg_template
        self.sqlite_template = sqlite_template
        self.directory = directory
        self._made: dict[tuple[str, str], tuple[str, SeedReport]] = {}

    def source(self, dialect: str, scenario: str) -> tuple[str, SeedReport]:
        """The seeded template (a Postgres database's name or a SQLite file's path) and its seed report."""
        key = (dialect, scenario)
        if key not in self._made:
            if dialect == "sqlite":
                path = self.directory / f"{scenario}.db"
                shutil.copyfile(self.sqlite_template, path)
                where, env = str(path), sqlite_env(path)
            else:
                where = create_pg_database(self.pg_template)
                env = pg_env(where)
            with Database(env) as db:
                self._made[key] = (where, seed_scenario(db, scenario))
        return self._made[key]

    def drop(self) -> None:
        for (dialect, _), (where, _) in self._made.items():
            if dialect != "sqlite":
                drop_pg_database(where)


@pytest.fixture(scope="session")
def seeded_templates(
    pg_template: str, sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SeededTemplates]:
    templates = SeededTemplates(pg_template, sqlite_template, tmp_path_factory.mktemp("seeded"))
    yield templates
    templates.drop()


def seed(target: Target, scenario: str, templates: SeededTemplates) -> SeedReport:
    """``seed_scenario(target.db, scenario)`` on a fresh target, by copying the scenario's seeded template over the
    target's database (same name, same URL, so the target's environment and ``Database`` go on working)."""
    dialect = "sqlite" if target.dialect == "sqlite" else "postgresql"
    source, report = templates.source(dialect, scenario)
    target.db.dispose()
    if dialect == "sqlite":
        path = Path(target.env.url.database or "")
        for leftover in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            leftover.unlink(missing_ok=True)
        shutil.copyfile(source, path)
    else:
        name = target.env.url.database or ""
        drop_pg_database(name)
        with _admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(source)))
    return replace(report, database=target.db.display_url)


#: ``seeder(target, scenario)``: the scenario in a fresh target, copied from its seeded template.
Seeder = Callable[[Target, str], SeedReport]


@pytest.fixture
def seeder(seeded_templates: SeededTemplates) -> Seeder:
    return lambda target, scenario: seed(target, scenario, seeded_templates)


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

    Rows are read in scan order (a table nobody wrote to reads back in the same order). On Postgres the server
    digests each table itself (``md5`` over its rows' text), so 40k answer rows are not sent over to be hashed; on
    SQLite the driver's own cursor reads them, a second faster than SQLAlchemy's rows."""
    found: dict[str, str] = {}
    with db.connect() as conn:
        names = sorted(sa.inspect(conn).get_table_names())
        if conn.dialect.name == "postgresql":
            for table in names:
                query = f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n'), '')) FROM \"{table}\" t"
                count, digest = conn.execute(sa.text(query)).one()
                found[table] = f"{count}:{digest}"
            return found
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        for table in names:
            cursor.execute(f'SELECT * FROM "{table}"')
            found[table] = hashlib.sha256(repr(cursor.fetchall()).encode()).hexdigest()
        cursor.close()
    return found
