"""Benchmark: one soak measurement (every check of one look, probes included) on a Postgres database with 1M sessions
while simulated respondents write live traffic through a functions server.

Setup (not timed): a fresh database with the schema and reference data; N sessions spread over the 40 days before the
window (90 % completed; 97 % of those with a profile, all in the last two days; v1.2 fc_scores and six FC answers
each, two fn_logs events and one results access each), bulk-inserted with ``generate_series``; ANALYZE. Answers
(``assessment_responses``) are not generated: no soak query reads them. Then a functions server starts in a thread
and the traffic simulator writes sessions into the window from another thread, with a simulated clock starting at
the window's start; the looks begin once that clock has passed the last look's cutoff (so every look has live
traffic in its window), and the simulator keeps writing while they run.

Timed, while that traffic runs: the baseline, measured once as the soak does before its first look (both funnels
over the 30 days before the window), then ``--looks`` looks at cutoffs 5 minutes apart, each measuring all eight
checks against the stored baseline. Printed: the command, the load average, the table sizes, the baseline's time,
every look's time with their median and maximum (the goal: every look ≤ 1 s), and for every query of a look, plus
the baseline's, its EXPLAIN (ANALYZE, BUFFERS) plan's scan nodes and execution time, flagging a sequential scan of a
large table in a look's query (the baseline's, which reads most of the sessions table once per soak, is listed but not
flagged). ``--plans FILE`` writes the full plans. The exit status is 0 only if every look took at most a second and
no look's query scans a large table sequentially.

    .venv/bin/python bench/bench_soak.py --sessions 1000000 --looks 5

The machine's load average is printed at the start, before each run and at the end: figures taken on a loaded
machine are noisy. ``--runs N`` repeats the baseline and the looks N times on the same data, each run with its own
live traffic in a 6-hour window of its own after the previous one, and prints the median of each look over the runs;
``--keep`` keeps the loaded database and ``--reuse NAME`` measures it again without loading it (the load of 1M
sessions takes minutes).

``--without-finalized-index`` drops the schema's index on ``assessment_sessions.finalized_at`` (the write_failures
check filters on it) to show the plan without it. The server comes from ``--server``
or ``GATEFILL_TEST_DATABASE_URL`` (default postgresql://postgres@127.0.0.1:5432/postgres); the database is dropped
at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import math
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
from pgserver import libpq as _libpq
from pgserver import with_database as _with_database
from psycopg import sql

from gatefill.clock import SimulatedClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.job import Baseline, Look
from gatefill.prism.checks.soak import PrismSoakChecks, PrismSoakSettings, window_queries
from gatefill.prism.platform.server import create_app, serve_in_thread
from gatefill.prism.sandbox.simulator import SimulationReport, simulate
from gatefill.prism.schema import init_schema, load_reference_data
from gatefill.soak import DEFAULT_MIN_CONVERSION
from gatefill.stats import SequentialPlan

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
WINDOW_START = datetime(2025, 10, 1, tzinfo=UTC)
WINDOW = timedelta(hours=6)
TRAFFIC_WAIT_S = 180.0
LARGE = ("assessment_sessions", "profiles", "fc_scores", "fc_responses", "fn_logs", "results_token_access_logs")
KEY = "sk-bench-soak-" + uuid.uuid4().hex
# Counting three quarters of the sessions table is a sequential scan by design; it runs once per soak, before the
# first look, and its counts are stored.
BASELINE = "baseline funnels (once per soak, before the first look)"
BASELINE_DAYS = 30.0

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


def _load(url: str, sessions: int, finalized_index: bool) -> dict[str, float]:
    seconds: dict[str, float] = {}
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        if not finalized_index:
            conn.execute("DROP INDEX IF EXISTS ix_assessment_sessions_finalized")
        for table, statement in _LOAD:
            started = time.perf_counter()
            conn.execute(statement, {"t0": WINDOW_START, "n": sessions})
            seconds[table] = time.perf_counter() - started
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


def _look(
    number: int, window_start: datetime, previous: dict[str, Any], plan: SequentialPlan, baseline: Baseline
) -> Look:
    end = window_start + timedelta(minutes=5 * number)
    return Look(
        run_id="bench",
        number=number,
        max_looks=plan.max_looks,
        window_start=window_start,
        end=end,
        window_end=window_start + WINDOW,
        taken_at=end,
        plan=plan,
        margin=0.05,
        baseline_days=BASELINE_DAYS,
        baseline_rate=None,
        min_n=30,
        min_conversion=DEFAULT_MIN_CONVERSION,
        simulated_time=True,
        baseline=baseline,
        previous=previous,
    )


def _explain(db: Database, window_start: datetime, end: datetime) -> list[tuple[str, list[str], str]]:
    """Per query: its scan nodes and the full EXPLAIN (ANALYZE, BUFFERS) text; the baseline's funnel query last."""
    out = []
    queries = window_queries(window_start, end)
    baseline_start = window_start - timedelta(days=BASELINE_DAYS)
    baseline = [q for q in window_queries(baseline_start, window_start) if q[0] == "funnels"]
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
    parser.add_argument("--looks", type=int, default=5, help="timed looks per run (the first included)")
    parser.add_argument("--runs", type=int, default=1, help="repeat baseline + looks, each run in a window of its own")
    parser.add_argument("--traffic", default="1200/h", help="simulated arrival rate during the measurements")
    parser.add_argument("--server", default=os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER))
    parser.add_argument("--without-finalized-index", action="store_true")
    parser.add_argument("--plans", type=Path, help="write the full EXPLAIN plans (of the last run) here")
    parser.add_argument("--keep", action="store_true", help="keep the database (its name is printed)")
    parser.add_argument("--reuse", metavar="NAME", help="measure a database kept by an earlier --keep run (no load)")
    args = parser.parse_args()
    if args.looks < 1 or args.runs < 1:
        parser.error("--looks and --runs must be at least 1")
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("load average at start:", _load_average())
    name = args.reuse or f"gf_bench_soak_{uuid.uuid4().hex[:10]}"
    url = _with_database(args.server, name).replace("postgresql://", "postgresql+psycopg://", 1)
    env = Environment(name="bench", kind="staging", database_url=url, service_role_key_env="GATEFILL_BENCH_KEY")
    if args.reuse:
        print(f"database {name}: reused (loaded by an earlier run)")
        print("rows:", _sizes(url))
        return _measure(env, args)
    with psycopg.connect(_libpq(args.server), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
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
            print(f"kept database {name} (measure it again with --reuse {name})")


def _first_free_window(url: str) -> datetime:
    """The first window after every session already written: a reused database keeps earlier runs' traffic."""
    with psycopg.connect(_libpq(url)) as conn:
        row = conn.execute("SELECT max(started_at) FROM assessment_sessions").fetchone()
    latest: datetime | None = row[0] if row else None
    if latest is None or latest < WINDOW_START:
        return WINDOW_START
    return WINDOW_START + WINDOW * (math.floor((latest - WINDOW_START) / WINDOW) + 1)


def _measure(env: Environment, args: argparse.Namespace) -> int:
    server_db = Database(env, pool_size=4)
    db = Database(env, pool_size=4)
    app = create_app(env, server_db, allow_fault_injection=True, service_role_key=KEY, rate_limit_per_minute=100_000)
    first_window = _first_free_window(env.database_url)
    runs: list[tuple[float, list[float]]] = []
    sessions = 0
    plans: list[tuple[str, list[str], str]] = []
    with serve_in_thread(app) as base:
        for r in range(args.runs):
            window_start = first_window + WINDOW * r
            print(f"run {r + 1} of {args.runs}: window from {window_start.isoformat()}; load {_load_average()}")
            baseline_seconds, timings, written, plans = _one_run(env, db, base, window_start, args)
            runs.append((baseline_seconds, timings))
            sessions += written
    db.dispose()
    server_db.dispose()
    print(f"live traffic during the looks: {sessions} simulated sessions ({args.traffic}, simulated clock)")
    every = [t for _, timings in runs for t in timings]
    for r, (baseline_seconds, timings) in enumerate(runs, 1):
        print(
            f"run {r}: baseline {baseline_seconds * 1000:.0f} ms (once per soak, not part of any look); looks (ms): "
            + " ".join(f"{t * 1000:.0f}" for t in timings)
            + f"; median {statistics.median(timings) * 1000:.0f}, max {max(timings) * 1000:.0f}"
        )
    if args.runs > 1:
        per_look = [statistics.median(timings[i] for _, timings in runs) for i in range(args.looks)]
        print(
            f"median over {args.runs} runs: baseline {statistics.median(b for b, _ in runs) * 1000:.0f} ms; "
            "look 1..n (ms): " + " ".join(f"{t * 1000:.0f}" for t in per_look)
        )
    print(
        f"all looks: median {statistics.median(every) * 1000:.0f} ms, max {max(every) * 1000:.0f} ms over "
        f"{len(every)} (goal: every look <= 1000 ms)"
    )
    print("load average at the end:", _load_average())
    print("EXPLAIN (ANALYZE, BUFFERS) of each query at the last run's last cutoff: scan nodes, execution time")
    flagged = 0
    for name, scans, text in plans:
        large_seq = [s for s in scans if "Seq Scan" in s and any(f" on {t}" in s for t in LARGE)]
        flagged += bool(large_seq) and name != BASELINE
        mark = "   <-- SEQ SCAN of a large table" if large_seq and name != BASELINE else ""
        took = re.search(r"Execution Time: ([0-9.]+) ms", text)
        ms = f"{float(took.group(1)):.1f} ms" if took else "?"
        print(f"  {name} [{ms}]: {'; '.join(scans) or 'no scan nodes'}{mark}")
    if args.plans:
        args.plans.write_text("\n\n".join(f"-- {n}\n{text}" for n, _, text in plans) + "\n", encoding="utf-8")
        print(f"plans written to {args.plans}")
    return 0 if max(every) <= 1.0 and not flagged else 1


def _one_run(
    env: Environment, db: Database, base: str, window_start: datetime, args: argparse.Namespace
) -> tuple[float, list[float], int, list[tuple[str, list[str], str]]]:
    """Live traffic into a window, the baseline once, then the timed looks; EXPLAIN at the last cutoff."""
    reports: list[SimulationReport] = []
    stop_traffic = threading.Event()
    clock = SimulatedClock(window_start)

    def traffic() -> None:
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
    # Every look should see live traffic in its window: wait until the simulated respondents have passed the last
    # cutoff (how fast they get there depends on the machine's load), then keep them writing while the looks run.
    last_cutoff = window_start + timedelta(minutes=5 * args.looks)
    waited = time.perf_counter()
    while clock.now() < last_cutoff and time.perf_counter() - waited < TRAFFIC_WAIT_S:
        time.sleep(0.5)
    reached = "reached" if clock.now() >= last_cutoff else "NOT reached (timed out)"
    print(f"  traffic {reached} the last cutoff after {time.perf_counter() - waited:.1f} s; load {_load_average()}")
    plan = SequentialPlan(max_looks=72)
    settings = PrismSoakSettings(service_role_key=KEY, probe_budget_per_minute=10_000)
    timings: list[float] = []
    with PrismSoakChecks(replace(env, results_url=base), settings) as checks:
        # As run_soak does: the baseline once, before the first look (its counts are what the soak stores).
        started = time.perf_counter()
        baseline = checks.measure_baseline(db, window_start - timedelta(days=BASELINE_DAYS), window_start)
        baseline_seconds = time.perf_counter() - started
        print(f"  baseline (once, before the first look): {baseline_seconds * 1000:.0f} ms; {baseline.summary}")
        previous: dict[str, Any] = {}
        for number in range(1, args.looks + 1):
            started = time.perf_counter()
            measured = checks.measure(db, _look(number, window_start, previous, plan, baseline))
            timings.append(time.perf_counter() - started)
            previous = {c.name: dict(c.evidence) for c in measured}
            verdicts = ", ".join(f"{c.name} {c.verdict}" for c in measured)
            print(f"  look {number} (cutoff +{5 * number} min): {timings[-1] * 1000:.0f} ms; {verdicts}")
        plans = _explain(db, window_start, window_start + timedelta(minutes=5 * args.looks))
    stop_traffic.set()
    thread.join(120)
    return baseline_seconds, timings, sum(len(r.sessions) for r in reports), plans


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


if __name__ == "__main__":
    raise SystemExit(main())
