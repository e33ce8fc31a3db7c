"""The soak reads the functions server's own metrics (``metrics_url``), on SQLite and Postgres: 500s that left no row
in the database fail ``function_errors`` (the issue's case: without the metrics the soak said PASS), ``latency`` is
judged from the histogram, and an endpoint that cannot be read makes both INCONCLUSIVE, never PASS.

Each test serves a fresh app (its counters start at zero) on the module's database and soaks a window of its own,
with a simulated clock: a retrospective soak, which may use the server's totals only when they are exactly the
window's calls (``gatefill.prism.checks.app_metrics``).
"""

from __future__ import annotations

import random
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gatefill.clock import SimulatedClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.checks.soak import PrismSoakChecks, PrismSoakSettings
from gatefill.prism.platform.server import create_app, serve_in_thread
from gatefill.prism.sandbox.simulator import SimulationReport, simulate
from gatefill.soak import SoakOptions, SoakResult, run_soak
from tests.conftest import create_pg_database, drop_pg_database, pg_env, sqlite_env
from tests.prism.conftest import Live, refused_writes

SERVICE_KEY = "sk-test-soak-metrics-8f1e2d3c4b5a69788796a5b4"
KEY_ENV = "GATEFILL_TEST_SOAK_METRICS_KEY"
BASE = datetime(2024, 3, 1, tzinfo=UTC)
HOUR = 3600.0
# 3 hours in 6 looks; the traffic runs in the first hour and is done well before the last look.
OPTIONS = SoakOptions(duration=3 * HOUR, interval=1800.0, baseline_days=7.0, chart=False)
VERSIONS = {"fc_version": "v1.2", "fc_kind": "functions", "engine_version": "v1.2.1"}


def _window(n: int) -> datetime:
    return BASE + timedelta(days=60 * n)


@dataclass
class Served:
    """A fresh functions server (its metrics at zero) on the module's database, and helpers to load and soak it."""

    dialect: str
    env: Environment
    db: Database
    url: str
    artifacts: Path

    def traffic(self, start: datetime, sessions: int, **kwargs: Any) -> SimulationReport:
        return simulate(
            self.db,
            f"{self.url}/functions/v1",
            sessions=sessions,
            clock=SimulatedClock(start),
            service_role_key=SERVICE_KEY,
            abandon_rate=0.0,
            duration="1h",
            **kwargs,
        )

    def soak(self, start: datetime, *, metrics_url: str | None, **settings: Any) -> dict[str, Any]:
        env = replace(self.env, metrics_url=metrics_url)
        chosen = PrismSoakSettings(service_role_key=SERVICE_KEY, **settings)
        with PrismSoakChecks(env, chosen) as checks:
            result: SoakResult = run_soak(
                self.db,
                env,
                options=replace(OPTIONS, start=start),
                clock=SimulatedClock(start),
                checks=checks,
                versions=VERSIONS,
            )
        return {c.name: c for c in result.checks}

    def live(self, *, seed: int) -> Live:
        """What the conftest helpers take (sessions written as the frontend writes them, refused writes)."""
        clock = SimulatedClock(BASE)
        return Live(self.dialect, self.env, self.db, self.db, self.url, clock, httpx.Client(), random.Random(seed))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    tmp = tmp_path_factory.mktemp("soak-metrics")
    pg_name = None
    if request.param == "sqlite":
        path = tmp / "prism.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        env = sqlite_env(path)
    else:
        pg_name = create_pg_database(request.getfixturevalue("pg_template"))
        env = pg_env(pg_name)
    try:
        yield replace(env, service_role_key_env=KEY_ENV)
    finally:
        if pg_name:
            drop_pg_database(pg_name)


@pytest.fixture
def served(module_env: Environment, tmp_path: Path) -> Iterator[Served]:
    server_db = Database(module_env, pool_size=3)
    db = Database(module_env, pool_size=3)
    try:
        app = create_app(
            module_env, server_db, allow_fault_injection=True, service_role_key=SERVICE_KEY, rate_limit_per_minute=5000
        )
        with serve_in_thread(app) as url:
            env = replace(module_env, results_url=url, functions_url=f"{url}/functions/v1")
            yield Served("sqlite" if module_env.is_sqlite else "postgresql", env, db, url, tmp_path / "artifacts")
    finally:
        db.dispose()
        server_db.dispose()


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def _traceless_500s(served: Served, start: datetime, count: int) -> list[str]:
    """``count`` finalize calls inside the window that the server answers 500 while the database refuses every row
    of their sessions, its own server_error events included: failures the database never hears of."""
    live = served.live(seed=int(start.timestamp()))
    ids = []
    for i in range(count):
        respondent = live.respondent(at=start + timedelta(minutes=5 + i))
        ids.append(respondent.session_id)
        json_key = {"sqlite_key": "json_extract(NEW.payload, '$.session_id')", "pg_key": "NEW.payload->>'session_id'"}
        with refused_writes(live, "fn_logs", respondent.session_id, **json_key):
            answer = httpx.post(
                f"{served.url}/functions/v1/finalizeAssessment",
                json={"session_id": respondent.session_id},
                headers={
                    "authorization": f"Bearer {SERVICE_KEY}",
                    "x-gatefill-now": (start + timedelta(minutes=40 + i)).isoformat(),
                    "x-forwarded-for": f"10.44.0.{i + 1}",
                },
                timeout=30,
            )
            assert answer.status_code == 500 and answer.json()["code"] == "DATABASE_ERROR"
            # The server tries to record it after answering: keep the refusal until it has given up.
            deadline = time.monotonic() + 10
            while (
                f'gatefill_function_unrecorded_errors_total{{function="finalizeAssessment"}} {i + 1}.0'
                not in _metrics(served.url)
            ):
                assert time.monotonic() < deadline, "the server never tried to record the 500"
                time.sleep(0.05)
    live.http.close()
    return ids


