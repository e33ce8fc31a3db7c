"""Benchmark: finalizeAssessment over HTTP on Postgres with 1, 5 and 20 concurrent clients (goal: p95 <= 50 ms at 20).

    .venv/bin/python bench/bench_finalize.py --requests 150 --repeat 3

It creates a scratch database on the Postgres server of ``GATEFILL_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), initialises the PRISM schema and reference data, writes one fresh
session per call (248 answers and 6 FC choices, as the simulator's respondents write them), and starts the functions
server (``serve_functions``: uvicorn, one process) in a child process, so that the load generator does not share its
interpreter. Clients are closed-loop asyncio tasks over keep-alive connections: each sends the next finalize as soon as
the previous one answered, so the latency includes queueing at the server. Every call must answer 200 (a profile is
written per session), otherwise the run fails. Each level runs ``--repeat`` times; the table shows the median of the
repeats for every column.

``--baseline`` also measures the original pipeline's path, one HTTP call per function per session
(``score_fc_session`` then ``score_prism``, one client, sequential): the rate the apply phase must beat by 20x.
The scratch database is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shlex
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.schema import assessment_responses, assessment_sessions, fc_responses, init_schema
from gatefill.prism.schema import load_reference_data as load_reference_rows
from gatefill.prism.simulator import new_respondent

GOAL_P95_MS = 50.0
GOAL_CLIENTS = 20
KEY_ENV = "GATEFILL_BENCH_SERVICE_ROLE_KEY"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def _server_url() -> str:
    return os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER).replace(
        "postgresql+psycopg://", "postgresql://"
    )


def _database_url(name: str) -> str:
    base = _server_url().split("?", 1)[0].rsplit("/", 1)[0]
    return f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)


def _admin(statement: sql.Composable) -> None:
    with psycopg.connect(_server_url(), autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(database_url: str, port: int, key: str) -> None:
    """The child process: the functions server as ``gatefill serve functions`` runs it."""
    from gatefill.prism.functions_server import serve_functions

    os.environ[KEY_ENV] = key
    env = Environment("bench", "staging", database_url, service_role_key_env=KEY_ENV)
    serve_functions(env, host="127.0.0.1", port=port, log_level="warning")


def write_sessions(db: Database, n: int, seed: int) -> list[str]:
    """``n`` fresh in-progress sessions with all answers and FC choices, written in a few large transactions."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(hours=1)
    ids: list[str] = []
    for chunk in range(0, n, 50):
        sessions, answers, choices = [], [], []
        for _ in range(min(50, n - chunk)):
            r = new_respondent(rng, answer_ms=600_000)
            ids.append(r.session_id)
            sessions.append(
                {
                    "id": r.session_id,
                    "share_token": r.share_token,
                    "started_at": start,
                    "created_at": start,
                    "updated_at": start,
                    "total_questions": 248,
                    "status": "in_progress",
                }
            )
            for qid, text, qtype, section, value, offset in r.answers:
                at = start + timedelta(milliseconds=offset)
                answers.append(
                    {
                        "session_id": r.session_id,
                        "question_id": qid,
                        "question_text": text,
                        "question_type": qtype,
                        "question_section": section,
                        "answer_value": value,
                        "created_at": at,
                        "updated_at": at,
                    }
                )
            for _, block_id, option_id, offset in r.fc_choices:
                choices.append(
                    {
                        "session_id": r.session_id,
                        "block_id": block_id,
                        "option_id": option_id,
                        "answered_at": start + timedelta(milliseconds=offset),
                    }
                )
        with db.begin() as conn:
            conn.execute(assessment_sessions.insert(), sessions)
            conn.execute(assessment_responses.insert(), answers)
            conn.execute(fc_responses.insert(), choices)
    return ids


def _transport() -> httpx.AsyncHTTPTransport:
    # httpx writes a request's headers and body in two sends; without TCP_NODELAY, Nagle's algorithm holds the body
    # back until the server's delayed ACK (40 ms on Linux), which would be measured as server latency.
    return httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


