"""The traffic simulator against a live functions server: simulated time, every fault visible where it should be,
and a report that is the ground truth of what happened."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gatefill.clock import SimulatedClock
from gatefill.config import Environment
from gatefill.errors import ConfigError, UsageError
from gatefill.prism.platform.server import create_app
from gatefill.prism.sandbox.simulator import INJECTABLE, parse_inject, run_simulation, simulate
from gatefill.prism.schema import (
    assessment_responses,
    assessment_sessions,
    fc_scores,
    fn_logs,
    profiles,
    results_token_access_logs,
)
from tests.conftest import table_digests
from tests.prism.conftest import KEY_ENV, SERVICE_KEY, Live, run_server

# The functions server also runs through PgBouncer in transaction mode here (the `pooled` parameter of `live`).
pytestmark = pytest.mark.pooled

START = datetime(2025, 9, 17, 18, 7, 45, tzinfo=UTC)
EMPTY_TOKEN_HASH = hashlib.sha256(b"").hexdigest()


def _rows(live: Live, ids: list[str]) -> dict[str, Any]:
    """Everything the database holds about the simulated sessions, keyed for the checks below."""
    with live.db.connect() as conn:
        sessions = {
            r["id"]: dict(r)
            for r in conn.execute(sa.select(assessment_sessions).where(assessment_sessions.c.id.in_(ids))).mappings()
        }
        answers = dict(
            conn.execute(
                sa.select(assessment_responses.c.session_id, sa.func.count())
                .where(assessment_responses.c.session_id.in_(ids))
                .group_by(assessment_responses.c.session_id)
            ).all()
        )
        answer_times = conn.execute(
            sa.select(
                sa.func.min(assessment_responses.c.created_at), sa.func.max(assessment_responses.c.created_at)
            ).where(assessment_responses.c.session_id.in_(ids))
        ).one()
        fc = {
            r.session_id: r.created_at
            for r in conn.execute(sa.select(fc_scores).where(fc_scores.c.session_id.in_(ids)))
        }
        prof = {
            r["session_id"]: dict(r)
            for r in conn.execute(sa.select(profiles).where(profiles.c.session_id.in_(ids))).mappings()
        }
        events: dict[str, list[tuple[str, dict[str, Any], datetime]]] = {}
        for r in conn.execute(sa.select(fn_logs).order_by(fn_logs.c.id)):
            sid = (r.payload or {}).get("session_id")
            if sid in sessions:
                events.setdefault(sid, []).append((r.evt, r.payload, r.at))
        access: dict[str, list[tuple[str, bool, datetime]]] = {}
        for r in conn.execute(
            sa.select(results_token_access_logs).where(results_token_access_logs.c.session_id.in_(ids))
        ):
            access.setdefault(r.session_id, []).append((r.token_hash, r.success, r.ts))
    return {
        "sessions": sessions,
        "answers": answers,
        "answer_times": answer_times,
        "fc": fc,
        "profiles": prof,
        "events": events,
        "access": access,
    }


def test_six_simulated_hours_with_every_fault_match_the_rows_and_events(live: Live) -> None:
    inject = {name: 0.25 for name in INJECTABLE}
    wall = time.perf_counter()
    report = simulate(
        live.db,
        live.functions_url,
        sessions=16,
        duration="6h",
        clock=SimulatedClock(START),
        inject=inject,
        seed=3,
        service_role_key=SERVICE_KEY,
        slow_ms=40,
    )
    assert time.perf_counter() - wall < 30
    totals = report.totals()
    assert totals["sessions_started"] == 16 and totals["transport_errors"] == 0
    # The seed is chosen so that every fault kind occurs at least once.
    assert all(n > 0 for n in report.injected_counts.values()), report.injected_counts
    end = START + timedelta(hours=6, minutes=30)
    assert START <= report.ended_at <= end

    outcomes = report.sessions
    ids = [o.session_id for o in outcomes]
    db = _rows(live, ids)
    assert set(db["sessions"]) == set(ids)
    lo, hi = db["answer_times"]
    assert START <= lo <= hi <= report.ended_at

    for o in outcomes:
        session = db["sessions"][o.session_id]
        events = db["events"].get(o.session_id, [])
        names = [name for name, _, _ in events]
        assert session["created_at"] == o.started_at and START <= o.started_at <= START + timedelta(hours=6)
        assert db["answers"].get(o.session_id, 0) == o.answers
        # Every row the server wrote carries simulated time, never the wall clock.
        assert all(START <= at <= report.ended_at for _, _, at in events)
        assert all(START <= ts <= report.ended_at for _, _, ts in db["access"].get(o.session_id, []))
        if o.abandoned:
            assert session["status"] == "in_progress" and o.answers < 148
            assert o.finalize_status is None and names == [] and o.session_id not in db["profiles"]
            assert (o.abandoned == "injected") == ("abandon" in o.injected)
            continue
        assert o.answers == 248 and o.fc_answers == 6
        assert session["status"] == "completed" and session["finalized_at"] == o.finalized_at
        if "engine_version_override" in o.injected:
            drift = [p for name, p, _ in events if name == "engine_version_override"]
            assert len(drift) == 1 and drift[0]["db_version"] == "v1.2.0"
        else:
            assert "engine_version_override" not in names
        if "legacy_fc" in o.injected:
            assert o.session_id not in db["fc"] and "fc_fallback_legacy" in names
        else:
            assert "fc_scores_loaded" in names
            if "profile_write_fail" not in o.injected:  # a failed call rolls back its fc_scores row too
                assert START <= db["fc"][o.session_id] <= report.ended_at
        if "profile_write_fail" in o.injected:
            assert o.finalize_status == 500 and o.finalize_code == "PROFILE_WRITE_FAILED"
            assert o.session_id not in db["profiles"] and "profile_write_failed" in names
            assert o.results_status is None
            continue
        assert o.finalize_status == 200 and "finalize_complete" in names
        profile = db["profiles"][o.session_id]
        assert profile["type_code"] == o.type_code and profile["created_at"] == o.finalized_at
        assert profile["results_version"] == "v1.2.1"
        if "slow" in o.injected:
            assert o.finalize_ms is not None and o.finalize_ms >= 40
            assert [p["delay_ms"] for name, p, _ in events if name == "finalize_complete"] == [40]
        access = db["access"][o.session_id]
        assert o.results_status == 200 and len(access) == 1
        if "token_bypass" in o.injected:
            assert access[0][:2] == (EMPTY_TOKEN_HASH, True) and o.results_tokenless
            assert [p["served"] for name, p, _ in events if name == "tokenless_access"] == [True]
        else:
            token = session["share_token"]
            assert access[0][:2] == (hashlib.sha256(token.encode()).hexdigest(), True)

    # The totals are the ground truth a soak compares with: they equal the database.
    completed = sum(s["status"] == "completed" for s in db["sessions"].values())
    assert totals["completed_sessions"] == completed
    assert totals["profiles_expected"] == len(db["profiles"])
    assert totals["abandoned_natural"] + totals["abandoned_injected"] == sum(
        s["status"] == "in_progress" for s in db["sessions"].values()
    )
    as_json = report.to_json()
    json.dumps(as_json)
    assert as_json["injected_sessions"]["profile_write_fail"] == [
        o.session_id for o in outcomes if "profile_write_fail" in o.injected
    ]
    text = report.render()
    assert "clock simulated" in text and "profile_write_fail" in text and "p=0.25" in text


def test_rate_mode_runs_poisson_arrivals_over_the_duration(live: Live) -> None:
    start = START + timedelta(days=1)
    report = simulate(
        live.db,
        live.functions_url,
        rate="5/h",
        duration="2h",
        clock=SimulatedClock(start),
        seed=11,
        service_role_key=SERVICE_KEY,
        abandon_rate=0.0,
    )
    n = len(report.sessions)
    assert 3 <= n <= 25  # Poisson(10); the seed gives a fixed draw
    assert all(start <= o.started_at <= start + timedelta(hours=2) for o in report.sessions)
    assert report.totals()["profiles_expected"] == n
    assert report.totals()["results_status"] == {"200": n}
    assert report.injected_counts == dict.fromkeys(INJECTABLE, 0)


def test_a_short_real_clock_run_takes_about_its_duration(live: Live) -> None:
    before = datetime.now(UTC)
    wall = time.perf_counter()
    report = simulate(live.db, live.functions_url, sessions=2, duration="2s", seed=1, abandon_rate=0.0)
    elapsed = time.perf_counter() - wall
    assert 0.5 < elapsed < 10
    assert report.clock == "real" and report.totals()["profiles_expected"] == 2
    assert all(before <= o.started_at <= datetime.now(UTC) for o in report.sessions)
    assert report.totals()["results_status"] == {"200": 2}


def test_simulated_time_needs_a_server_that_allows_it(live: Live) -> None:
    before = table_digests(live.db)
    app = create_app(live.env, live.db, service_role_key=SERVICE_KEY)
    with run_server(app) as url, pytest.raises(UsageError, match="--allow-fault-injection"):
        simulate(
            live.db,
            f"{url}/functions/v1",
            sessions=1,
            duration="1h",
            clock=SimulatedClock(START),
            service_role_key=SERVICE_KEY,
            abandon_rate=0.0,
        )
    with pytest.raises(ConfigError, match="service-role key"):
        simulate(
            live.db, live.functions_url, sessions=1, clock=SimulatedClock(START), service_role_key=None, abandon_rate=0
        )
    with pytest.raises(UsageError, match=r"refused simulated time/faults \(UNAUTHORIZED\)"):
        simulate(live.db, live.functions_url, sessions=1, clock=SimulatedClock(START), service_role_key="sk-wrong")
    assert table_digests(live.db) == before  # each was refused before a respondent wrote a row


def free_port() -> int:
    """A port of 127.0.0.1 where nothing listens (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_server_is_refused_before_any_row_is_written(live: Live) -> None:
    before = table_digests(live.db)
    with pytest.raises(UsageError, match=r"no functions server answers at http://127\.0\.0\.1:\d+/functions/v1"):
        simulate(
            live.db,
            f"http://127.0.0.1:{free_port()}/functions/v1",
            sessions=2,
            duration="10m",
            clock=SimulatedClock(START),
            service_role_key=SERVICE_KEY,
            abandon_rate=0.0,
            transport=httpx.HTTPTransport(retries=0),
        )
    assert table_digests(live.db) == before


class _AnswersOnce(http.server.BaseHTTPRequestHandler):
    """A server that answers the first call as the functions do to an empty finalize, then drops every connection:
    a functions server that dies after the simulator's check."""

    calls = 0

    def do_POST(self) -> None:
        type(self).calls += 1
        if type(self).calls > 1:
            self.close_connection = True
            return
        body = json.dumps({"error": "session_id is required", "code": "SESSION_ID_REQUIRED"}).encode()
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        return None


def _simulate_cli(live: Live, tmp_path: Path, url: str, *more: str) -> tuple[int, str, str]:
    config = tmp_path / "gatefill.toml"
    config.write_text(
        f'[env.staging]\ndatabase_url = "{live.env.database_url}"\nservice_role_key_env = "{KEY_ENV}"\n',
        encoding="utf-8",
    )
    argv = ["--config", str(config), "simulate", "--env", "staging", "--functions-url", url, "--sessions", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "gatefill", *argv, "--duration", "10m", "--clock", "simulated", *more],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, KEY_ENV: SERVICE_KEY},
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_the_command_checks_url_and_key_first_and_transport_errors_exit_1(live: Live, tmp_path: Path) -> None:
    before = table_digests(live.db)
    for url, says in (
        (f"http://127.0.0.1:{free_port()}/functions/v1", "error: no functions server answers at"),
        (
            live.base_url,
            "finalizeAssessment does not answer as the PRISM finalizeAssessment function (HTTP 404 NOT_FOUND)",
        ),
    ):
        code, out, err = _simulate_cli(live, tmp_path, url)
        assert (code, out) == (2, ""), err
        assert err.startswith("error: ") and err.count("\n") == 1 and says in err
    assert table_digests(live.db) == before

    handler = type("AnswersOnceHere", (_AnswersOnce,), {"calls": 0})  # a count of its own for this server
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/functions/v1"
        code, out, err = _simulate_cli(live, tmp_path, url, "--seed", "3")
    finally:
        server.shutdown()
        server.server_close()
    assert code == 1, (out, err)
    first = out.splitlines()[0]
    assert re.fullmatch(
        rf"simulated 3 respondent\(s\) against {url}: [123] call\(s\) got no answer \(transport errors\)", first
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"sessions": 3, "rate": "10/h"}, "exactly one of"),
        ({"rate": "fast"}, "not a rate"),
        ({"rate": "unlimited"}, "finite rate"),
        ({"sessions": 3, "duration": "soon"}, "--duration"),
        ({"sessions": 3, "duration": "0s"}, "positive"),
        ({"sessions": -1}, "--sessions"),
        ({"rate": "100000/s", "duration": "1h"}, "more than"),
        ({"sessions": 1, "inject": {"meteor": 0.5}}, "unknown fault"),
    ],
)
def test_simulate_rejects_bad_arguments(live: Live, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        simulate(live.db, live.functions_url, clock=SimulatedClock(START), service_role_key=SERVICE_KEY, **kwargs)


def test_parse_inject() -> None:
    assert parse_inject("legacy_fc=0.1, slow=1,abandon") == {"legacy_fc": 0.1, "slow": 1.0, "abandon": 1.0}
    assert parse_inject(None) == {} and parse_inject("") == {}
    for bad, message in (("nope=0.1", "unknown fault"), ("slow=2", "within 0..1"), ("slow=x", "not a probability")):
        with pytest.raises(UsageError, match=message):
            parse_inject(bad)


def test_run_simulation_resolves_url_clock_and_start(live: Live) -> None:
    bare = Environment("bare", "staging", live.env.database_url)
    with pytest.raises(UsageError, match="production"):
        run_simulation(Environment("prod", "production", live.env.database_url), functions_url="http://x", sessions=1)
    with pytest.raises(ConfigError, match="functions_url"):
        run_simulation(bare, functions_url=None, sessions=1)
    with pytest.raises(UsageError, match="--start needs --clock simulated"):
        run_simulation(bare, functions_url=live.functions_url, sessions=1, start=START)
    with pytest.raises(UsageError, match="--clock"):
        run_simulation(bare, functions_url=live.functions_url, sessions=1, clock="lunar")
    env = Environment(
        "sim",
        "staging",
        live.env.database_url,
        functions_url=live.functions_url,
        service_role_key_env=live.env.service_role_key_env,
        pooler=live.env.pooler,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(live.env.service_role_key_env, SERVICE_KEY)
        report = run_simulation(
            env, functions_url=None, sessions=2, duration="1h", clock="simulated", start=START, seed=5
        )
    assert report.clock == "simulated" and report.started_at == START and len(report.sessions) == 2
