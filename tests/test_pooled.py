"""The commands as a user runs them, on SQLite, on a direct Postgres connection and through PgBouncer in transaction
mode (what Supabase users reach through Supavisor on port 6543): Phase 1 and its rollback, two applies of one run, a
kill -9 and the takeover of its lease, the functions server with the traffic simulator, and nothing left behind on
any server connection afterwards."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from gatefill import ledger
from gatefill.config import load_settings
from gatefill.db import Database
from gatefill.lease import lease_name
from gatefill.prism.sandbox.seed import seed_scenario
from tests.conftest import (
    _admin,
    _conninfo,
    _with_database,
    create_pg_database,
    drop_pg_database,
    pg_env,
    pooled_url,
    sqlite_env,
)
from tests.conftest import server_url as pg_server_url

ROOT = Path(__file__).resolve().parents[1]
GATEFILL = [sys.executable, "-m", "gatefill"]
SERVICE_KEY = "sk-test-pooled-6f1e0c2b9d"


@dataclass
class Place:
    """A directory with a gatefill.toml whose ``staging`` environment is one of the three kinds of connection."""

    kind: str
    directory: Path
    database: str | None  # the Postgres database's name

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*GATEFILL, *args], cwd=self.directory, capture_output=True, text=True, timeout=timeout, env=_environ()
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*GATEFILL, *args],
            cwd=self.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_environ(),
        )

    def db(self) -> Database:
        return Database(load_settings(self.directory / "gatefill.toml", environ={}).env("staging"))


def _environ() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "GATEFILL_TEST_SERVICE_KEY": SERVICE_KEY}


def _config(url: str, pooler: str, lease_ttl: str) -> str:
    return (
        'artifacts_dir = "artifacts"\n\n[env.staging]\n'
        f'database_url = "{url}"\nkind = "staging"\npooler = "{pooler}"\nlease_ttl = "{lease_ttl}"\n'
        'service_role_key_env = "GATEFILL_TEST_SERVICE_KEY"\n'
    )


@pytest.fixture(scope="module")
def seeded_sources(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path, pg_template: str
) -> Iterator[dict[str, str]]:
    """The 2025-09-17 staging scenario seeded once per module: a SQLite file and a Postgres database to clone."""
    path = tmp_path_factory.mktemp("seeded") / "staging.db"
    shutil.copyfile(sqlite_template, path)
    name = create_pg_database(pg_template)
    for env in (sqlite_env(path), pg_env(name)):
        with Database(env) as db:
            seed_scenario(db, "staging-2025-09-17")
    yield {"sqlite": str(path), "postgresql": name}
    drop_pg_database(name)


@pytest.fixture(params=["sqlite", "postgresql", "pooled"])
def place(request: pytest.FixtureRequest, tmp_path: Path, seeded_sources: dict[str, str]) -> Iterator[Place]:
    """A fresh copy of the seeded staging database behind one kind of connection."""
    kind = request.param
    database = None
    if kind == "sqlite":
        shutil.copyfile(seeded_sources["sqlite"], tmp_path / "staging.db")
        url, pooler = "sqlite:///staging.db", "none"
    else:
        database = create_pg_database(seeded_sources["postgresql"])
        if kind == "pooled":
            url, pooler = pooled_url(database), "transaction"
        else:
            url, pooler = _with_database(_conninfo(pg_server_url()), database), "none"
    (tmp_path / "gatefill.toml").write_text(_config(url, pooler, "3s"), encoding="utf-8")
    try:
        yield Place(kind, tmp_path, database)
    finally:
        if database is not None:
            drop_pg_database(database)


def seeded_plan(place: Place) -> str:
    """Plans the seeded scenario's backfill and approves it; returns the run id."""
    planned = place.run("plan", "--env", "staging", "--batch-size", "2")
    assert planned.returncode == 0, planned.stderr
    run_id = re.search(r"run (apply-\S+) planned", planned.stdout)
    assert run_id is not None, planned.stdout
    approved = place.run("approve", run_id.group(1), "--gate", "plan", "--by", "tester")
    assert approved.returncode == 0, approved.stderr
    return run_id.group(1)


