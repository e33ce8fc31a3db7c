"""Benchmark: an adaptive apply beside live traffic, and a Stop indicator flipped mid-run.

    .venv/bin/python bench/bench_live_apply.py --sessions 3000 --traffic-rate 10 --baseline-seconds 30

On a scratch database of the Postgres server of ``GATEFILL_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``) it seeds ``--sessions`` synthetic sessions that need the backfill,
writes fresh in-progress sessions for the live traffic (248 answers and 6 FC choices each, as the simulator's
respondents), and starts ``gatefill serve functions`` in a child process. Then:

1. **Live traffic.** Simulated respondents finalize their sessions at a fixed rate (``--traffic-rate`` per second,
   open loop: each call is sent on its schedule, whether or not earlier ones answered) through the functions
   server. First ``--baseline-seconds`` with no apply running: the finalize p95 (client-measured) is the baseline.
   Then, with the same traffic going on, an adaptive apply of the plan runs in a child process with no fixed rate
   (``--rate unlimited``, health indicators on, the environment's ``metrics_url`` pointing at the server's
   ``/metrics``). Its app indicator holds at the first histogram edge above the baseline's p95 and stops at 3x that,
   over windows of 3 s of traffic, with a ``--cool-down`` of 5 s (the thresholds are printed). Goal: finalize p95
   while the apply runs ≤ 1.2x the baseline, and the apply finishes.
2. **Stop.** A second plan (``--stop-sessions`` fresh candidates) is applied with ``--throttle-query "SELECT v FROM
   bench_flag"``. Once ``--flip-after`` batches have committed the flag turns true; the bench counts the batches
   committed after the flip (goal: at most the one in flight), checks that the hold was recorded, turns the flag
   back, and lets the apply finish (``--cool-down`` 2 s).

The scratch database is dropped at the end. Load averages are printed at the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from bench_finalize import _free_port, _serve, _wait_ready, settle, write_sessions
from pgserver import admin, sa_url, with_database
from psycopg import sql

from gatefill.config import Environment, ThrottleSettings
from gatefill.db import Database
from gatefill.plan import PlanParams, build_plan
from gatefill.prism.job import PrismJob
from gatefill.prism.platform.metrics import BUCKETS
from gatefill.prism.sandbox.seed import WINDOW_START, seed_scenario
from gatefill.prism.schema import init_schema, load_reference_data

GOAL_RATIO = 1.2
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def _server() -> str:
    return os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER)


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"gf_bench_live_{uuid.uuid4().hex[:10]}"
    admin(_server(), sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(_server(), name)
    finally:
        admin(_server(), sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def functions_server(url: str) -> Iterator[str]:
    """``gatefill serve functions`` in a child process; yields its base URL."""
    key = uuid.uuid4().hex
    port = _free_port()
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(sa_url(url), port, key, 1, "none"))
    process.start()
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(f"{base}/functions/v1", process)
        yield base
    finally:
        process.terminate()
        process.join(10)


class Traffic:
    """Open-loop finalize calls at a fixed rate in a thread of their own; latencies kept with their send time."""

    def __init__(self, base: str, ids: Sequence[str], rate: float) -> None:
        self.url = f"{base}/functions/v1/finalizeAssessment"
        self.ids = list(ids)
        self.rate = rate
        self.samples: list[tuple[float, float, int]] = []  # (sent at, ms, status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as http:
            tasks = []
            start = time.monotonic()
            for i, sid in enumerate(self.ids):
                due = start + i / self.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if self._stop.is_set():
                    break
                tasks.append(asyncio.create_task(self._call(http, sid)))
            await asyncio.gather(*tasks)

    async def _call(self, http: httpx.AsyncClient, sid: str) -> None:
        sent = time.monotonic()
        response = await http.post(self.url, json={"session_id": sid})
        self.samples.append((sent, (time.monotonic() - sent) * 1000.0, response.status_code))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def between(self, a: float, b: float) -> list[float]:
        return [ms for sent, ms, _ in self.samples if a <= sent < b]


def p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(0.95 * len(ordered) + 0.5) - 1)] if ordered else float("nan")


def run_apply(url: str, plan_path: Path, artifacts: Path, options: dict[str, Any], throttle: dict[str, Any]) -> Any:
    """``gatefill apply PLAN.json`` in library form, in a child process (Popen); its result is its last line."""
    args = json.dumps({"url": url, "plan": str(plan_path), "artifacts": str(artifacts), "options": options,
                       "throttle": throttle})  # fmt: skip
    return subprocess.Popen([sys.executable, __file__, "--child-apply", args], stdout=subprocess.PIPE, text=True)


def child_apply(spec: dict[str, Any]) -> None:
    from gatefill.apply import ApplyOptions, apply_plan
    from gatefill.clock import RealClock
    from gatefill.plan import load_plan

    plan = load_plan(Path(spec["plan"]))
    options = dict(spec["options"])
    metrics_url = options.pop("metrics_url", None)
    throttle = ThrottleSettings(**spec["throttle"])
    env = Environment(plan.environment.name, "staging", sa_url(spec["url"]), metrics_url=metrics_url, throttle=throttle)
    with Database(env, pool_size=2) as db:
        result = apply_plan(db, env, PrismJob(), plan, options=ApplyOptions(approve_as="bench", **options),
                            clock=RealClock(), artifacts_dir=Path(spec["artifacts"]))  # fmt: skip
    out = {"sessions": sum(result.counts.values()), "seconds": result.elapsed_seconds, "status": result.status.value,
           "holds": result.holds, "held_seconds": result.held_seconds, "run_id": result.run_id}  # fmt: skip
    print("RESULT " + json.dumps(out), flush=True)


def finish(proc: Any) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=3600)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"apply child failed ({proc.returncode})")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def prepare(url: str, n: int, tmp: Path) -> tuple[Path, str]:
    """The PRISM schema with ``n`` synthetic sessions needing the backfill, and their plan (file, run id)."""
    env = Environment("bench", "staging", sa_url(url))
    with Database(env, pool_size=2) as db:
        init_schema(db)
        load_reference_data(db)
        seed_scenario(db, "synthetic", sessions=n, missing_fraction=1.0)
        params = PlanParams(since=WINDOW_START, rate="unlimited", batch_size=200)
        built = build_plan(db, env, PrismJob(), params, now=datetime.now(UTC), artifacts_dir=tmp)
    return built.json_path, built.plan.run_id


def hold_threshold_ms(baseline_p95: float) -> float:
    """The first histogram edge strictly above the baseline's p95: the app indicator reads p95 as a bucket's edge."""
    return next(b * 1000.0 for b in BUCKETS if b * 1000.0 > baseline_p95)


def live_part(url: str, base: str, plan_path: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with Database(Environment("bench", "staging", sa_url(url)), pool_size=2) as db:
        ids = write_sessions(db, int(args.traffic_rate * (args.baseline_seconds + args.max_apply_seconds)), seed=7)
    settle(url)
    traffic = Traffic(base, ids, args.traffic_rate)
    traffic.start()
    t0 = time.monotonic()
    time.sleep(args.baseline_seconds)
    t1 = time.monotonic()
    baseline = p95(traffic.between(t0 + 2.0, t1))  # the first calls warm the server up
    hold = hold_threshold_ms(baseline)
    # Windows of 3 s of traffic (fewer calls make a noisy p95), Stop at 3x the Hold, a short cool-down.
    throttle = {"app_p95_hold_ms": hold, "app_p95_stop_ms": 3 * hold, "app_min_calls": int(2.5 * args.traffic_rate),
                "hold_floor": 1 / 64, "cool_down_seconds": args.cool_down}  # fmt: skip
    # A look every 3 s: each one finds a new window of the app's calls judged.
    options = {"rate": "unlimited", "metrics_url": f"{base}/metrics", "throttle_interval": 3.0}
    proc = run_apply(url, plan_path, tmp / "live", options, throttle)
    applied = finish(proc)
    t2 = time.monotonic()
    traffic.stop()
    during = traffic.between(t1, t2)
    failed = sum(1 for _, _, status in traffic.samples if status != 200)
    return {"baseline_p95_ms": baseline, "baseline_calls": len(traffic.between(t0 + 2.0, t1)),
            "during_p95_ms": p95(during), "during_calls": len(during), "ratio": p95(during) / baseline,
            "hold_ms": hold, "failed_calls": failed, "apply": applied,
            "decisions": decisions(url, applied["run_id"])}  # fmt: skip


def decisions(url: str, run_id: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT action, count(*) FROM gatefill_decisions WHERE run_id = %s GROUP BY action",
                            (run_id,)).fetchall()  # fmt: skip
    return {str(action): int(n) for action, n in rows}


def batches(url: str, run_id: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM gatefill_batches WHERE run_id = %s", (run_id,)).fetchone()
    return int(row[0]) if row else 0


def stop_part(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    plan_path, run_id = prepare(url, args.stop_sessions, tmp / "stop")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_flag (v boolean NOT NULL)")
        conn.execute("INSERT INTO bench_flag VALUES (false)")
    options = {"rate": "unlimited", "throttle_query": "SELECT v FROM bench_flag", "cool_down": 2.0,
               "batch_size": args.stop_batch_size, "throttle_interval": 0.2}  # fmt: skip
    proc = run_apply(url, plan_path, tmp / "stopped", options, {})
    while batches(url, run_id) < args.flip_after:
        if proc.poll() is not None:
            raise SystemExit("the apply finished before the flip: use more --stop-sessions")
        time.sleep(0.01)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE bench_flag SET v = true")
    at_flip = batches(url, run_id)
    time.sleep(args.stop_watch_seconds)
    after = batches(url, run_id)
    with psycopg.connect(url) as conn:
        holds = conn.execute("SELECT batch_no FROM gatefill_holds WHERE run_id = %s", (run_id,)).fetchall()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE bench_flag SET v = false")
    applied = finish(proc)
    return {"at_flip": at_flip, "after_watch": after, "committed_after_flip": after - at_flip,
            "holds": [int(h[0]) for h in holds], "apply": applied}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=3000, help="candidates of the live part's apply")
    parser.add_argument("--traffic-rate", type=float, default=10.0, help="finalize calls per second")
    parser.add_argument("--baseline-seconds", type=float, default=30.0)
    parser.add_argument("--max-apply-seconds", type=float, default=240.0, help="traffic sessions written for this")
    parser.add_argument("--cool-down", type=float, default=5.0, help="the live part's cool-down after a Stop")
    parser.add_argument("--stop-sessions", type=int, default=2000)
    parser.add_argument("--stop-batch-size", type=int, default=20)
    parser.add_argument("--flip-after", type=int, default=5, help="batches committed before the flag turns true")
    parser.add_argument("--stop-watch-seconds", type=float, default=3.0)
    parser.add_argument("--child-apply", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_apply:
        child_apply(json.loads(args.child_apply))
        return 0
    print(f"$ {shlex.join(['.venv/bin/python', 'bench/bench_live_apply.py', *(argv or sys.argv[1:])])}")
    print(f"load average at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gf_bench_live_") as tmp_name:
        tmp = Path(tmp_name)
        with scratch_database() as url:
            plan_path, _ = prepare(url, args.sessions, tmp)
            with functions_server(url) as base:
                live = live_part(url, base, plan_path, args, tmp)
        with scratch_database() as url:
            stop = stop_part(url, args, tmp)
    report(live, stop)
    print(f"load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    ok = live["ratio"] <= GOAL_RATIO and live["apply"]["status"] == "succeeded" and stop["committed_after_flip"] <= 1
    ok = ok and stop["apply"]["status"] == "succeeded" and bool(stop["holds"])
    print("goals: " + ("MET" if ok else "NOT MET"))
    return 0 if ok else 1


def report(live: dict[str, Any], stop: dict[str, Any]) -> None:
    a = live["apply"]
    print(f"live: finalize p95 {live['baseline_p95_ms']:.1f} ms with no apply ({live['baseline_calls']} calls), "
          f"{live['during_p95_ms']:.1f} ms while the apply ran ({live['during_calls']} calls): "
          f"{live['ratio']:.2f}x (goal ≤ {GOAL_RATIO}x); {live['failed_calls']} calls not 200")  # fmt: skip
    print(f"      app indicator: hold ≥ {live['hold_ms']:g} ms; apply {a['status']}: {a['sessions']} sessions in "
          f"{a['seconds']:.1f} s ({a['sessions'] / max(a['seconds'], 1e-9):.0f}/s), stops {a['holds']} "
          f"({a['held_seconds']:.1f} s); decisions {live['decisions']}")  # fmt: skip
    s = stop["apply"]
    print(f"stop: {stop['at_flip']} batches committed when the flag turned true, {stop['after_watch']} after watching; "
          f"{stop['committed_after_flip']} committed after the flip (goal ≤ 1, the one in flight); hold before "
          f"batch(es) {stop['holds']}; apply {s['status']} ({s['sessions']} sessions, "
          f"held {s['held_seconds']:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
