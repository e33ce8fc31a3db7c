"""Benchmark: seed N synthetic PRISM sessions (248 answers each) into a fresh Postgres database via COPY.

Each run creates a uniquely named database on the server, initialises the schema and reference data (not timed),
times ``seed_scenario(db, "synthetic", ...)`` alone, checks the row counts against the report, and drops the
database. Prints the command line, every run, and the median.

    .venv/bin/python bench/bench_seed.py --sessions 100000 --runs 3

The server comes from ``--server`` or ``GATEFILL_TEST_DATABASE_URL`` (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from pgserver import libpq as _libpq
from pgserver import with_database as _with_database
from psycopg import sql

from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.sandbox.seed import seed_scenario
from gatefill.prism.schema import init_schema, load_reference_data

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def _backend_cpu(url: str) -> float | None:
    """CPU seconds used so far by the server processes serving this database (None if the server is not local).

    The machine is shared, so wall time depends on what else runs; CPU seconds (ours plus these backends') do not.
    """
    with psycopg.connect(_libpq(url)) as conn:
        pids = [
            r[0]
            for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _run(
    server: str, sessions: int, fraction: float, seed: int, fk_checks: bool
) -> tuple[float, int, int, dict[str, float]]:
    """One timed seeding into a fresh database; returns (seconds, answer rows, all rows, seconds per step).

    The steps also hold ``cpu python`` and ``cpu postgres`` (CPU seconds of this process and of the backends).
    """
    name = f"gf_bench_seed_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(server), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = _with_database(server, name).replace("postgresql://", "postgresql+psycopg://", 1)
        with Database(Environment(name="bench", kind="staging", database_url=url)) as db:
            init_schema(db)
            load_reference_data(db)
            cpu_before = time.process_time()
            report = seed_scenario(
                db, "synthetic", sessions=sessions, missing_fraction=fraction, seed=seed, fk_checks=fk_checks
            )
            steps = dict(report.timings)
            steps["cpu python"] = time.process_time() - cpu_before
            backends = _backend_cpu(url)  # the pool keeps the seeding connections open until dispose
            if backends is not None:
                steps["cpu postgres"] = backends
        with psycopg.connect(_libpq(url)) as conn:
            answers = conn.execute("SELECT count(*) FROM assessment_responses").fetchone()
            sessions_n = conn.execute("SELECT count(*) FROM assessment_sessions").fetchone()
        if answers is None or sessions_n is None:
            raise SystemExit("count query returned nothing")
        if answers[0] != report.counts["assessment_responses"] or sessions_n[0] != sessions:
            raise SystemExit(f"row counts differ from the report: {answers[0]} answers, {sessions_n[0]} sessions")
        return report.elapsed_s, answers[0], sum(report.counts.values()), steps
    finally:
        with psycopg.connect(_libpq(server), autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--missing-fraction", type=float, default=0.1)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fk-checks", action="store_true", help="keep the per-row foreign-key triggers on")
    parser.add_argument("--server", default=os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER))
    args = parser.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"server: {args.server}  sessions: {args.sessions:,}  missing fraction: {args.missing_fraction}")
    times = []
    for i in range(args.runs):
        seconds, answers, rows, steps = _run(
            args.server, args.sessions, args.missing_fraction, args.seed, args.fk_checks
        )
        times.append(seconds)
        print(
            f"run {i + 1}: {seconds:.1f} s, {answers:,} answers ({answers / seconds:,.0f}/s), "
            f"{rows:,} rows in all ({rows / seconds:,.0f}/s)",
            flush=True,
        )
        print("  steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()), flush=True)
        if "cpu postgres" in steps:
            cpu = steps["cpu python"] + steps["cpu postgres"]
            print(f"  cpu: {cpu:.1f} s in all, so at least {cpu / 2:.1f} s of wall time on two idle cores", flush=True)
    median = statistics.median(times)
    print(f"median of {len(times)}: {median:.1f} s  (goal for 100,000 sessions: <= 120 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
