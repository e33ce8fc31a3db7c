"""Benchmark: plan discovery on a million PRISM sessions on Postgres (goal: <= 30 s), with the query plans.

    .venv/bin/python bench/bench_discovery.py --sessions 1000000 --candidates 100000 --runs 3

It creates a uniquely named database on the server of ``--server`` / ``GATEFILL_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), and builds the million sessions in two parts:

* ``--candidates`` sessions through ``seed_scenario(db, "synthetic", missing_fraction=1.0)`` (COPY; 248 answers and
  six FC answers each, every one lacking its fc_scores row, half of them their profile as well): the candidates;
* the rest as complete sessions written in SQL (``INSERT ... SELECT`` from ``generate_series``): a completed session
  with its v1.2 ``functions`` fc_scores row and a v1.2.1 profile, but no answer rows. Discovery never reads the
  answers of a complete session, and 248 answers for each of them would take ~70 GB of disk (a full synthetic seeding
  of a million sessions, ``--full``, needs that much; see the closing note). Ids are random UUIDs, so complete
  sessions and candidates interleave in id order, as in a real table.

Then it times, ``--runs`` times each: ``PrismJob.discover`` alone (every finding, classified) and ``build_plan`` as
``gatefill plan`` runs it (prechecks, discovery, batching, the hashed plan, its files, the ledger run). Last, it prints
``EXPLAIN (ANALYZE, BUFFERS)`` of the statements discovery runs (the end of a keyset page; the first and a middle
page, each with its per-session answer and FC counts) and lists every scan node on the large tables, which must be
index scans. The database is dropped at the end unless ``--keep`` (``--reuse NAME`` times a kept one again).
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
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from pgserver import admin as _admin
from pgserver import libpq as _libpq
from pgserver import with_database as _with_database
from psycopg import sql

from gatefill.config import Environment
from gatefill.db import Database
from gatefill.plan import PlanParams, build_plan
from gatefill.prism import discovery
from gatefill.prism.job import PrismJob
from gatefill.prism.sandbox.seed import WINDOW_START, seed_scenario
from gatefill.prism.schema import init_schema, load_reference_data, profiles

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
GOAL_SECONDS = 30.0
NOW = datetime(2025, 9, 17, 18, 0, tzinfo=UTC)
LARGE_TABLES = ("assessment_sessions", "assessment_responses", "fc_responses", "fc_scores", "profiles")


def _pad(url: str, n: int) -> None:
    """``n`` complete sessions (completed, v1.2 fc_scores row, v1.2.1 profile), written set-based in one transaction.

    The profile's result columns are those of one seeded profile (discovery reads only ids and stamps); the FC
    scores are a fixed valid tally.
    """
    result_columns = [c.name for c in profiles.columns if c.name not in _PROFILE_OWN]
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in result_columns)
    tmpl = sql.SQL(", ").join(sql.SQL("tmpl.") + sql.Identifier(c) for c in result_columns)
    with psycopg.connect(_libpq(url)) as conn:
        conn.execute(
            "CREATE TEMP TABLE pad ON COMMIT DROP AS SELECT gen_random_uuid() AS id, "
            "%s::timestamptz + random() * (%s::timestamptz - %s::timestamptz) AS t FROM generate_series(1, %s)",
            (WINDOW_START, NOW, WINDOW_START, n),
        )
        conn.execute(
            "INSERT INTO assessment_sessions (id, session_type, started_at, created_at, updated_at, completed_at, "
            "finalized_at, total_questions, completed_questions, status, share_token, share_token_expires_at) "
            "SELECT id, 'prism', t, t, t + interval '21 min', t + interval '20 min', t + interval '21 min', 248, 248, "
            "'completed', gen_random_uuid()::text, t + interval '30 days' FROM pad"
        )
        conn.execute(
            "INSERT INTO fc_scores (session_id, version, fc_kind, scores_json, blocks_answered, created_at) "
            "SELECT id, 'v1.2', 'functions', "
            """'{"Te":90,"Ti":90,"Fe":50,"Fi":60,"Ne":80,"Ni":100,"Se":70,"Si":50}'::jsonb, 6, """
            "t + interval '21 min' FROM pad"
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO profiles (id, session_id, user_id, share_token, created_at, updated_at, submitted_at, "
                "recomputed_at, {cols}) SELECT gen_random_uuid(), pad.id, NULL, gen_random_uuid()::text, "
                "pad.t + interval '21 min', pad.t + interval '21 min', pad.t + interval '21 min', NULL, {tmpl} "
                "FROM pad, (SELECT * FROM profiles WHERE results_version = 'v1.2.1' LIMIT 1) tmpl"
            ).format(cols=cols, tmpl=tmpl)
        )


_PROFILE_OWN = frozenset(
    {"id", "session_id", "user_id", "share_token", "created_at", "updated_at", "submitted_at", "recomputed_at"}
)


def _explain(conn: sa.Connection, title: str, stmt: sa.Select[Any]) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of a Core statement, its expanding IN lists rendered as the driver sends them."""
    compiled = stmt.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    lines = [row[0] for row in conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + str(compiled), compiled.params)]
    print(f"\n--- {title}\n{_shorten(str(compiled))}")
    for line in lines:
        print("  " + _shorten(line))
    return lines