def leftovers(place: Place) -> list[str]:
    """Locks of any kind still held on the Postgres server for this test's database, and sessions left inside a
    transaction: what a command must never leave behind (an idle pooled server connection holds neither)."""
    if place.database is None:
        return []
    with _admin() as admin:
        rows = admin.execute(
            "SELECT a.pid, a.state, l.locktype, l.mode FROM pg_stat_activity a "
            "LEFT JOIN pg_locks l ON l.pid = a.pid AND l.locktype <> 'virtualxid' "
            "WHERE a.datname = %s AND a.pid <> pg_backend_pid() "
            "AND (l.pid IS NOT NULL OR a.state LIKE 'idle in transaction%%')",
            (place.database,),
        ).fetchall()
    return [f"pid {pid} ({state}): {locktype} {mode}" for pid, state, locktype, mode in rows]


def wait_for_lease(place: Place, run_id: str, *, held: bool, limit: float = 60) -> ledger.Lease | None:
    deadline = time.monotonic() + limit
    with place.db() as db:
        while True:
            with db.connect() as conn:
                lease = ledger.get_lease(conn, lease_name(run_id)) if _has_leases(conn) else None
            if (lease is not None and not lease.expired) == held:
                return lease
            assert time.monotonic() < deadline, f"lease never became {'held' if held else 'free or expired'}"
            time.sleep(0.1)


def _has_leases(conn: object) -> bool:
    import sqlalchemy as sa

    return bool(sa.inspect(conn).has_table(ledger.leases.name))


def test_phase_one_and_its_rollback_through_the_cli(place: Place) -> None:
    checked = place.run("db", "check", "--env", "staging")
    assert checked.returncode == 0, checked.stderr + checked.stdout
    run_id = seeded_plan(place)
    applied = place.run("apply", run_id, "--rate", "unlimited")
    assert applied.returncode == 0, applied.stderr + applied.stdout
    assert f"run {run_id}: succeeded; written 39" in applied.stdout
    status = place.run("status", run_id)
    assert status.returncode == 0 and "sessions with a result: 39 of 39" in status.stdout, status.stdout
    assert "lease:" not in status.stdout  # released: nobody holds it, and the run is not running
    undone = place.run("rollback", run_id)
    assert undone.returncode == 0, undone.stderr + undone.stdout
    assert re.match(rf"rollback of run {run_id} on staging \(.*\): PASS\n", undone.stdout), undone.stdout
    health = place.run("health", "--env", "staging", "--at", "2025-09-18T00:00:00Z")
    assert health.returncode == 1 and "NOT HEALTHY" in health.stdout, health.stderr  # the rows are gone again
    assert leftovers(place) == []


def test_a_second_apply_or_rollback_of_a_running_run_exits_4_naming_the_holder(place: Place) -> None:
    run_id = seeded_plan(place)
    first = place.start("apply", run_id, "--rate", "12/min")
    try:
        held = wait_for_lease(place, run_id, held=True)
        assert held is not None and held.holder.pid == first.pid and held.holder.command == "apply"
        for second in (["apply", run_id, "--rate", "unlimited"], ["rollback", run_id]):
            refused = place.run(*second)
            assert refused.returncode == 4, refused.stderr
            line = refused.stderr.strip()
            assert line.count("\n") == 0 and line.startswith("error: run:" + run_id + " is active elsewhere")
            assert f"apply by {socket.gethostname()}:{first.pid}" in line
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    with place.db() as db, db.connect() as conn:
        assert ledger.get_lease(conn, lease_name(run_id)) is None
        assert ledger.get_run(conn, run_id).status is ledger.RunStatus.PAUSED
    assert leftovers(place) == []
    resumed = place.run("apply", run_id, "--rate", "unlimited")
    assert resumed.returncode == 0, resumed.stderr
    assert leftovers(place) == []


