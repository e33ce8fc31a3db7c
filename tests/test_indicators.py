"""Apply's health indicators (``gatefill.indicators``) on a real Postgres, directly and through PgBouncer in
transaction mode, and on SQLite (where the Postgres ones are N/A, never Normal).

Each indicator reaches Normal, Hold and Stop. The replication, WAL, activity and lock indicators read from the
relations and the function named in ``[throttle]`` (the documented seam): a test points them at tables and a
function of its own, whose values it sets. Checkpoints are real (``CHECKPOINT``), one lock wait is real, and the app
indicator reads a real HTTP server's Prometheus text. The clock is simulated where a rate is measured.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import psycopg.sql
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy.engine import make_url

from gatefill.clock import SimulatedClock
from gatefill.config import Environment, ThrottleSettings
from gatefill.db import Database
from gatefill.errors import UsageError
from gatefill.holds import Decision, Indicator, Reading
from gatefill.indicators import AppHealth, health_indicators
from gatefill.prism import metric_names
from tests.conftest import Target, server_url

pytestmark = pytest.mark.pooled

TABLES = ["fc_scores", "profiles"]


def pick(target: Target, name: str, clock: SimulatedClock | None = None, **throttle: object) -> Indicator:
    env = replace(target.env, throttle=ThrottleSettings(**throttle))  # type: ignore[arg-type]
    (found,) = [i for i in health_indicators(env, TABLES, clock or SimulatedClock()) if i.name == name]
    return found


def execute(target: Target, *statements: str) -> None:
    with target.db.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def expect_na_on_sqlite(target: Target, indicator: Indicator) -> bool:
    """On SQLite: the indicator says N/A, and why (then the test ends); True on Postgres."""
    if target.dialect != "sqlite":
        return True
    reading = indicator.read(target.db)
    assert (reading.decision, reading.value) == (Decision.NOT_APPLICABLE, "n/a")
    assert reading.reason == "not read: the database has no server statistics"
    indicator.validate(target.db)  # nothing to validate: it is never read there
    return False


def levels(readings: list[Reading]) -> list[str]:
    return [r.decision.value for r in readings]


FAKE_WAL = (
    "CREATE TABLE fake_wal (lsn pg_lsn NOT NULL)",
    "INSERT INTO fake_wal VALUES ('0/10000000')",
    "CREATE FUNCTION fake_wal_lsn() RETURNS pg_lsn LANGUAGE sql STABLE AS $$ SELECT lsn FROM fake_wal $$",
)


def test_replication_and_replay_lag_hold_and_stop(target: Target) -> None:
    seam = {"replication_source": "fake_replication", "wal_lsn_function": "fake_wal_lsn"}
    bytes_lag, replay = pick(target, "replication_lag", **seam), pick(target, "replay_lag", **seam)
    if not expect_na_on_sqlite(target, bytes_lag) or not expect_na_on_sqlite(target, replay):
        return
    execute(target, *FAKE_WAL, "CREATE TABLE fake_replication (replay_lsn pg_lsn, replay_lag interval)")
    assert levels([bytes_lag.read(target.db), replay.read(target.db)]) == ["n/a", "n/a"]  # no replicas
    found = []
    # WAL at 0x10000000 (268 MB): a replica 50 MB behind (Hold ≥ 33.6 MB), then 150 MB (Stop ≥ 100 MB).
    for behind, lag in ((1_000_000, "0.2 s"), (50_000_000, "2 s"), (150_000_000, "7 s")):
        execute(target, "DELETE FROM fake_replication",
                f"INSERT INTO fake_replication SELECT '0/10000000'::pg_lsn - {behind}, interval '{lag}'")  # fmt: skip
        found.append((bytes_lag.read(target.db), replay.read(target.db)))
    assert [levels(list(pair)) for pair in found] == [["normal", "normal"], ["hold", "hold"], ["stop", "stop"]]
    assert found[2][0].value == "150.0 MB" and found[2][0].threshold == "hold ≥ 33.6 MB, stop ≥ 100.0 MB"
    assert found[1][1].value == "2.00 s" and found[1][1].threshold == "hold ≥ 1.50 s, stop ≥ 6.00 s"
    # A replica whose lag this role cannot see (NULL columns) is N/A with the reason, not Normal.
    execute(target, "DELETE FROM fake_replication", "INSERT INTO fake_replication VALUES (NULL, NULL)")
    hidden = replay.read(target.db)
    assert hidden.decision is Decision.NOT_APPLICABLE and "grant pg_monitor" in hidden.reason


def test_wal_rate_holds_and_stops_against_its_budget(target: Target) -> None:
    clock = SimulatedClock()
    wal = pick(target, "wal_rate", clock, wal_lsn_function="fake_wal_lsn")
    if not expect_na_on_sqlite(target, wal):
        return
    execute(target, *FAKE_WAL)
    first = wal.read(target.db)
    assert first.decision is Decision.NOT_APPLICABLE and first.reason.startswith("first look")
    found = []
    for written in (10_000_000, 80_000_000, 300_000_000):  # over 2 s: 5 MB/s, 40 MB/s, 150 MB/s
        execute(target, f"UPDATE fake_wal SET lsn = lsn + {written}")
        clock.advance(2.0)
        found.append(wal.read(target.db))
    assert levels(found) == ["normal", "hold", "stop"]
    assert [r.value for r in found] == ["5.0 MB/s", "40.0 MB/s", "150.0 MB/s"]
    assert found[1].threshold == "hold ≥ 35.0 MB/s, stop ≥ 70.0 MB/s"


def test_wal_rate_with_the_real_function_reads_without_privileges_it_lacks(target: Target) -> None:
    clock = SimulatedClock()
    wal = pick(target, "wal_rate", clock)
    if not expect_na_on_sqlite(target, wal):
        return
    wal.validate(target.db)
    assert wal.read(target.db).decision is Decision.NOT_APPLICABLE
    clock.advance(1.0)
    execute(target, "CREATE TABLE wal_maker AS SELECT g FROM generate_series(1, 1000) g")
    reading = wal.read(target.db)
    assert reading.decision is Decision.NORMAL and reading.value.endswith("MB/s")


def checkpoint() -> None:
    with psycopg.connect(server_url().replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def test_requested_checkpoints_hold_and_stop(target: Target) -> None:
    clock = SimulatedClock()
    seam = {"checkpoints_source": "fake_checkpoints", "checkpoints_hold": 2, "checkpoints_stop": 4}
    checkpoints = pick(target, "checkpoints", clock, **seam)
    if not expect_na_on_sqlite(target, checkpoints):
        return
    execute(target, "CREATE TABLE fake_checkpoints (num_requested bigint)", "INSERT INTO fake_checkpoints VALUES (7)")
    assert checkpoints.read(target.db).decision is Decision.NOT_APPLICABLE  # the first look is the baseline
    found = []
    for more, seconds in ((1, 10.0), (1, 10.0), (2, 10.0), (0, 45.0), (0, 30.0)):
        execute(target, f"UPDATE fake_checkpoints SET num_requested = num_requested + {more}")
        clock.advance(seconds)
        found.append(checkpoints.read(target.db))
    # Counted over the last 60 s of looks: 1, 2, 4, then the looks older than 60 s drop out (2, then 0).
    assert [r.value for r in found] == ["1", "2", "4", "2", "0"]
    assert levels(found) == ["normal", "hold", "stop", "hold", "normal"]
    assert found[2].threshold == "hold ≥ 2, stop ≥ 4 in 60 s"


def test_real_checkpoints_are_counted_and_the_indicator_is_off_unless_configured(target: Target) -> None:
    assert "checkpoints" not in [i.name for i in health_indicators(target.env, TABLES, SimulatedClock())]
    clock = SimulatedClock()
    checkpoints = pick(target, "checkpoints", clock, checkpoints_hold=1, checkpoints_stop=1000)
    if not expect_na_on_sqlite(target, checkpoints):
        return
    assert checkpoints.read(target.db).decision is Decision.NOT_APPLICABLE
    checkpoint()  # other sessions of a shared server may request more: the count only grows
    # CHECKPOINT returns before the checkpointer has published its counters: look again for a few seconds.
    deadline = time.monotonic() + 10
    while True:
        clock.advance(0.1)
        reading = checkpoints.read(target.db)
        if reading.decision is Decision.HOLD or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert reading.decision is Decision.HOLD and float(reading.value) >= 1


FAKE_ACTIVITY = "CREATE TABLE fake_activity (backend_type text, datname name, query text)"


def test_autovacuum_on_a_written_table_holds_and_to_prevent_wraparound_stops(target: Target) -> None:
    autovacuum = pick(target, "autovacuum", activity_source="fake_activity")
    if not expect_na_on_sqlite(target, autovacuum):
        return
    execute(target, FAKE_ACTIVITY)
    found = []
    for query in (
        "autovacuum: VACUUM public.some_other_table",
        "autovacuum: VACUUM ANALYZE public.fc_scores",
        "autovacuum: VACUUM public.profiles (to prevent wraparound)",
        "<insufficient privilege>",
        "autovacuum: ANALYZE public.fc_scores",
    ):
        execute(target, "DELETE FROM fake_activity", "INSERT INTO fake_activity "
                f"VALUES ('autovacuum worker', current_database(), '{query}')")  # fmt: skip
        found.append(autovacuum.read(target.db))
    assert levels(found) == ["normal", "hold", "stop", "n/a", "normal"]  # a bare ANALYZE is light: no Hold
    assert found[1].value == "public.fc_scores" and found[2].value == "public.profiles"
    assert "grant pg_monitor" in found[3].reason
    # An autovacuum of the same table in another database is not this apply's business.
    execute(target, "UPDATE fake_activity SET datname = 'elsewhere', query = 'autovacuum: VACUUM public.fc_scores'")
    assert autovacuum.read(target.db).decision is Decision.NORMAL


def test_lock_waits_on_the_written_tables_hold_and_stop(target: Target) -> None:
    locks = pick(target, "lock_waits", locks_source="fake_locks")
    if not expect_na_on_sqlite(target, locks):
        return
    execute(target, "CREATE TABLE fake_locks (database oid, relation oid, granted boolean)")
    found = []
    for waiting in (0, 1, 5):
        execute(target, "DELETE FROM fake_locks", "INSERT INTO fake_locks SELECT d.oid, 'fc_scores'::regclass, false "
                f"FROM pg_database d, generate_series(1, {waiting}) WHERE d.datname = current_database()")  # fmt: skip
        found.append(locks.read(target.db))
    assert levels(found) == ["normal", "hold", "stop"]
    assert [r.value for r in found] == ["0", "1", "5"]


def test_a_real_lock_wait_on_a_written_table_holds(target: Target) -> None:
    locks = pick(target, "lock_waits")
    if not expect_na_on_sqlite(target, locks):
        return
    url = target.db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    holder = psycopg.connect(url)
    waiter = psycopg.connect(url)
    try:
        holder.execute("LOCK TABLE fc_scores IN ACCESS EXCLUSIVE MODE")
        blocked = threading.Thread(target=lambda: waiter.execute("LOCK TABLE fc_scores IN SHARE MODE"))
        blocked.start()
        reading = locks.read(target.db)
        for _ in range(100):  # the waiter's lock request shows up within moments
            if reading.decision is Decision.HOLD:
                break
            threading.Event().wait(0.05)
            reading = locks.read(target.db)
        assert reading.decision is Decision.HOLD and reading.value == "1"
    finally:
        holder.rollback()
        blocked.join(timeout=10)
        waiter.rollback()
        holder.close()
        waiter.close()
    assert locks.read(target.db).decision is Decision.NORMAL


def test_connections_hold_and_stop_against_max_connections(target: Target) -> None:
    connections = pick(target, "connections", activity_source="fake_activity")
    if not expect_na_on_sqlite(target, connections):
        return
    execute(target, FAKE_ACTIVITY)
    most = int(pick(target, "connections").read(target.db).reason.split(" of ")[1].split()[0])
    found = []
    for share in (0.5, 0.8, 0.95):
        execute(target, "DELETE FROM fake_activity", "INSERT INTO fake_activity SELECT 'client backend', "
                f"current_database(), 'SELECT 1' FROM generate_series(1, {round(most * share)})")  # fmt: skip
        found.append(connections.read(target.db))
    assert levels(found) == ["normal", "hold", "stop"]
    assert found[2].threshold == "hold ≥ 75.0%, stop ≥ 90.0%"


def test_every_postgres_indicator_reads_the_real_statistics_without_error(target: Target) -> None:
    clock = SimulatedClock()
    found = [i for i in health_indicators(target.env, TABLES, clock) if not isinstance(i, AppHealth)]
    assert [i.name for i in found] == [
        "replication_lag", "replay_lag", "wal_rate", "autovacuum", "lock_waits", "connections",
    ]  # fmt: skip
    for indicator in found:
        indicator.validate(target.db)
    readings = [i.read(target.db) for i in found]
    if target.dialect == "sqlite":
        assert set(levels(readings)) == {"n/a"}
    else:  # an idle test database: nothing holds, and nothing failed to read
        assert set(levels(readings)) <= {"n/a", "normal"}, readings
        assert all(r.threshold for r in readings)


def test_a_source_that_does_not_exist_is_a_usage_error_before_anything_is_written(target: Target) -> None:
    indicator = pick(target, "connections", activity_source="no_such_view")
    if not expect_na_on_sqlite(target, indicator):
        return
    with pytest.raises(UsageError, match="indicator connections cannot be read"):
        indicator.validate(target.db)
    reading = indicator.read(target.db)  # later, a failed read is a Stop that says why
    assert reading.decision is Decision.STOP and reading.value == "error"


# ------------------------------------------------------------------------------------------------------ the app


class FakeApp:
    """A real HTTP server exposing the functions server's series, with counts the test sets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(metric_names.REQUESTS, "calls", ["function", "status"], registry=self.registry)
        self.duration = Histogram(
            metric_names.DURATION, "seconds", ["function"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0),
        )  # fmt: skip
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = generate_latest(app.registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"

    def calls(self, n: int, seconds: float, status: str = "200", function: str = "finalizeAssessment") -> None:
        for _ in range(n):
            self.requests.labels(function, status).inc()
            self.duration.labels(function).observe(seconds)


@pytest.fixture
def app() -> Iterator[FakeApp]:
    fake = FakeApp()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def test_the_apps_p95_and_5xx_share_hold_and_stop(target: Target, app: FakeApp) -> None:
    env = replace(target.env, metrics_url=app.url, throttle=ThrottleSettings(app_min_calls=20))
    (indicator,) = [i for i in health_indicators(env, TABLES, SimulatedClock()) if i.name == "app"]
    assert indicator.read(target.db).decision is Decision.NOT_APPLICABLE  # the window begins
    found = []
    app.calls(30, 0.03)
    found.append(indicator.read(target.db))  # p95 ≤ 50 ms, no 5xx
    app.calls(10, 0.03)
    found.append(indicator.read(target.db))  # 10 calls: not judged yet, the last judgment stands
    app.calls(25, 0.3)
    found.append(indicator.read(target.db))  # p95 in (100, 500] ms of 35 calls: ≥ 500 ms is the bucket's edge
    app.calls(40, 3.0)
    found.append(indicator.read(target.db))  # p95 in (2, 5] s: Stop
    app.calls(99, 0.03)
    app.calls(1, 0.03, status="500", function="startAssessment")
    found.append(indicator.read(target.db))  # 1% 5xx: Hold
    app.calls(90, 0.03)
    app.calls(10, 0.03, status="503")
    found.append(indicator.read(target.db))  # 10% 5xx: Stop
    assert levels(found) == ["normal", "normal", "hold", "stop", "hold", "stop"]
    assert found[1].reason.endswith("; the next window has 10 of 20 calls")
    assert found[0].value == "finalizeAssessment p95 in (10 ms, 50 ms]; 5xx 0 of 30 (0.0%)"
    assert found[4].value.endswith("5xx 1 of 100 (1.0%)")
    assert "p95 hold ≥ 500 ms, stop ≥ 2000 ms" in found[3].threshold
    # The app goes quiet after a Stop: the judgment stands for app_quiet_looks looks, then lapses (no Stop forever).
    quiet = [indicator.read(target.db) for _ in range(ThrottleSettings().app_quiet_looks + 1)]
    assert levels(quiet) == ["stop"] * 10 + ["n/a"]
    assert "the app is quiet, its last judgment has lapsed" in quiet[-1].reason
    app.calls(30, 0.03)
    assert indicator.read(target.db).decision is Decision.NORMAL  # traffic again: judged again


def test_an_app_that_does_not_answer_stops_and_says_why_without_credentials(target: Target) -> None:
    app = AppHealth("http://user:secret@127.0.0.1:9/metrics?token=abc", ThrottleSettings(), timeout=0.5)
    reading = app.read(target.db)
    assert reading.decision is Decision.STOP and reading.value == "error"
    assert "secret" not in reading.reason and "abc" not in reading.reason
    assert "http://127.0.0.1:9/metrics" in reading.reason


def test_the_default_app_series_are_the_functions_servers() -> None:
    defaults = ThrottleSettings()
    assert (defaults.app_requests_metric, defaults.app_duration_metric) == (
        metric_names.REQUESTS,
        metric_names.DURATION,
    )


def test_a_role_without_superuser_or_pg_monitor_reads_every_indicator() -> None:
    """Plain ``LOGIN`` role: every Postgres indicator reads (N/A where the role cannot see other sessions' columns),
    none fails, none is a made-up Normal where it cannot see."""
    role = f"gf_reader_{uuid.uuid4().hex[:8]}"
    admin_url = server_url().replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("CREATE ROLE {} LOGIN").format(psycopg.sql.Identifier(role)))
    try:
        url = make_url(admin_url).set(drivername="postgresql+psycopg", username=role, password=None)
        env = Environment("reader", "staging", url.render_as_string(hide_password=False))
        clock = SimulatedClock()
        with Database(env) as db:
            found = [i for i in health_indicators(env, TABLES, clock) if not isinstance(i, AppHealth)]
            for indicator in found:
                indicator.validate(db)
            first = [i.read(db) for i in found]
            clock.advance(1.0)
            second = [i.read(db) for i in found]
        assert all(r.decision is not Decision.STOP for r in first + second), first + second
        assert {r.indicator: r.decision.value for r in second}["wal_rate"] == "normal"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP ROLE {}").format(psycopg.sql.Identifier(role)))