def _shorten(text: str) -> str:
    # A page's id list runs to thousands of characters; the plan shape is what matters here.
    return re.sub(r"((?:'[0-9a-f-]{36}'(?:::uuid)?|%\([a-z_0-9]+\)s), ){3,}", r"\1, ..., ", text)


def _scan_nodes(lines: Sequence[str]) -> list[str]:
    found = []
    for line in lines:
        m = re.search(
            r"((?:Parallel )?(?:Seq|Index|Index Only|Bitmap Heap|Bitmap Index) Scan)(?: using \S+)? on (\w+)", line
        )
        if m and m.group(2) in LARGE_TABLES:
            found.append(f"{m.group(1)} on {m.group(2)}")
    return found


def _build(db: Database, url: str, args: argparse.Namespace) -> None:
    """Schema, reference data, the candidates (seed_scenario) and the complete sessions (SQL), then VACUUM ANALYZE."""
    init_schema(db)
    load_reference_data(db)
    t0 = time.perf_counter()
    if args.full:
        report = seed_scenario(
            db, "synthetic", sessions=args.sessions, missing_fraction=args.candidates / args.sessions
        )
    else:
        report = seed_scenario(db, "synthetic", sessions=args.candidates, missing_fraction=1.0)
    print(f"seed_scenario: {report.counts['assessment_sessions']:,} sessions in {time.perf_counter() - t0:.1f} s")
    if not args.full and args.sessions > args.candidates:
        t0 = time.perf_counter()
        _pad(url, args.sessions - args.candidates)
        print(
            f"complete sessions written in SQL: {args.sessions - args.candidates:,} in {time.perf_counter() - t0:.1f} s"
        )
    t0 = time.perf_counter()
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    print(f"VACUUM ANALYZE in {time.perf_counter() - t0:.1f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=1_000_000, help="sessions in all (default 1,000,000)")
    parser.add_argument("--candidates", type=int, default=100_000, help="of which need work (default 100,000)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="seed every session with seed_scenario (~70 GB for 1M)")
    parser.add_argument("--keep", action="store_true", help="keep the database (its name is printed)")
    parser.add_argument("--reuse", metavar="DATABASE", help="time an existing database built by --keep (not dropped)")
    parser.add_argument("--server", default=os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER))
    args = parser.parse_args(argv)
    if not 0 < args.candidates <= args.sessions:
        parser.error("--candidates must be within 1..--sessions")
    command = shlex.join([sys.executable, *sys.argv])
    print("command:", command)
    name = args.reuse or f"gf_bench_disc_{uuid.uuid4().hex[:10]}"
    if args.reuse:
        args.keep = True
    else:
        _admin(args.server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(args.server, name)
    env = Environment(name="bench", kind="staging", database_url=url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with Database(env, pool_size=2) as db:
            if not args.reuse:
                _build(db, url, args)
            with psycopg.connect(_libpq(url), autocommit=True) as conn:
                sizes = conn.execute(
                    "SELECT relname, n_live_tup, pg_size_pretty(pg_total_relation_size(relid)) "
                    "FROM pg_stat_user_tables WHERE relname = ANY(%s) ORDER BY relname",
                    (list(LARGE_TABLES),),
                ).fetchall()
            for rel, rows, size in sizes:
                print(f"  {rel:22} {rows:>12,} rows {size:>10}")

            params = PlanParams(since=WINDOW_START, rate="unlimited", batch_size=1000)
            job = PrismJob()
            discover_s: list[float] = []
            plan_s: list[float] = []
            categories: Counter[str] = Counter()
            with tempfile.TemporaryDirectory(prefix="gf_bench_disc_") as tmp:
                for i in range(args.runs):
                    t0 = time.perf_counter()
                    with db.connect() as conn:
                        categories = Counter(
                            c.category for c in job.discover(conn, {"since": params.since, "profiles": "missing"})
                        )
                    discover_s.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    plan = build_plan(db, env, job, params, now=NOW, artifacts_dir=Path(tmp))
                    plan_s.append(time.perf_counter() - t0)
                    print(
                        f"run {i + 1}: discover {discover_s[-1]:.1f} s ({sum(categories.values()):,} findings), "
                        f"build_plan {plan_s[-1]:.1f} s ({len(plan.plan.runnable):,} candidates, "
                        f"{len(plan.plan.batches)} batches)",
                        flush=True,
                    )
            print("categories:", dict(sorted(categories.items())))
            scans = _explain_discovery(db)
        med_d, med_p = statistics.median(discover_s), statistics.median(plan_s)
        print(
            f"\nmedian of {args.runs}: discover {med_d:.1f} s, build_plan {med_p:.1f} s "
            f"(goal <= {GOAL_SECONDS:g} s: {'met' if med_p <= GOAL_SECONDS else 'NOT met'})"
        )
        print("scans on the large tables:", ", ".join(sorted(set(scans))))
        seq = [s for s in scans if s.startswith(("Seq", "Parallel Seq"))]
        print("sequential scans on large tables:", ", ".join(sorted(set(seq))) if seq else "none")
        print(f"cpus: {os.cpu_count()}; command: {command}")
    finally:
        if args.keep:
            print(f"kept database {name}")
        else:
            _admin(args.server, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return 0


def _explain_discovery(db: Database) -> list[str]:
    """Prints the plans of the statements ``discover`` runs; returns the scan nodes on the large tables."""
    scans: list[str] = []
    fc_version, engine_version = "v1.2", "v1.2.1"
    with db.connect() as conn:
        total = conn.execute(sa.text("SELECT count(*) FROM assessment_sessions")).scalar_one()
        middle = conn.execute(
            sa.text("SELECT id::text FROM assessment_sessions ORDER BY id OFFSET :n LIMIT 1"), {"n": total // 2}
        ).scalar_one()
        scans += _scan_nodes(
            _explain(conn, "end of the keyset page in the middle", discovery._page_end(middle, 20_000))
        )
        upto = conn.execute(discovery._page_end(middle, 20_000)).scalar_one()
        first_end = conn.execute(discovery._page_end(None, 20_000)).scalar_one()
        first = discovery._needs_work_page(WINDOW_START, None, first_end, fc_version, engine_version)
        scans += _scan_nodes(_explain(conn, "keyset page 1 (20,000 sessions)", first))
        page = discovery._needs_work_page(WINDOW_START, middle, upto, fc_version, engine_version)
        scans += _scan_nodes(_explain(conn, "keyset page in the middle (20,000 sessions)", page))
    return scans


if __name__ == "__main__":
    raise SystemExit(main())