def test_a_killed_apply_leaves_a_lease_that_expires_and_is_taken_over(place: Place) -> None:
    # Long enough that the commands below surely start before it expires, however loaded the machine.
    config = place.directory / "gatefill.toml"
    config.write_text(config.read_text().replace('lease_ttl = "3s"', 'lease_ttl = "120s"'), encoding="utf-8")
    run_id = seeded_plan(place)
    first = place.start("apply", run_id, "--rate", "12/min")
    held = wait_for_lease(place, run_id, held=True)
    assert held is not None
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=30)
    status = place.run("status", run_id)
    # Until it expires nobody may take it; status already tells that its holder is gone.
    assert re.search(rf"lease: held: apply by \S+:{first.pid} .*pid {first.pid} is not running", status.stdout), status
    refused = place.run("apply", run_id, "--rate", "unlimited")
    assert refused.returncode == 4 and f":{first.pid}" in refused.stderr, refused.stderr
    # Two minutes pass (the lease's expiry is moved instead; tests/test_crash_resume.py waits for a real one).
    with place.db() as db, db.begin() as conn:
        conn.execute(ledger.leases.update().values(expires_at=ledger.leases.c.heartbeat_at))
    stale = place.run("status", run_id)
    assert "lease: STALE" in stale.stdout and "running" in stale.stdout, stale.stdout
    taken = place.run("apply", run_id, "--rate", "unlimited")
    assert taken.returncode == 0, taken.stderr
    with place.db() as db, db.connect() as conn:
        assert ledger.get_run(conn, run_id).status is ledger.RunStatus.SUCCEEDED
        reasons = [e for e in conn.execute(ledger.run_events.select()).mappings() if e["reason"]]
        assert ledger.get_lease(conn, lease_name(run_id)) is None
    assert any(f":{first.pid}" in e["reason"] and "took over the expired lease" in e["reason"] for e in reasons)
    assert leftovers(place) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("place", ["postgresql", "pooled"], indirect=True)
def test_the_functions_server_and_the_simulator_leave_no_session_setting_behind(place: Place) -> None:
    port = _free_port()
    server = place.start(
        "serve", "functions", "--env", "staging", "--port", str(port), "--allow-fault-injection", "--call-timeout", "7"
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        simulated = place.run(
            "simulate", "--env", "staging", "--functions-url", f"http://127.0.0.1:{port}/functions/v1",
            "--sessions", "40", "--clock", "simulated", "--json", "report.json",
        )  # fmt: skip
        assert simulated.returncode == 0, simulated.stderr + simulated.stdout
        report = json.loads((place.directory / "report.json").read_text())
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    totals = report["totals"]
    assert totals["transport_errors"] == 0 and totals["finalize_calls"] >= 20, totals
    # No call failed: every finalize and every results fetch answered 200 (a pooler error would be a 500).
    assert set(totals["finalize_status"]) == {"200"} and set(totals["results_status"]) <= {"200"}, totals
    # Every server connection the pool has (round robin: each of these lands on the next one) has the default.
    assert place.database is not None
    url = pooled_url(place.database) if place.kind == "pooled" else _with_database(pg_server_url(), place.database)
    with psycopg.connect(_conninfo(url), autocommit=True, prepare_threshold=None) as conn:
        seen = {conn.execute("SHOW statement_timeout").fetchone()[0] for _ in range(12)}  # type: ignore[index]
    assert seen == {"0"}, f"a session setting leaked to other clients: {seen}"
    assert leftovers(place) == []


@pytest.mark.parametrize("place", ["postgresql", "pooled"], indirect=True)
def test_db_check_says_what_sits_between_and_refuses_a_setting_that_hides_a_transaction_pooler(place: Place) -> None:
    checked = place.run("db", "check", "--env", "staging")
    assert checked.returncode == 0, checked.stderr
    if place.kind == "pooled":
        assert re.search(r"both ran transactions on server backend|transactions ran on server backends", checked.stdout)
    else:
        assert "each connection kept its own backend" in checked.stdout, checked.stdout
    if place.kind == "pooled":
        config = place.directory / "gatefill.toml"
        config.write_text(config.read_text().replace('pooler = "transaction"', 'pooler = "none"'), encoding="utf-8")
        hidden = place.run("db", "check", "--env", "staging")
        assert hidden.returncode == 1, hidden.stdout
        assert "MISMATCH: pooler = 'none'" in hidden.stdout and 'set pooler = "transaction"' in hidden.stdout