def test_500s_that_left_no_row_fail_function_errors_through_the_apps_metrics(served: Served) -> None:
    start = _window(1)
    report = served.traffic(start, 12, seed=5)
    assert report.totals()["completed_sessions"] == 12
    failed = _traceless_500s(served, start, 3)

    with_metrics = served.soak(start, metrics_url=f"{served.url}/metrics")
    errors = with_metrics["function_errors"]
    assert errors.verdict == "FAIL", errors.summary
    app = errors.evidence["app_metrics"]
    assert app["answers_5xx"] == {"finalizeAssessment": {"500": 3}}
    assert app["unrecorded_5xx"] == {"finalizeAssessment": 3}
    assert errors.evidence["error_events"] == {} and errors.evidence["finalize_calls"] == 12
    assert "3 of " in errors.summary and "finalizeAssessment 500: 3" in errors.summary
    assert "3 of them with no error event in the database" in errors.summary
    assert "inside the window" in app["coverage"] and "match the window's 12 finalize_complete" in app["coverage"]
    assert not set(failed) & set(errors.evidence["failed_sessions"])  # the database knows nothing of them

    # The same window without the metrics: the blind spot the issue observed, and the evidence says why.
    blind = served.soak(start, metrics_url=None)["function_errors"]
    assert blind.verdict == "PASS" and blind.summary.startswith("0 error events in 12 finalizations")
    assert blind.evidence["app_metrics"]["configured"] is False


def test_latency_is_judged_from_the_histogram_and_clean_traffic_passes(served: Served) -> None:
    start = _window(2)
    served.traffic(start, 12, seed=6)
    # A threshold far above any call's time, also on a loaded host (the default 1 s once failed there on SQLite):
    # what this test checks is that clean traffic is judged from the histogram, not how fast the host is.
    checks = served.soak(start, metrics_url=f"{served.url}/metrics", latency_p95_ms=10_000.0)
    latency = checks["latency"]
    assert latency.verdict == "PASS", latency.summary
    judged = latency.evidence["app_metrics"]["p95_by_function"]
    # 12 respondents' finalizations and the simulator's check of the URL before it writes (one `{}` body: a 400).
    assert judged["finalizeAssessment"]["calls"] == 13 and judged["finalizeAssessment"]["verdict"] == "PASS"
    assert latency.summary.startswith("app histogram: ") and "bucket resolution" in latency.summary
    assert "probes: " in latency.summary
    errors = checks["function_errors"]
    assert errors.verdict == "PASS" and "0 of " in errors.summary and "calls answered 5xx" in errors.summary


def test_slow_calls_fail_latency_by_their_histogram_buckets(served: Served) -> None:
    start = _window(3)
    # Every call waits 60 ms on the server before it runs: each lands in a bucket above 50 ms.
    served.traffic(start, 12, seed=7, inject={"slow": 1.0}, slow_ms=60.0)
    latency = served.soak(start, metrics_url=f"{served.url}/metrics", latency_p95_ms=50.0)["latency"]
    assert latency.verdict == "FAIL", latency.summary
    finalize = latency.evidence["app_metrics"]["p95_by_function"]["finalizeAssessment"]
    assert finalize["verdict"] == "FAIL" and finalize["p95_bucket_ms"][0] >= 60.0
    assert "above the threshold 50 ms" in latency.summary


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_or_foreign_metrics_endpoint_is_inconclusive_never_pass(served: Served) -> None:
    start = _window(4)
    served.traffic(start, 12, seed=8)
    unreachable = served.soak(start, metrics_url=f"http://127.0.0.1:{_closed_port()}/metrics")
    for name in ("function_errors", "latency"):
        check = unreachable[name]
        assert check.verdict == "INCONCLUSIVE", (name, check.summary)
        assert "unreachable (ConnectError)" in check.summary
    # A URL that answers, but not with a gatefill server's metrics (here: the results link's 404 JSON).
    foreign = served.soak(start, metrics_url=f"{served.url}/functions/v1/nothing-here")
    assert foreign["function_errors"].verdict == "INCONCLUSIVE" and "answered 405" in foreign["function_errors"].summary
    # The same traffic without metrics passes: the INCONCLUSIVE above comes from the unreadable endpoint alone.
    assert served.soak(start, metrics_url=None)["function_errors"].verdict == "PASS"


def test_totals_that_reach_past_the_cutoff_are_not_attributed(served: Served) -> None:
    """Calls after the window's last cutoff are in the server's totals: the soak cannot split them, so it says why."""
    start = _window(5)
    served.traffic(start, 12, seed=9)
    after = start + timedelta(seconds=OPTIONS.duration + 60)
    answer = httpx.post(
        f"{served.url}/functions/v1/finalizeAssessment",
        json={},
        headers={"authorization": f"Bearer {SERVICE_KEY}", "x-gatefill-now": after.isoformat()},
        timeout=30,
    )
    assert answer.status_code == 400
    errors = served.soak(start, metrics_url=f"{served.url}/metrics")["function_errors"]
    assert errors.verdict == "INCONCLUSIVE"
    assert "cannot be attributed to the window" in errors.summary and "after this look's cutoff" in errors.summary
