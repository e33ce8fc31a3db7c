"""The real ``@supabase/supabase-js`` client (tests/js, pinned by its lock file; ``make test`` runs ``npm ci``) against
a real ``gatefill serve functions`` process, on SQLite and Postgres: every function called with ``functions.invoke``
as the 2025-09-17 front-end called it, the CORS preflight a browser sends first, and every answer checked by the
script; this test asserts on the script's JSON and on the rows the calls wrote."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gatefill.clock import RealClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.sandbox.simulator import Respondent, new_respondent, write_answers, write_session
from gatefill.prism.schema import assessment_sessions, profiles
from tests.conftest import drop_pg_database
from tests.prism.conftest import _module_database

JS = Path(__file__).resolve().parents[1] / "js"
SERVICE_KEY = "sk-test-supabase-js-0b7c4f2e9d1a4e6b8c3f5a7d"
# Any string works as the anon key: the functions ignore it, as the live ones (verify_jwt = false) did.
ANON_KEY = "anon-test-key-not-a-secret"
#: HTTP requests the script makes: 5 preflights and 9 functions.invoke calls.
CALLS = 14
#: Checks the script makes of their answers (statuses, bodies, error classes, CORS and cache headers).
CHECKS = 66


def _node() -> str:
    """The node binary, with the pinned client installed; otherwise the suite stops on one clear line."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the supabase-js tests need Node >= 20 and npm", pytrace=False)
    if not (JS / "node_modules" / "@supabase" / "supabase-js").is_dir():
        pytest.fail(
            "tests/js/node_modules is missing: run `make test` (it runs npm ci) or `npm ci --prefix tests/js`", False
        )
    return node


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(params=["sqlite", "postgresql", "pooled"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, Environment]]:
    """``gatefill serve functions`` in its own process, configured by environment variables only (and the node
    binary that will call it, checked first)."""
    node = _node()
    env, pg_name = _module_database(request.param, request, tmp_path)
    port = _free_port()
    variables = {
        **os.environ,
        "GATEFILL_ENV_JS_DATABASE_URL": env.database_url,
        "GATEFILL_ENV_JS_POOLER": env.pooler,
        "GATEFILL_ENV_JS_SERVICE_ROLE_KEY_ENV": "GATEFILL_TEST_JS_KEY",
        "GATEFILL_TEST_JS_KEY": SERVICE_KEY,
    }
    command = [sys.executable, "-m", "gatefill", "serve", "functions", "--env", "js", "--port", str(port)]
    log = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as sink:
        server = subprocess.Popen(command, env=variables, stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/metrics", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "gatefill serve functions did not start"
            time.sleep(0.1)
        yield node, url, env
    finally:
        server.terminate()
        server.wait(30)
        if pg_name:
            drop_pg_database(pg_name)


def _respondent(db: Database, rng: random.Random) -> Respondent:
    r = new_respondent(rng, answer_ms=60_000)
    started = RealClock().now()
    write_session(db, r, started)
    write_answers(db, r, started, r.answer_ms)
    return r


def test_the_real_supabase_client_calls_every_function_as_the_front_end_did(
    served: tuple[str, str, Environment],
) -> None:
    node, url, env = served
    rng = random.Random(917)
    with Database(env) as db:
        finalizing, scoring = _respondent(db, rng), _respondent(db, rng)
        responses = [{"question_id": qid, "answer_value": value} for qid, _t, _k, _s, value, _o in finalizing.answers]
        settings: dict[str, Any] = {
            "url": url,
            "anonKey": ANON_KEY,
            "serviceKey": SERVICE_KEY,
            "origin": "http://localhost:5173",
            "finalize": {"session_id": finalizing.session_id, "responses": responses},
            "scoring": {"session_id": scoring.session_id},
        }
        run = subprocess.run(
            [node, str(JS / "invoke.mjs"), json.dumps(settings)], capture_output=True, text=True, timeout=120, cwd=JS
        )
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert "crashed" not in out, out
        assert out["checks"]["failed"] == [], json.dumps(out["checks"]["failed"], indent=2)
        assert out["client"] == "@supabase/supabase-js 2.57.4"
        assert len(out["calls"]) == CALLS and out["checks"]["total"] == CHECKS
        # What this client version puts in a request, which the server's CORS answer must allow.
        assert out["client_headers"] == ["apikey", "authorization", "content-type", "x-client-info"]
        with db.connect() as conn:
            session = conn.execute(
                sa.select(assessment_sessions.c.status, assessment_sessions.c.completed_questions).where(
                    assessment_sessions.c.id == finalizing.session_id
                )
            ).one()
            written = conn.execute(
                sa.select(profiles.c.session_id).where(
                    profiles.c.session_id.in_([finalizing.session_id, scoring.session_id])
                )
            ).all()
    assert (session.status, session.completed_questions) == ("completed", len(responses))
    assert {r.session_id for r in written} == {finalizing.session_id, scoring.session_id}


#: Respondents finalizing at once in the load test, each then opening its results: two calls each.
LOAD_SESSIONS = 100
LOAD_CLIENTS = 20


def test_twenty_clients_at_once_get_only_200s_and_every_profile_is_written(
    served: tuple[str, str, Environment],
) -> None:
    """tests/js/load.mjs: 20 concurrent supabase-js clients finalize 100 sessions and open their results (200 calls);
    through the transaction pooler this is where prepared statements and session settings broke (issue 13). The
    bench (bench/bench_supabase_js.py) runs the same script with 2,000 calls and more."""
    node, url, env = served
    rng = random.Random(20)
    with Database(env) as db:
        bodies = []
        for _ in range(LOAD_SESSIONS):
            r = _respondent(db, rng)
            bodies.append(
                {
                    "session_id": r.session_id,
                    "responses": [{"question_id": q, "answer_value": v} for q, _t, _k, _s, v, _o in r.answers],
                }
            )
        settings = {"url": url, "anonKey": ANON_KEY, "clients": LOAD_CLIENTS, "sessions": bodies}
        with (JS / f".load-{os.getpid()}.json").open("w", encoding="utf-8") as arg:
            json.dump(settings, arg)
        try:
            run = subprocess.run(
                [node, str(JS / "load.mjs"), "@" + arg.name], capture_output=True, text=True, timeout=300, cwd=JS
            )
        finally:
            Path(arg.name).unlink()
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert out["errors"] == [] and out["skipped_results"] == 0, out["errors"]
        assert out["calls"] == 2 * LOAD_SESSIONS
        assert {name: f["statuses"] for name, f in out["functions"].items()} == {
            "finalizeAssessment": {"200": LOAD_SESSIONS},
            "get-results-by-session": {"200": LOAD_SESSIONS},
        }
        with db.connect() as conn:
            written = conn.execute(
                sa.select(sa.func.count()).where(profiles.c.session_id.in_([b["session_id"] for b in bodies]))
            ).scalar_one()
    assert written == LOAD_SESSIONS
