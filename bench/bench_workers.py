"""Benchmark: ``gatefill apply --workers N`` (procrastinate) with one worker against two, and what the queue costs.

    .venv/bin/python bench/bench_workers.py --sessions 20000 --runs 3 --batch-size 500

For every run it creates a fresh database on the server of ``--server`` / ``GATEFILL_TEST_DATABASE_URL``, seeds ``N``
synthetic PRISM sessions that all need work (as ``bench_apply.py`` does), runs ``VACUUM ANALYZE`` and copies the
database (``CREATE DATABASE ... TEMPLATE``), so that both applies start from the same bytes; each copy is planned alike
(``rate=unlimited``, ``--batch-size``; a plan names its database). Then, after a ``CHECKPOINT``, it runs
``gatefill apply RUN --workers 1`` on one copy and ``--workers 2`` on the other, each as a user would (a child
process reading a gatefill.toml), and measures:

- the rate over the batches: sessions / (last batch's commit - first batch's start), from the ledger, which leaves
  out the seconds the worker processes take to start (the same for both);
- the rate over the whole command (start-up included);
- the machine's CPU milliseconds per session over the command (/proc/stat, all cores: coordinator, workers and
  Postgres backends; ``bench_apply.machine_busy_seconds``).

It checks that every candidate was written, once. The summary prints the medians, the speed-up (two workers over
one, batch rates) against the goal (1.3x), the load average and the exact command.

``--queue-jobs K`` (default 300) also measures procrastinate's own cost per batch on an empty database: the time to
queue a job (``defer``), to fetch it as a worker does (``fetch_job``, the ``SELECT ... FOR UPDATE SKIP LOCKED`` that
marks it ``doing``), and to record it done (``finish_job``), each one at a time, median over K jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from bench_apply import _checkpoint, _scratch_database, machine_busy_seconds
from pgserver import admin as _admin
from pgserver import sa_url as _sa_url
from pgserver import with_database as _with_database
from procrastinate import jobs as procrastinate_jobs
from psycopg import sql

from gatefill.config import Environment
from gatefill.db import Database
from gatefill.plan import PlanParams, build_plan
from gatefill.prism.job import PrismJob
from gatefill.prism.sandbox.seed import WINDOW_START, seed_scenario
from gatefill.prism.schema import init_schema, load_reference_data
from gatefill.queue import ensure_queue_schema, open_queue

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
GOAL_SPEEDUP = 1.3


def _apply(url: str, run_id: str, workers: int, tmp: Path) -> dict[str, float]:
    """``gatefill apply RUN --workers N`` in a child process; its rates and the machine's CPU per session."""
    config = tmp / f"gatefill-{workers}.toml"
    config.write_text(f'artifacts_dir = "artifacts"\n[env.bench]\ndatabase_url = "{_sa_url(url)}"\n', encoding="utf-8")
    argv = [sys.executable, "-m", "gatefill", "--config", str(config), "apply", run_id]
    argv += ["--workers", str(workers), "--approve-as", "bench"]
    busy, began = machine_busy_seconds(), time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp, check=False)
    seconds, cpu = time.perf_counter() - began, machine_busy_seconds() - busy
    if done.returncode != 0:
        raise SystemExit(f"apply --workers {workers} failed ({done.returncode}): {done.stderr.strip()}")
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT min(started_at), max(finished_at), sum(sessions), "
            "(SELECT count(*) FROM gatefill_session_results WHERE run_id = %s AND result = 'written') "
            "FROM gatefill_batches WHERE run_id = %s",
            (run_id, run_id),
        ).fetchone()
    assert row is not None
    first, last, sessions, results = row
    if sessions != results:
        raise SystemExit(f"--workers {workers}: {sessions} sessions in batches, {results} written")
    span = (last - first).total_seconds()
    return {
        "sessions": float(sessions),
        "batch_rate": sessions / span,
        "command_rate": sessions / seconds,
        "command_seconds": seconds,
        "cpu_ms_per_session": cpu / sessions * 1000.0,
    }


def _seed_and_plan(url: str, n: int, batch_size: int, tmp: Path) -> tuple[str, int]:
    """The planned run of a database (seeded already): its id and its candidates."""
    env = Environment("bench", "staging", _sa_url(url))
    with Database(env, pool_size=2) as db:
        if n:
            init_schema(db)
            load_reference_data(db)
            seed_scenario(db, "synthetic", sessions=n, missing_fraction=1.0)
            return "", 0
        params = PlanParams(since=WINDOW_START, rate="unlimited", batch_size=batch_size)
        plan = build_plan(db, env, PrismJob(), params, now=datetime.now(UTC), artifacts_dir=tmp).plan
        ensure_queue_schema(db)
        return plan.run_id, len(plan.runnable)


