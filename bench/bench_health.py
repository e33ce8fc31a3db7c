"""Benchmark: ``gatefill health`` on a million PRISM sessions on Postgres (goal: <= 30 s), per check, with query plans.

    .venv/bin/python bench/bench_health.py --sessions 1000000 --answered 100000 --runs 3

It creates a uniquely named database on the server of ``--server`` / ``GATEFILL_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``) and builds the million sessions, all in the health window, the way
``bench/bench_discovery.py`` does:

* ``--answered`` sessions through ``seed_scenario(db, "synthetic", missing_fraction=--missing)`` (COPY): completed
  sessions with all 248 answers and six FC answers each, ``--missing`` of them lacking fc_scores and/or a profile
  (the ones health finds and puts in its mini plan);
* the rest as complete sessions written in SQL from ``generate_series`` (completed, v1.2 ``functions`` fc_scores row,
  v1.2.1 profile, share token) but **without answer rows**. 248 answers for each of a million sessions is 248M rows
  (~70 GB with indexes, see bench_discovery), which this machine cannot hold; so the answer-sufficiency check reports
  those sessions as below 148 answers. Its cost is one index probe per session on each answers table plus one index
  entry read per answer, so the answered sessions are where its time goes; the script prints the answer rows read
  and the rate beside the timing, and ``--answered`` scales that part.

Then it runs ``check_health`` (the checks, discovery and mini-plan composition) and ``write_health_check`` (the report
files) ``--runs`` times over the same database and prints the per-check timings, the total and their medians, then
``EXPLAIN (ANALYZE, BUFFERS)`` of every check query and lists every scan node on the large tables. The database is
dropped at the end unless ``--keep`` (``--reuse NAME`` times a kept one again). ``--heal`` first marks the sessions
needing backfill abandoned, so that health finds nothing to backfill and skips discovery, as on a production that
needs no mini plan.

The window here is the whole table, so the checks read whole tables (parallel sequential scans and hash joins, each
table once per check); on a narrower window the filters on ``assessment_sessions`` use its (status, created_at) index.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql

from gatefill.config import Environment
from gatefill.db import Database
from gatefill.health import check_health
from gatefill.prism.job import PrismJob
from gatefill.prism.sandbox.seed import WINDOW_START, seed_scenario
from gatefill.prism.schema import init_schema, load_reference_data
from gatefill.reports.health import write_health_check

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_discovery import _pad  # the same complete sessions, written in SQL
from pgserver import admin as _admin
from pgserver import libpq as _libpq
from pgserver import with_database as _with_database

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
GOAL_SECONDS = 30.0
NOW = datetime(2025, 9, 17, 18, 0, tzinfo=UTC)
LARGE_TABLES = ("assessment_sessions", "assessment_responses", "fc_responses", "fc_scores", "profiles")


def _build(db: Database, url: str, args: argparse.Namespace) -> None:
    init_schema(db)
    load_reference_data(db)
    t0 = time.perf_counter()
    report = seed_scenario(db, "synthetic", sessions=args.answered, missing_fraction=args.missing)
    seeded = report.counts["assessment_sessions"]
    print(f"seed_scenario: {seeded:,} answered sessions in {time.perf_counter() - t0:.1f} s")
    if args.sessions > args.answered:
        t0 = time.perf_counter()
        _pad(url, args.sessions - args.answered)
        padded = args.sessions - args.answered
        print(f"complete sessions written in SQL: {padded:,} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    print(f"VACUUM ANALYZE in {time.perf_counter() - t0:.1f} s", flush=True)


def _scan_nodes(lines: Sequence[str]) -> list[str]:
    found = []
    for line in lines:
        m = re.search(
            r"((?:Parallel )?(?:Seq|Index|Index Only|Bitmap Heap|Bitmap Index) Scan)(?: using \S+)? on (\w+)", line
        )
        if m and m.group(2) in LARGE_TABLES:
            found.append(f"{m.group(1)} on {m.group(2)}")
    return found


def _explain(url: str, checks: Sequence[tuple[str, str]]) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of every check query that is plain SQL; returns the scan nodes on large tables."""
    scans: list[str] = []
    params = {"since": WINDOW_START, "now": NOW, "fcv": "v1.2", "kind": "functions", "ev": "v1.2.1"}
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        for name, query in checks:
            for statement in query.split("; "):
                if not statement.startswith(("SELECT", "WITH")) or " | " in statement:
                    continue  # a description of several statements, not one to run
                text = re.sub(r":(\w+)", r"%(\1)s", statement)
                lines = [r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + text, params)]
                print(f"\n--- {name}: {statement}")
                for line in lines:
                    print("  " + line)
                scans += [f"{s} ({name})" for s in _scan_nodes(lines)]
    return scans


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=1_000_000, help="sessions in all (default 1,000,000)")
    parser.add_argument("--answered", type=int, default=100_000, help="of which have all their answers (100,000)")
    parser.add_argument("--missing", type=float, default=0.01, help="share of answered sessions needing backfill")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--heal",
        action="store_true",
        help="first mark the sessions needing backfill abandoned (changes the database): health then skips discovery",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database (its name is printed)")
    parser.add_argument("--reuse", metavar="DATABASE", help="time an existing database built by --keep (not dropped)")
    parser.add_argument("--server", default=os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER))
    args = parser.parse_args(argv)
    if not 0 < args.answered <= args.sessions:
        parser.error("--answered must be within 1..--sessions")
    if not 0 <= args.missing <= 1:
        parser.error("--missing must be within 0..1")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    command = shlex.join([sys.executable, *sys.argv])
    print("command:", command)
    name = args.reuse or f"gf_bench_health_{uuid.uuid4().hex[:10]}"
    if args.reuse:
        args.keep = True
    else:
        _admin(args.server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(args.server, name)
    env = Environment(
        name="bench", kind="production", database_url=url.replace("postgresql://", "postgresql+psycopg://")
    )
    try:
        with Database(env, pool_size=2) as db:
            if not args.reuse:
                _build(db, url, args)
            if args.heal:
                with psycopg.connect(_libpq(url), autocommit=True) as conn:
                    healed = conn.execute(
                        "UPDATE assessment_sessions s SET status = 'abandoned' WHERE status = 'completed' AND "
                        "(NOT EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = s.id) OR NOT EXISTS (SELECT 1 "
                        "FROM fc_scores f WHERE f.session_id = s.id AND f.version = 'v1.2' "
                        "AND f.fc_kind = 'functions'))"
                    ).rowcount
                    conn.execute("VACUUM ANALYZE assessment_sessions")
                print(f"--heal: {healed:,} sessions needing backfill marked abandoned")
            with psycopg.connect(_libpq(url), autocommit=True) as conn:
                sizes = conn.execute(
                    "SELECT relname, n_live_tup, pg_size_pretty(pg_total_relation_size(relid)) "
                    "FROM pg_stat_user_tables WHERE relname = ANY(%s) ORDER BY relname",
                    (list(LARGE_TABLES),),
                ).fetchall()
            print("table sizes:")
            for rel, rows, size in sizes:
                print(f"  {rel:22} {rows:>12,} rows {size:>10}")
            answers = next((rows for rel, rows, _ in sizes if rel == "assessment_responses"), 0)
            totals: list[float] = []
            per_check: dict[str, list[float]] = {}
            with tempfile.TemporaryDirectory(prefix="gf_bench_health_") as tmp:
                for i in range(args.runs):
                    t0 = time.perf_counter()
                    result = check_health(db, env, since=WINDOW_START, now=NOW, job=PrismJob())
                    result = write_health_check(result, Path(tmp))
                    totals.append(time.perf_counter() - t0)
                    for check, seconds in result.seconds.items():
                        per_check.setdefault(check, []).append(seconds)
                    print(
                        f"run {i + 1}: {totals[-1]:.1f} s, {'healthy' if result.healthy else 'not healthy'}, "
                        f"mini plan {len(result.plan.runnable) if result.plan else 0:,} candidates; "
                        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
                        flush=True,
                    )
            print("\nchecks of the last run:")
            for c in result.checks:
                print(f"  {c.name:22} {c.verdict:12} {c.summary}")
            print("\nper check, median of runs (s):")
            for check, values in per_check.items():
                print(f"  {check:22} {statistics.median(values):8.2f}   runs: {', '.join(f'{v:.2f}' for v in values)}")
            suff = statistics.median(per_check.get("answer_sufficiency", [0.0]))
            if suff:
                rate = answers / suff
                print(f"answer_sufficiency counted {answers:,} answer rows: {rate:,.0f} per second")
            scans = _explain(url, [(c.name, c.query) for c in result.checks if c.query])
        median = statistics.median(totals)
        print(
            f"\nhealth on {args.sessions:,} sessions, median of {args.runs}: {median:.1f} s "
            f"(goal <= {GOAL_SECONDS:g} s: {'met' if median <= GOAL_SECONDS else 'NOT met'}); "
            f"load average now {os.getloadavg()[0]:.2f}"
        )
        print("scans on the large tables:", ", ".join(sorted(set(scans))))
        seq = [s for s in scans if "Seq Scan" in s]
        print("sequential scans on large tables:", ", ".join(sorted(set(seq))) if seq else "none")
        print(f"cpus: {os.cpu_count()}; command: {command}")
    finally:
        if args.keep:
            print(f"kept database {name}")
        else:
            _admin(args.server, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
