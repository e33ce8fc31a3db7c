"""URL and admin helpers the Postgres benchmarks share: a server URL in libpq or SQLAlchemy form, a sibling database's
URL on the same server, and one autocommit statement (CREATE/DROP DATABASE) run against the server."""

from __future__ import annotations

import psycopg
from psycopg import sql


def libpq(url: str) -> str:
    """The URL as libpq (psycopg) takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def sa_url(url: str) -> str:
    """The URL as SQLAlchemy takes it (the psycopg 3 driver)."""
    return libpq(url).replace("postgresql://", "postgresql+psycopg://", 1)


def with_database(url: str, name: str) -> str:
    """The libpq URL of database ``name`` on the server of ``url``, keeping its query parameters."""
    base, _, rest = libpq(url).rpartition("/")
    query = "?" + rest.split("?", 1)[1] if "?" in rest else ""
    return f"{base}/{name}{query}"


def admin(server: str, statement: sql.Composed | sql.SQL | str) -> None:
    """Runs one statement outside a transaction (CREATE/DROP DATABASE need that)."""
    with psycopg.connect(libpq(server), autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)
