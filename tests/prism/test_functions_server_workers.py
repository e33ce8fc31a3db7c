"""``serve_functions(workers=N)``: several server processes on one port behave as one server (Postgres): finalize
works from any of them, the results rate limit is one limit for a client whichever worker answers, and stopping the
supervisor stops every worker."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from gatefill.clock import RealClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.sandbox.simulator import new_respondent, write_answers, write_session
from gatefill.prism.schema import profiles
from tests.conftest import create_pg_database, drop_pg_database, pg_env
from tests.prism.conftest import KEY_ENV, SERVICE_KEY

pytestmark = pytest.mark.postgres


def _serve(env: Environment, port: int) -> None:
    from gatefill.prism.platform.server import serve_functions

    os.environ[KEY_ENV] = SERVICE_KEY
    serve_functions(env, port=port, log_level="warning", workers=2)


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out.update(int(c) for c in task.read_text().split())
    return out


@pytest.fixture(scope="module")
def workers_url(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[str, multiprocessing.process.BaseProcess, Environment]]:
    name = create_pg_database(request.getfixturevalue("pg_template"))
    base = pg_env(name)
    env = Environment(base.name, base.kind, base.database_url, service_role_key_env=KEY_ENV)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(env, port))
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.post(f"{url}/functions/v1/finalizeAssessment", json={}, timeout=2).status_code == 400:
                    break
            except httpx.TransportError:
                pass
            assert process.is_alive() and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        yield url, process, env
    finally:
        process.terminate()
        process.join(30)
        drop_pg_database(name)


def test_workers_share_one_results_rate_limit(
    workers_url: tuple[str, multiprocessing.process.BaseProcess, Environment],
) -> None:
    url, process, _ = workers_url
    assert process.pid is not None
    # Two workers plus the limiter's manager process.
    assert len(_children(process.pid)) >= 3
    # A fresh connection per request, so the requests land on both workers.
    statuses = []
    for _ in range(65):
        with httpx.Client(timeout=10) as http:
            resp = http.post(
                f"{url}/functions/v1/get-results-by-session",
                json={"session_id": "00000000-0000-4000-8000-000000000001", "share_token": "x" * 36},
                headers={"x-forwarded-for": "10.201.0.9"},
            )
            statuses.append(resp.status_code)
    assert statuses[:60] == [403] * 60 and statuses[60:] == [429] * 5


def test_finalize_through_workers(workers_url: tuple[str, multiprocessing.process.BaseProcess, Environment]) -> None:
    url, _, env = workers_url
    rng = random.Random(11)
    with Database(env) as db:
        respondents = [new_respondent(rng, answer_ms=60_000) for _ in range(6)]
        for r in respondents:
            started = RealClock().now()
            write_session(db, r, started)
            write_answers(db, r, started, r.answer_ms)
        for r in respondents:
            with httpx.Client(timeout=30) as http:
                resp = http.post(f"{url}/functions/v1/finalizeAssessment", json={"session_id": r.session_id})
            assert resp.status_code == 200 and resp.json()["share_token"] == r.share_token
        ids = [r.session_id for r in respondents]
        with db.connect() as conn:
            count = conn.execute(sa.select(sa.func.count()).where(profiles.c.session_id.in_(ids))).scalar_one()
    assert count == len(ids)


def test_stopping_the_supervisor_stops_every_worker(request: pytest.FixtureRequest) -> None:
    name = create_pg_database(request.getfixturevalue("pg_template"))
    base = pg_env(name)
    env = Environment(base.name, base.kind, base.database_url, service_role_key_env=KEY_ENV)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(env, port))
    process.start()
    try:
        assert process.pid is not None
        deadline = time.monotonic() + 60
        while len(_children(process.pid)) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        workers = _children(process.pid)
        process.terminate()
        process.join(30)
        assert process.exitcode is not None
        assert all(not Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        if process.is_alive():
            process.kill()
        drop_pg_database(name)


def _serving(directory: Path) -> set[str]:
    """The processes that have counted a call: each writes its counters to ``counter_<pid>.db``."""
    return {p.name.split("_")[1].removesuffix(".db") for p in directory.glob("counter_*.db")}


def _metrics_total(http: httpx.Client, url: str) -> dict[tuple[str, str], float]:
    text = http.get(f"{url}/metrics").text
    return {
        (s.labels["function"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gatefill_function_requests_total"
    }


def test_every_worker_answers_a_scrape_with_the_one_total_and_the_supervisor_removes_the_files(
    request: pytest.FixtureRequest,
) -> None:
    """Two workers, each serving calls on its own connection: a scrape answered by either shows the calls of both
    (one total), and the directory of their metric files goes when the supervisor stops."""
    name = create_pg_database(request.getfixturevalue("pg_template"))
    base = pg_env(name)
    env = Environment(base.name, base.kind, base.database_url, service_role_key_env=KEY_ENV)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(env, port))
    process.start()
    try:
        assert process.pid is not None
        deadline = time.monotonic() + 60
        while True:  # ready when it serves its metrics (a scrape is not a call: nothing is counted yet)
            try:
                if httpx.get(f"{url}/metrics", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.is_alive() and time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        workers = {
            pid: dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
            for pid in _children(process.pid)
        }
        dirs = {v["PROMETHEUS_MULTIPROC_DIR"] for v in workers.values() if "PROMETHEUS_MULTIPROC_DIR" in v}
        assert len(dirs) == 1, workers.keys()
        directory = Path(dirs.pop())
        # Kept-alive connections, each making calls, until two workers have served some: the supervisor hands a new
        # connection to the worker holding fewer (the readiness probes' closes may still be uncounted at first).
        with contextlib.ExitStack() as stack:
            clients: list[httpx.Client] = []
            calls = 0
            while len(_serving(directory)) < 2:
                assert len(clients) < 8, f"every connection went to the same worker: {_serving(directory)}"
                client = stack.enter_context(httpx.Client(timeout=10))
                clients.append(client)
                for _ in range(3):
                    assert client.post(f"{url}/functions/v1/finalizeAssessment", json={}).status_code == 400
                    calls += 1
            assert clients[-1].post(f"{url}/functions/v1/score_prism", json={}).status_code == 401
            expected = {("finalizeAssessment", "400"): float(calls), ("score_prism", "401"): 1.0}
            # Whichever worker holds the connection answers its scrape: every answer is the one total.
            for client in clients:
                assert _metrics_total(client, url) == expected
        process.terminate()
        process.join(30)
        assert process.exitcode is not None
        assert not directory.exists()
    finally:
        if process.is_alive():
            process.kill()
        drop_pg_database(name)
