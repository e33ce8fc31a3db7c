"""The functions server's ``GET /metrics`` on SQLite and Postgres: calls by function and status, latency buckets, call
instants on the server's clock, database errors; every 5xx that no event records gets a ``server_error`` event when
the database takes it, and is counted as unrecorded when it does not (a refused write, an unreachable database),
without a second failure. Each test serves a fresh app (fresh counters) on its module's database."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from gatefill.clock import RealClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.platform.metrics import BUCKETS
from gatefill.prism.platform.server import create_app
from gatefill.prism.schema import fn_logs
from tests.conftest import drop_pg_database
from tests.prism.conftest import SERVICE_KEY, Live, _module_database, refused_writes, run_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    env, pg_name = _module_database(request.param, request, tmp_path_factory.mktemp("metrics"))
    try:
        yield env
    finally:
        if pg_name:
            drop_pg_database(pg_name)


@pytest.fixture
def fresh(module_env: Environment) -> Iterator[Live]:
    """A fault-injection server with its own (zero) metrics on the module's database."""
    server_db = Database(module_env, pool_size=4)
    db = Database(module_env)
    clock = RealClock()
    try:
        app = create_app(module_env, server_db, clock=clock, allow_fault_injection=True, service_role_key=SERVICE_KEY)
        with run_server(app) as url, httpx.Client(timeout=30) as http:
            yield Live("sqlite" if module_env.is_sqlite else "postgresql", module_env, db, server_db, url, clock, http)
    finally:
        db.dispose()
        server_db.dispose()


def samples(base_url: str) -> Samples:
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def requests(found: Samples) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["function"], dict(labels)["status"]): v
        for (name, labels), v in found.items()
        if name == "gatefill_function_requests_total"
    }