def one_run(server: str, n: int, batch_size: int) -> dict[str, Any]:
    with _scratch_database(server) as url, tempfile.TemporaryDirectory(prefix="gf_bench_workers_") as tmp:
        _seed_and_plan(url, n, batch_size, Path(tmp))
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        copy = f"gf_bench_workers_{uuid.uuid4().hex[:10]}"
        source = url.rsplit("/", 1)[1].split("?")[0]
        _admin(server, sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(copy), sql.Identifier(source)))
        try:
            out: dict[str, Any] = {"sessions": n}
            for workers, where in ((1, url), (2, _with_database(server, copy))):
                run_id, out["candidates"] = _seed_and_plan(where, 0, batch_size, Path(tmp))  # the same plan in each
                _checkpoint(where)
                measured = _apply(where, run_id, workers, Path(tmp))
                out.update({f"{k}_{workers}": v for k, v in measured.items()})
            out["speedup"] = out["batch_rate_2"] / out["batch_rate_1"]
            out["load"] = os.getloadavg()[0]
        finally:
            _admin(server, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(copy)))
        print(
            f"  N={n:,}: 1 worker {out['batch_rate_1']:.0f}/s ({out['cpu_ms_per_session_1']:.2f} ms CPU/session), "
            f"2 workers {out['batch_rate_2']:.0f}/s ({out['cpu_ms_per_session_2']:.2f} ms); speed-up "
            f"{out['speedup']:.2f}x; whole commands {out['command_seconds_1']:.1f} s and "
            f"{out['command_seconds_2']:.1f} s; "
            f"load {out['load']:.1f}",
            flush=True,
        )
        return out


async def _fetch_and_finish(app: Any, k: int) -> tuple[list[float], list[float]]:
    """Fetches and finishes ``k`` jobs one at a time, as a worker does; the seconds each call took."""
    fetch, finish = [], []
    async with app.open_async():
        worker_id = await app.job_manager.register_worker()
        for _ in range(k):
            began = time.perf_counter()
            job = await app.job_manager.fetch_job(queues=None, worker_id=worker_id)
            fetch.append(time.perf_counter() - began)
            began = time.perf_counter()
            await app.job_manager.finish_job(job, procrastinate_jobs.Status.SUCCEEDED, delete_job=True)
            finish.append(time.perf_counter() - began)
        await app.job_manager.unregister_worker(worker_id)
    return fetch, finish


def queue_cost(server: str, k: int) -> dict[str, float]:
    """Median milliseconds per job of procrastinate's defer, fetch and finish, on an empty database."""
    with _scratch_database(server) as url:
        env = Environment("bench", "staging", _sa_url(url))
        with Database(env, pool_size=1) as db:
            ensure_queue_schema(db)
        app = open_queue(env)
        defer = []
        with app.open():
            for i in range(k):
                began = time.perf_counter()
                app.configure_task("gatefill.bench.noop", queue="bench").defer(i=i, candidates=[{"key": str(i)}] * 50)
                defer.append(time.perf_counter() - began)
        fetch, finish = asyncio.run(_fetch_and_finish(open_queue(env), k))
    ms = {"defer": defer, "fetch": fetch, "finish": finish}
    return {name: statistics.median(values) * 1000.0 for name, values in ms.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported (default 3)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--queue-jobs", type=int, default=300, help="jobs timed for the queue's own cost (0: none)")
    parser.add_argument("--server", default=os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER))
    args = parser.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    if args.queue_jobs:
        cost = queue_cost(args.server, args.queue_jobs)
        print(
            f"procrastinate per job (median of {args.queue_jobs}, one at a time): defer {cost['defer']:.2f} ms, "
            f"fetch {cost['fetch']:.2f} ms, finish {cost['finish']:.2f} ms",
            flush=True,
        )
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}: {args.sessions:,} sessions, batches of {args.batch_size}", flush=True)
        runs.append(one_run(args.server, args.sessions, args.batch_size))
    m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nmedians of {args.runs} ({os.cpu_count()} cores, load now {os.getloadavg()[0]:.1f}):")
    print(f"  1 worker : {m['batch_rate_1']:.0f} sessions/s, machine CPU {m['cpu_ms_per_session_1']:.2f} ms/session")
    print(f"  2 workers: {m['batch_rate_2']:.0f} sessions/s, machine CPU {m['cpu_ms_per_session_2']:.2f} ms/session")
    ok = m["speedup"] >= GOAL_SPEEDUP
    print(f"  speed-up {m['speedup']:.2f}x (goal >= {GOAL_SPEEDUP}x): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
