"""Benchmark: finalizeAssessment over HTTP on Postgres with 1, 5 and 20 concurrent clients (goal: p95 <= 50 ms at 20).

    .venv/bin/python bench/bench_finalize.py --requests 150 --repeat 3 [--workers N] [--client raw|httpx]

It creates a scratch database on the Postgres server of ``GATEFILL_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``; ``postgresql://postgres@/postgres?host=/var/run/postgresql`` reaches
the same server over its unix socket, which spares the loopback TCP stack's CPU on both ends), initialises the PRISM
schema and reference data, writes one fresh session per call (248 answers and 6 FC choices, as the simulator's
respondents write them), and starts the functions server (``serve_functions``, ``--workers`` processes) in a child
process. The load generator runs in another child process, so neither shares an interpreter with the server or with this
one. Its clients are closed-loop asyncio tasks, one keep-alive connection each: each sends the next finalize as soon as
the previous one answered, so the latency includes queueing at the server. ``--client raw`` (the default) speaks
HTTP/1.1 over asyncio streams (a request is one write, a response is read to its Content-Length) so the generator costs
little CPU on a small machine; ``--client httpx`` uses httpx. Every call must answer 200 (a profile is written per
session), otherwise the run fails. Each level runs ``--repeat`` times; the table shows the median of the repeats for
every column, and for each repeat how the clients' connections were spread over the server's processes (an uneven split
shows in p95).

Beside the latencies it shows where the CPU went, in CPU milliseconds per request: the server's processes, the
Postgres backends of the scratch database, the load generator, and everything else the machine ran meanwhile
(``other``: other benchmarks, tests, Postgres's own background processes), from /proc. The load average is printed
at the start and the end: on a shared machine, read latencies with it.

``--pgbouncer`` puts a PgBouncer in transaction mode (round robin, as the tests start it) between the server and
Postgres, and ``--pooler-url postgresql://USER@HOST:PORT/DB`` names another transaction pooler in front of the same
server (its database part is replaced); either way the functions server runs with ``pooler = "transaction"`` (no
prepared statements, ``SET LOCAL`` per transaction), as a Supabase project reached through Supavisor's port 6543.

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

from gatefill.config import Environment, Pooler
from gatefill.db import Database
from gatefill.prism.sandbox.simulator import new_respondent
from gatefill.prism.schema import assessment_responses, assessment_sessions, fc_responses, init_schema
from gatefill.prism.schema import load_reference_data as load_reference_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.pgbouncer starts PgBouncer
from tests.pgbouncer import start_pgbouncer

GOAL_P95_MS = 50.0
GOAL_CLIENTS = 20
KEY_ENV = "GATEFILL_BENCH_SERVICE_ROLE_KEY"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def _server_url() -> str:
    return os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER).replace(
        "postgresql+psycopg://", "postgresql://"
    )


def _database_url(name: str) -> str:
    # The query (e.g. ?host=/var/run/postgresql for the server's unix socket) is kept: only the database changes.
    url, _, query = _server_url().partition("?")
    base = url.rsplit("/", 1)[0]
    return f"{base}/{name}{'?' + query if query else ''}".replace("postgresql://", "postgresql+psycopg://", 1)


def _admin(statement: sql.Composed | sql.SQL) -> None:
    with psycopg.connect(_server_url(), autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pooled_url(pooler: str, name: str) -> str:
    """Database ``name`` through the transaction pooler at ``pooler`` (its query kept, its database replaced)."""
    url, _, query = pooler.replace("postgresql+psycopg://", "postgresql://").partition("?")
    base = url.rsplit("/", 1)[0]
    return f"{base}/{name}{'?' + query if query else ''}".replace("postgresql://", "postgresql+psycopg://", 1)


def _serve(database_url: str, port: int, key: str, workers: int, pooler: Pooler) -> None:
    """The child process: the functions server as ``gatefill serve functions`` runs it."""
    from gatefill.prism.platform.server import serve_functions

    os.environ[KEY_ENV] = key
    env = Environment("bench", "staging", database_url, service_role_key_env=KEY_ENV, pooler=pooler)
    serve_functions(env, host="127.0.0.1", port=port, log_level="warning", workers=workers)


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
            # COPY: the 248 answer rows per session made INSERT the bulk of the benchmark's setup time.
            raw = conn.connection.driver_connection
            assert isinstance(raw, psycopg.Connection)
            for table, rows in ((assessment_responses, answers), (fc_responses, choices)):
                columns = list(rows[0])
                statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns))
                )
                with raw.cursor().copy(statement) as copy:
                    for row in rows:
                        copy.write_row([row[c] for c in columns])
    return ids


def settle(database_url: str) -> None:
    """VACUUM ANALYZE and CHECKPOINT after the bulk setup, so that autovacuum's pass over a million fresh answer rows
    and the checkpoint of their WAL do not run during the measured calls (they showed as ``other`` CPU, up to 1.4 ms
    per request, and halved the throughput of the level they fell on)."""
    url = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("VACUUM (ANALYZE)")
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            print("note: CHECKPOINT needs superuser or pg_checkpoint; the setup's WAL may be checkpointed mid-run")


def _transport() -> httpx.AsyncHTTPTransport:
    # httpx writes a request's headers and body in two sends; without TCP_NODELAY, Nagle's algorithm holds the body
    # back until the server's delayed ACK (40 ms on Linux), which would be measured as server latency.
    return httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


async def _closed_loop_httpx(url: str, ids: Sequence[str], clients: int) -> tuple[list[float], float]:
    """Finalizes every session with ``clients`` concurrent closed-loop httpx clients; (latencies in ms, wall s)."""
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


async def _closed_loop_raw(url: str, ids: Sequence[str], clients: int) -> tuple[list[float], float]:
    """The same closed loop over plain HTTP/1.1 keep-alive connections (one per client) on asyncio streams."""
    parsed = httpx.URL(url)
    host, port, path = parsed.host, parsed.port or 80, parsed.path.rstrip("/") + "/finalizeAssessment"
    queue: asyncio.Queue[str] = asyncio.Queue()
    for sid in ids:
        queue.put_nowait(sid)
    latencies: list[float] = []
    failures: list[str] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                try:
                    sid = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                body = json.dumps({"session_id": sid}).encode()
                request = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode() + body
                started = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                payload = await reader.readexactly(length)
                latencies.append((time.perf_counter() - started) * 1000.0)
                if status != 200:
                    failures.append(f"{status} {payload[:200]!r}")
        finally:
            writer.close()

    wall = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - wall
    if failures:
        raise SystemExit(f"{len(failures)} finalize call(s) failed, e.g. {failures[0]}")
    return latencies, wall


def _load_generator(conn: Any, url: str, kind: str) -> None:
    """The load generator's process: runs each (ids, clients) it is sent; answers (latencies, wall, its CPU s)."""
    loop = _closed_loop_raw if kind == "raw" else _closed_loop_httpx
    while True:
        job = conn.recv()
        if job is None:
            return
        ids, clients = job
        cpu = time.process_time()
        latencies, wall = asyncio.run(loop(url, ids, clients))
        conn.send((latencies, wall, time.process_time() - cpu))