async def _closed_loop(url: str, ids: Sequence[str], clients: int) -> tuple[list[float], float]:
    """Finalizes every session with ``clients`` concurrent closed-loop clients; (latencies in ms, wall seconds)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for sid in ids:
        queue.put_nowait(sid)
    latencies: list[float] = []
    failures: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0, transport=_transport()) as http:

        async def client() -> None:
            while True:
                try:
                    sid = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                started = time.perf_counter()
                resp = await http.post("/finalizeAssessment", json={"session_id": sid})
                latencies.append((time.perf_counter() - started) * 1000.0)
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code} {resp.text[:200]}")

        wall = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - wall
    if failures:
        raise SystemExit(f"{len(failures)} finalize call(s) failed, e.g. {failures[0]}")
    return latencies, wall


async def _baseline(url: str, ids: Sequence[str], key: str) -> float:
    """Sessions per second through score_fc_session + score_prism, one client, one call at a time."""
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, timeout=60.0, headers=headers, transport=_transport()) as http:
        wall = time.perf_counter()
        for sid in ids:
            for name in ("score_fc_session", "score_prism"):
                resp = await http.post(f"/{name}", json={"session_id": sid})
                if resp.status_code != 200:
                    raise SystemExit(f"{name} failed: {resp.status_code} {resp.text[:200]}")
        return len(ids) / (time.perf_counter() - wall)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def _wait_ready(url: str, process: multiprocessing.process.BaseProcess) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise SystemExit("the functions server process exited")
        try:
            if httpx.post(f"{url}/finalizeAssessment", json={}, timeout=2).status_code == 400:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit("the functions server did not start")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", default="1,5,20", help="concurrency levels, comma-separated (default 1,5,20)")
    parser.add_argument("--requests", type=int, default=150, help="finalize calls per level and repeat (default 150)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per level; the table shows medians (default 3)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls before measuring (default 20)")
    parser.add_argument("--baseline", action="store_true", help="also time score_fc_session + score_prism per session")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results as JSON here too")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",") if x.strip()]

    name = f"gf_bench_{uuid.uuid4().hex[:10]}"
    _admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    key = f"bench-{uuid.uuid4().hex}"
    process: multiprocessing.process.BaseProcess | None = None
    results: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "levels": []}
    try:
        env = Environment("bench", "staging", _database_url(name))
        with Database(env) as db:
            init_schema(db)
            load_reference_rows(db)
            needed = args.warmup + sum(args.requests for _ in levels) * args.repeat + (100 if args.baseline else 0)
            t0 = time.perf_counter()
            ids = write_sessions(db, needed, args.seed)
            print(f"wrote {needed} sessions (248 answers, 6 FC choices each) in {time.perf_counter() - t0:.1f} s")
        port = _free_port()
        url = f"http://127.0.0.1:{port}/functions/v1"
        process = multiprocessing.get_context("spawn").Process(target=_serve, args=(env.database_url, port, key))
        process.start()
        _wait_ready(url, process)
        cursor = 0

        def take(n: int) -> list[str]:
            nonlocal cursor
            cursor += n
            return ids[cursor - n : cursor]

        asyncio.run(_closed_loop(url, take(args.warmup), 5))
        print(f"{'clients':>7} {'calls':>6} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for clients in levels:
            runs = []
            for _ in range(args.repeat):
                latencies, wall = asyncio.run(_closed_loop(url, take(args.requests), clients))
                runs.append(
                    {
                        "throughput": len(latencies) / wall,
                        "p50": statistics.median(latencies),
                        "p95": _pct(latencies, 0.95),
                        "p99": _pct(latencies, 0.99),
                        "max": max(latencies),
                    }
                )
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            results["levels"].append({"clients": clients, "calls": args.requests, "runs": runs, "median": med})
            print(
                f"{clients:>7} {args.requests:>6} {med['throughput']:>8.1f} {med['p50']:>8.1f} {med['p95']:>8.1f} "
                f"{med['p99']:>8.1f} {med['max']:>8.1f}"
            )
        if args.baseline:
            rate = asyncio.run(_baseline(url, take(100), key))
            results["baseline_sessions_per_s"] = rate
            print(f"baseline (score_fc_session + score_prism over HTTP, 1 client): {rate:.1f} sessions/s")
        at_goal = [lvl for lvl in results["levels"] if lvl["clients"] == GOAL_CLIENTS]
        if at_goal:
            p95 = at_goal[0]["median"]["p95"]
            verdict = "met" if p95 <= GOAL_P95_MS else "NOT met"
            print(f"goal p95 <= {GOAL_P95_MS:g} ms at {GOAL_CLIENTS} clients: {verdict} (median p95 {p95:.1f} ms)")
            results["goal_met"] = p95 <= GOAL_P95_MS
        print(f"cpus: {os.cpu_count()}; command: {results['command']}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    finally:
        if process is not None:
            process.terminate()
            process.join(10)
        _admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
