"""Benchmark: one soak measurement (every check of one look, probes included) on a Postgres database with 1M sessions
while simulated respondents write live traffic through a functions server.

Setup (not timed): a fresh database with the schema and reference data; N sessions spread over the 40 days before the
window (90 % completed; 97 % of those with a profile, all in the last two days; v1.2 fc_scores and six FC answers
each, two fn_logs events and one results access each), bulk-inserted with ``generate_series``; ANALYZE. Answers
(``assessment_responses``) are not generated: no soak query reads them. Then a functions server starts in a thread
and the traffic simulator writes sessions into the window from another thread, with a simulated clock starting at
the window's start.

Timed, while that traffic runs: the first look (it also measures the frozen baseline over the 30 days before the
window), then ``--looks`` further looks at later cutoffs, each measuring all eight checks. Printed: the command, the
table sizes, each look's time and the median of the later ones, and for every query of a look its EXPLAIN (ANALYZE,
BUFFERS) plan's scan nodes, flagging a sequential scan of a large table. ``--plans FILE`` writes the full plans.

    .venv/bin/python bench/bench_soak.py --sessions 1000000 --looks 5

``--without-finalized-index`` skips the proposed index on ``assessment_sessions.finalized_at`` (the write_failures
check filters on it; the schema does not have it yet) to show the plan without it. The server comes from ``--server``
or ``GATEFILL_TEST_DATABASE_URL`` (default postgresql://postgres@127.0.0.1:5432/postgres); the database is dropped
at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import sys
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from gatefill.clock import SimulatedClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.functions_server import create_app, serve_in_thread
from gatefill.prism.schema import init_schema, load_reference_data
from gatefill.prism.simulator import SimulationReport, simulate
from gatefill.prism.soak_checks import PrismSoakChecks, PrismSoakSettings, window_queries
from gatefill.soak import Look
from gatefill.stats import SequentialPlan

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
WINDOW_START = datetime(2025, 10, 1, tzinfo=UTC)
LARGE = ("assessment_sessions", "profiles", "fc_scores", "fc_responses", "fn_logs", "results_token_access_logs")
KEY = "sk-bench-soak-" + uuid.uuid4().hex
# Counting three quarters of the sessions table is a sequential scan by design; it runs once, at the first look.
BASELINE = "baseline funnels (first look only)"

_LOAD = [
    (
        "assessment_sessions",
        """
        INSERT INTO assessment_sessions (id, started_at, created_at, updated_at, completed_at, finalized_at, status,
            share_token, share_token_expires_at, total_questions, completed_questions)
        SELECT gen_random_uuid(), t, t, t + interval '20 minutes',
               CASE WHEN done THEN t + interval '20 minutes' END, CASE WHEN done THEN t + interval '20 minutes' END,
               CASE WHEN done THEN 'completed' ELSE 'in_progress' END, gen_random_uuid()::text,
               CASE WHEN done THEN t + interval '30 days' END, 248, CASE WHEN done THEN 248 ELSE 90 END
        FROM (SELECT %(t0)s::timestamptz - random() * interval '40 days' AS t, random() < 0.9 AS done
              FROM generate_series(1, %(n)s)) AS g
        """,
    ),
    (
        "profiles",
        """
        INSERT INTO profiles (session_id, type_code, version, results_version, created_at, updated_at, submitted_at)
        SELECT id, 'LIE', 'v1.2.1', 'v1.2.1', completed_at, completed_at, completed_at FROM assessment_sessions
        WHERE status = 'completed' AND (random() < 0.97 OR completed_at >= %(t0)s::timestamptz - interval '2 days')
        """,
    ),
    (
        "fc_scores",
        """
        INSERT INTO fc_scores (session_id, version, fc_kind, scores_json, blocks_answered, created_at)
        SELECT session_id, 'v1.2', 'functions', '{"Ti": 100, "Te": 50}'::jsonb, 6, created_at FROM profiles
        """,
    ),
    (
        "fc_responses",
        """
        INSERT INTO fc_responses (session_id, block_id, option_id, answered_at)
        SELECT s.id, b.id, o.id, s.started_at + interval '10 minutes'
        FROM assessment_sessions s CROSS JOIN fc_blocks b JOIN fc_options o ON o.block_id = b.id AND o.option_code = 'A'
        WHERE s.status = 'completed' AND b.version = 'v1.2'
        """,
    ),
    (
        "fn_logs",
        """
        INSERT INTO fn_logs (evt, payload, at)
        SELECT e.evt, jsonb_build_object('fn', 'finalizeAssessment', 'session_id', p.session_id), p.created_at
        FROM profiles p CROSS JOIN (VALUES ('fc_scores_loaded'), ('finalize_complete')) AS e(evt)
        """,
    ),
    (
        "results_token_access_logs",
        """
        INSERT INTO results_token_access_logs (session_id, profile_id, token_hash, success, ua, ts)
        SELECT session_id, id, md5(session_id::text), true, 'bench', created_at + interval '1 minute' FROM profiles
        """,
    ),
]


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_database(url: str, name: str) -> str:
    base, _, rest = _libpq(url).rpartition("/")
    query = "?" + rest.split("?", 1)[1] if "?" in rest else ""
    return f"{base}/{name}{query}"


def _load(url: str, sessions: int, finalized_index: bool) -> dict[str, float]:
    seconds: dict[str, float] = {}
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        for table, statement in _LOAD:
            started = time.perf_counter()
            conn.execute(statement, {"t0": WINDOW_START, "n": sessions})  # type: ignore[arg-type]
            seconds[table] = time.perf_counter() - started
        if finalized_index:
            conn.execute("CREATE INDEX ix_assessment_sessions_finalized ON assessment_sessions (finalized_at)")
        started = time.perf_counter()
        conn.execute("ANALYZE")
        seconds["analyze"] = time.perf_counter() - started
    return seconds


def _sizes(url: str) -> dict[str, int]:
    with psycopg.connect(_libpq(url)) as conn:
        out = {}
        for table in LARGE:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
            out[table] = int(row[0]) if row else 0
        return out


def _look(number: int, end: datetime, previous: dict[str, Any], plan: SequentialPlan) -> Look:
    return Look(
        run_id="bench",
        number=number,
        max_looks=plan.max_looks,
        window_start=WINDOW_START,
        end=end,
        window_end=WINDOW_START + timedelta(hours=6),
        taken_at=end,
        plan=plan,
        margin=0.05,
        baseline_days=30.0,
        baseline_rate=None,
        min_n=30,
        simulated_time=True,
        previous=previous,
    )


def _explain(db: Database, end: datetime) -> list[tuple[str, list[str], str]]:
    """Per query: its scan nodes and the full EXPLAIN (ANALYZE, BUFFERS) text; the baseline's funnel query last."""
    out = []
    queries = window_queries(WINDOW_START, end)
    baseline = [q for q in window_queries(WINDOW_START - timedelta(days=30), WINDOW_START) if q[0] == "funnels"]
    queries += [(BASELINE, clause, params) for _, clause, params in baseline]
    with db.engine.connect() as conn:
        for name, clause, params in queries:
            compiled = clause.bindparams(**params).compile(
                dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
            )
            rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + str(compiled), compiled.params).all()
            text = "\n".join(r[0] for r in rows)
            scans = [
                m.group(0).strip()
                for m in re.finditer(
                    r"(Parallel )?(Seq Scan|Index Only Scan|Index Scan|Bitmap Index Scan)[^\n(]*", text
                )
            ]
            out.append((name, scans, text))
        conn.rollback()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--looks", type=int, default=5, help="timed looks after the first")
    parser.add_argument("--traffic", default="1200/h", help="simulated arrival rate during the measurements")
    parser.add_argument("--server", default=os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER))
    parser.add_argument("--without-finalized-index", action="store_true")
    parser.add_argument("--plans", type=Path, help="write the full EXPLAIN plans here")
    parser.add_argument("--keep", action="store_true", help="keep the database (its name is printed)")
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    name = f"gf_bench_soak_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(args.server), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(args.server, name).replace("postgresql://", "postgresql+psycopg://", 1)
    env = Environment(name="bench", kind="staging", database_url=url, service_role_key_env="GATEFILL_BENCH_KEY")
    try:
        with Database(env) as db:
            init_schema(db)
            load_reference_data(db)
        started = time.perf_counter()
        load_seconds = _load(url, args.sessions, not args.without_finalized_index)
        print(f"database {name}: loaded in {time.perf_counter() - started:.1f} s", load_seconds)
        print("rows:", _sizes(url))
        return _measure(env, args)
    finally:
        if not args.keep:
            with psycopg.connect(_libpq(args.server), autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        else:
            print(f"kept database {name}")


def _measure(env: Environment, args: argparse.Namespace) -> int:
    server_db = Database(env, pool_size=4)
    db = Database(env, pool_size=4)
    app = create_app(env, server_db, allow_fault_injection=True, service_role_key=KEY, rate_limit_per_minute=100_000)
    reports: list[SimulationReport] = []
    with serve_in_thread(app) as base:
        stop_traffic = threading.Event()

        def traffic() -> None:
            clock = SimulatedClock(WINDOW_START)
            while not stop_traffic.is_set():
                reports.append(
                    simulate(
                        db,
                        f"{base}/functions/v1",
                        rate=args.traffic,
                        duration="10m",
                        clock=clock,
                        service_role_key=KEY,
                        seed=len(reports),
                    )
                )

        thread = threading.Thread(target=traffic, name="traffic", daemon=True)
        thread.start()
        time.sleep(3.0)  # let live traffic reach the window before the first look
        plan = SequentialPlan(max_looks=72)
        settings = PrismSoakSettings(service_role_key=KEY, probe_budget_per_minute=10_000)
        timings: list[float] = []
        with PrismSoakChecks(replace(env, results_url=base), settings) as checks:
            previous: dict[str, Any] = {}
            for number in range(1, args.looks + 2):
                end = WINDOW_START + timedelta(minutes=5 * number)
                started = time.perf_counter()
                measured = checks.measure(db, _look(number, end, previous, plan))
                timings.append(time.perf_counter() - started)
                previous = {c.name: dict(c.evidence) for c in measured}
                verdicts = ", ".join(f"{c.name} {c.verdict}" for c in measured)
                print(f"look {number} (cutoff +{5 * number} min): {timings[-1] * 1000:.0f} ms; {verdicts}")
            plans = _explain(db, WINDOW_START + timedelta(minutes=5 * (args.looks + 1)))
        stop_traffic.set()
        thread.join(120)
    db.dispose()
    server_db.dispose()
    sessions = sum(len(r.sessions) for r in reports)
    steady = statistics.median(timings[1:]) if len(timings) > 1 else timings[0]
    print(f"live traffic during the looks: {sessions} simulated sessions ({args.traffic}, simulated clock)")
    print(f"first look (with the 30-day baseline): {timings[0] * 1000:.0f} ms")
    print(f"later looks: median {steady * 1000:.0f} ms over {len(timings) - 1} (goal <= 1000 ms)")
    flagged = 0
    for name, scans, _ in plans:
        large_seq = [s for s in scans if "Seq Scan" in s and any(f" on {t}" in s for t in LARGE)]
        flagged += bool(large_seq) and name != BASELINE
        mark = "   <-- SEQ SCAN of a large table" if large_seq and name != BASELINE else ""
        print(f"  {name}: {'; '.join(scans) or 'no scan nodes'}{mark}")
    if args.plans:
        args.plans.write_text("\n\n".join(f"-- {n}\n{text}" for n, _, text in plans) + "\n", encoding="utf-8")
        print(f"plans written to {args.plans}")
    return 0 if steady <= 1.0 and not flagged else 1


if __name__ == "__main__":
    raise SystemExit(main())