def wait_for(check: Any, what: str, seconds: float = 10.0) -> Any:
    """Polls ``check`` until it returns something truthy (background writes follow the answer)."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def events(live: Live, evt: str) -> list[dict[str, Any]]:
    with live.db.connect() as conn:
        rows = conn.execute(sa.select(fn_logs.c.payload).where(fn_logs.c.evt == evt).order_by(fn_logs.c.id)).all()
    return [r[0] for r in rows]


def test_calls_are_counted_by_function_and_status_with_latency_buckets_and_call_instants(fresh: Live) -> None:
    r = fresh.respondent()
    # Instants the server is told (X-Gatefill-Now), recent enough for the share token to be live now.
    t1 = datetime.now(UTC).replace(microsecond=123000) - timedelta(hours=1)
    t2 = t1 + timedelta(minutes=7)
    timed = {"x-gatefill-now": t1.isoformat()}
    done = fresh.post("finalizeAssessment", {"session_id": r.session_id}, key=True, headers=timed)
    assert done.status_code == 200
    token = done.json()["share_token"]
    later = {"x-gatefill-now": t2.isoformat()}
    assert fresh.post("finalizeAssessment", {}, key=True, headers=later).status_code == 400
    got = fresh.http.get(
        f"{fresh.base_url}/results/{r.session_id}", params={"t": token}, headers={"x-forwarded-for": "10.9.0.1"}
    )
    assert got.status_code == 200
    assert fresh.post("score_prism", {"session_id": r.session_id}).status_code == 401
    # Neither a preflight, nor an unknown function, nor a scrape is a function call.
    preflight = {"origin": "http://localhost:5173", "access-control-request-method": "POST"}
    assert fresh.http.options(f"{fresh.functions_url}/finalizeAssessment", headers=preflight).status_code == 200
    assert fresh.post("nope", {}).status_code == 404
    samples(fresh.base_url)  # a scrape, not counted either

    found = samples(fresh.base_url)
    assert requests(found) == {
        ("finalizeAssessment", "200"): 1,
        ("finalizeAssessment", "400"): 1,
        ("get-results-by-session", "200"): 1,
        ("score_prism", "401"): 1,
    }
    duration = "gatefill_function_request_duration_seconds"
    assert value(found, f"{duration}_count", function="finalizeAssessment") == 2
    edges = sorted(
        float(dict(labels)["le"])
        for (name, labels) in found
        if name == f"{duration}_bucket" and dict(labels)["function"] == "score_prism"
    )
    assert edges == sorted(BUCKETS) and 0.05 in edges and 1.0 in edges
    assert value(found, f"{duration}_bucket", function="score_prism", le="+Inf") == 1
    # The instants are the server's: the X-Gatefill-Now it accepted.
    assert (
        value(found, "gatefill_function_first_call_timestamp_seconds", function="finalizeAssessment") == t1.timestamp()
    )
    assert (
        value(found, "gatefill_function_last_call_timestamp_seconds", function="finalizeAssessment") == t2.timestamp()
    )
    started = value(found, "gatefill_functions_server_start_time_seconds")
    assert started is not None and abs(started - time.time()) < 600
    assert not any(name.startswith("gatefill_function_database_errors") and v for (name, _), v in found.items())


def test_a_5xx_no_other_event_records_leaves_a_server_error_event(fresh: Live) -> None:
    r = fresh.respondent()
    failed = fresh.post(
        "finalizeAssessment", {"session_id": r.session_id}, key=True, headers={"x-gatefill-fault": "server_error"}
    )
    assert failed.status_code == 500 and failed.json() == {"error": "internal error", "code": "INTERNAL_ERROR"}
    written = wait_for(lambda: events(fresh, "server_error"), "the server_error event")
    assert len(written) == 1
    event = written[0]
    assert (event["fn"], event["session_id"], event["status"], event["code"]) == (
        "finalizeAssessment",
        r.session_id,
        500,
        "INTERNAL_ERROR",
    )
    assert event["injected"] == ["server_error"]
    # A failed write already has its own event (profile_write_failed): no second one.
    other = fresh.respondent()
    refused = fresh.post(
        "finalizeAssessment",
        {"session_id": other.session_id},
        key=True,
        headers={"x-gatefill-fault": "profile_write_fail"},
    )
    assert refused.status_code == 500 and refused.json()["code"] == "PROFILE_WRITE_FAILED"
    found = samples(fresh.base_url)
    assert requests(found) == {("finalizeAssessment", "500"): 2}
    assert value(found, "gatefill_function_database_errors_total", function="finalizeAssessment") == 1
    assert [e["session_id"] for e in events(fresh, "server_error")] == [r.session_id]
    assert [e["session_id"] for e in events(fresh, "profile_write_failed")][-1] == other.session_id


def test_a_500_whose_event_the_database_refuses_is_counted_as_unrecorded(fresh: Live) -> None:
    """The issue's case: a call fails on the database and its error event cannot be written either. The answer stays
    the 500, the metrics count it (and as unrecorded), and no fn_logs row of the session exists."""
    r = fresh.respondent()
    json_key = {"sqlite_key": "json_extract(NEW.payload, '$.session_id')", "pg_key": "NEW.payload->>'session_id'"}
    with refused_writes(fresh, "fn_logs", r.session_id, **json_key):
        failed = fresh.post("finalizeAssessment", {"session_id": r.session_id})
        assert failed.status_code == 500 and failed.json()["code"] == "DATABASE_ERROR"
        found = wait_for(
            lambda: (
                (f := samples(fresh.base_url))
                and value(f, "gatefill_function_unrecorded_errors_total", function="finalizeAssessment")
                and f
            ),
            "the unrecorded count",
        )
    assert requests(found) == {("finalizeAssessment", "500"): 1}
    assert value(found, "gatefill_function_database_errors_total", function="finalizeAssessment") == 1
    with fresh.db.connect() as conn:
        rows = conn.execute(sa.select(fn_logs.c.evt, fn_logs.c.payload)).all()
    assert [r2.evt for r2 in rows if r2.payload and r2.payload.get("session_id") == r.session_id] == []
    # The server goes on answering.
    assert fresh.post("finalizeAssessment", {"session_id": r.session_id}).status_code == 200


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.postgres
def test_an_unreachable_database_answers_503_counted_unrecorded_and_the_server_keeps_answering() -> None:
    # A database server nobody listens for (SQLite has no server: a missing file is refused at start).
    gone = Environment("gone", "staging", f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/nothing")
    with Database(gone) as db:
        app = create_app(gone, db, service_role_key=SERVICE_KEY)
        with run_server(app) as url, httpx.Client(timeout=30) as http:
            body = {"session_id": "00000000-0000-4000-8000-000000000503"}
            for _ in range(2):
                answer = http.post(f"{url}/functions/v1/finalizeAssessment", json=body)
                assert answer.status_code == 503 and answer.json()["code"] == "DATABASE_UNAVAILABLE"
            found = samples(url)
    assert requests(found) == {("finalizeAssessment", "503"): 2}
    assert value(found, "gatefill_function_unrecorded_errors_total", function="finalizeAssessment") == 2
    assert value(found, "gatefill_function_database_errors_total", function="finalizeAssessment") == 2


def test_finalize_and_results_answers_are_never_cached(fresh: Live) -> None:
    r = fresh.respondent()
    done = fresh.post("finalizeAssessment", {"session_id": r.session_id})
    assert done.status_code == 200 and done.headers["cache-control"] == "no-store"
    token = done.json()["share_token"]
    body = {"session_id": r.session_id, "share_token": token}
    results = fresh.post("get-results-by-session", body, ip="10.9.0.2")
    assert results.status_code == 200 and results.headers["cache-control"] == "no-store"
    link = fresh.http.get(f"{fresh.base_url}/results/{r.session_id}", headers={"x-forwarded-for": "10.9.0.3"})
    assert link.status_code == 401 and link.headers["cache-control"] == "no-store"
    refused = fresh.post("finalizeAssessment", {})
    assert refused.status_code == 400 and refused.headers["cache-control"] == "no-store"
    scored = fresh.post("score_fc_session", {"session_id": r.session_id}, key=True)
    assert scored.status_code == 200 and "cache-control" not in scored.headers