_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one process, 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children") if Path(f"/proc/{p}").exists() else []:
            todo.extend(int(c) for c in task.read_text().split())
    return out


def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICKS


def _socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets process ``pid`` holds open."""
    out = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except (FileNotFoundError, PermissionError):
        pass
    return out


def connection_split(server_pid: int, port: int) -> list[int]:
    """How many established client connections to ``port`` each server process holds, largest first.

    Closed-loop clients on an uneven split see unequal queues (a worker with 12 of 20 connections answers them
    1.5 times slower than one with 8), which shows in p95; this makes the split visible beside the latencies.
    """
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            # local address is HEX_IP:HEX_PORT; state 01 is ESTABLISHED; field 9 is the inode.
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                established.add(fields[9])
    counts = [len(_socket_inodes(pid) & established) for pid in _tree(server_pid)]
    return sorted((c for c in counts if c), reverse=True)


def _backends(name: str) -> list[int]:
    with psycopg.connect(_server_url(), autocommit=True, connect_timeout=5) as conn:
        return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,))]


class _CpuMeter:
    """CPU seconds of the server's processes, the database's backends and the whole machine over one run."""

    def __init__(self, server_pid: int, database: str) -> None:
        self.server_pid = server_pid
        self.database = database

    def snapshot(self) -> tuple[dict[int, float], dict[int, float], float]:
        server = {p: _proc_cpu(p) for p in _tree(self.server_pid)}
        backends = {p: _proc_cpu(p) for p in _backends(self.database)}
        return server, backends, _machine_busy()

    @staticmethod
    def delta(
        before: tuple[dict[int, float], dict[int, float], float],
        after: tuple[dict[int, float], dict[int, float], float],
    ) -> tuple[float, float, float]:
        server = sum(v - before[0].get(p, 0.0) for p, v in after[0].items())
        backends = sum(v - before[1].get(p, 0.0) for p, v in after[1].items())
        return server, backends, after[2] - before[2]


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


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", default="1,5,20", help="concurrency levels, comma-separated (default 1,5,20)")
    parser.add_argument("--requests", type=int, default=150, help="finalize calls per level and repeat (default 150)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per level; the table shows medians (default 3)")
    parser.add_argument("--warmup", type=int, default=60, help="untimed calls before measuring (default 60)")
    parser.add_argument("--workers", type=int, default=1, help="server processes (gatefill serve functions --workers)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw", help="load generator's HTTP client")
    parser.add_argument("--baseline", action="store_true", help="also time score_fc_session + score_prism per session")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results as JSON here too")
    parser.add_argument("--pgbouncer", action="store_true", help="serve through a PgBouncer in transaction mode")
    parser.add_argument("--pooler-url", help="serve through this transaction pooler in front of the same server")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",") if x.strip()]

    name = f"gf_bench_{uuid.uuid4().hex[:10]}"
    _admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    key = f"bench-{uuid.uuid4().hex}"
    spawn = multiprocessing.get_context("spawn")
    process: multiprocessing.process.BaseProcess | None = None
    generator: multiprocessing.process.BaseProcess | None = None
    results: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "levels": []}
    results["loadavg_start"] = _loadavg()
    print(f"load average at start: {results['loadavg_start']}")
    bouncer = start_pgbouncer(_server_url()) if args.pgbouncer else None
    pooler_url = bouncer.url(_server_url(), "postgres") if bouncer is not None else args.pooler_url
    results["connection"] = "transaction pooler" if pooler_url else "direct"
    print(f"functions server -> Postgres: {'through ' + pooler_url if pooler_url else 'direct'}")
    try:
        env = Environment("bench", "staging", _database_url(name))
        with Database(env) as db:
            init_schema(db)
            load_reference_rows(db)
            needed = args.warmup + sum(args.requests for _ in levels) * args.repeat + (100 if args.baseline else 0)
            t0 = time.perf_counter()
            ids = write_sessions(db, needed, args.seed)
            print(f"wrote {needed} sessions (248 answers, 6 FC choices each) in {time.perf_counter() - t0:.1f} s")
        settle(env.database_url)
        port = _free_port()
        url = f"http://127.0.0.1:{port}/functions/v1"
        served_url = _pooled_url(pooler_url, name) if pooler_url else env.database_url
        pooler: Pooler = "transaction" if pooler_url else "none"
        process = spawn.Process(target=_serve, args=(served_url, port, key, args.workers, pooler))
        process.start()
        _wait_ready(url, process)
        ours, theirs = spawn.Pipe()
        generator = spawn.Process(target=_load_generator, args=(theirs, url, args.client))
        generator.start()
        assert process.pid is not None
        server_pid = process.pid
        meter = _CpuMeter(server_pid, name)
        cursor = 0

        def take(n: int) -> list[str]:
            nonlocal cursor
            cursor += n
            return ids[cursor - n : cursor]

        def run(n: int, clients: int) -> tuple[list[float], float, float, list[int]]:
            ours.send((take(n), clients))
            # While the clients run, look once at how their connections are spread over the server's processes.
            split: list[int] = []
            while not ours.poll(0.05):
                if sum(split) < clients:
                    split = connection_split(server_pid, port)
            latencies, wall, client_cpu = ours.recv()
            return latencies, wall, client_cpu, split

        # Warm every connection of the largest level (pool, prepared statements, caches) before measuring.
        run(args.warmup, max(levels))
        print(
            f"{'clients':>7} {'calls':>6} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}"
            f"   CPU ms/req: {'server':>6} {'pg':>5} {'client':>6} {'other':>5}   connections per server process"
        )
        for clients in levels:
            runs: list[dict[str, Any]] = []
            for _ in range(args.repeat):
                before = meter.snapshot()
                latencies, wall, client_cpu, split = run(args.requests, clients)
                server_cpu, pg_cpu, busy = _CpuMeter.delta(before, meter.snapshot())
                n = len(latencies)
                runs.append(
                    {
                        "throughput": n / wall,
                        "p50": statistics.median(latencies),
                        "p95": _pct(latencies, 0.95),
                        "p99": _pct(latencies, 0.99),
                        "max": max(latencies),
                        "cpu_server_ms": server_cpu / n * 1000,
                        "cpu_pg_ms": pg_cpu / n * 1000,
                        "cpu_client_ms": client_cpu / n * 1000,
                        "cpu_other_ms": max(0.0, busy - server_cpu - pg_cpu - client_cpu) / n * 1000,
                        "split": split,
                    }
                )
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "split"}
            results["levels"].append({"clients": clients, "calls": args.requests, "runs": runs, "median": med})
            print(
                f"{clients:>7} {args.requests:>6} {med['throughput']:>8.1f} {med['p50']:>8.1f} {med['p95']:>8.1f} "
                f"{med['p99']:>8.1f} {med['max']:>8.1f}   {'':>11} {med['cpu_server_ms']:>6.2f} "
                f"{med['cpu_pg_ms']:>5.2f} {med['cpu_client_ms']:>6.2f} {med['cpu_other_ms']:>5.2f}   "
                + " ".join("/".join(str(c) for c in r["split"]) or "-" for r in runs)
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
        results["loadavg_end"] = _loadavg()
        print(
            f"load average at end: {results['loadavg_end']}; cpus: {os.cpu_count()}; workers: {args.workers}; "
            f"client: {args.client}; connection: {results['connection']}; command: {results['command']}"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    finally:
        if generator is not None:
            generator.terminate()
            generator.join(10)
        if process is not None:
            process.terminate()
            process.join(10)
        _admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if bouncer is not None:
            bouncer.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
