"""Benchmark: 20 concurrent real @supabase/supabase-js clients against ``gatefill serve functions``, directly and
through a transaction pooler, side by side (issue 13: 0 errors over at least 2,000 calls through the pooler).

    .venv/bin/python bench/bench_supabase_js.py --sessions 1000 --clients 20 --repeat 3 --modes direct,pgbouncer

For each mode it creates a scratch database on the server of ``GATEFILL_TEST_DATABASE_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), writes ``--sessions`` in-progress sessions per repeat (248
answers and 6 FC choices each, as ``bench_finalize`` writes them), and starts ``gatefill serve functions`` as a child
process configured by environment variables only: with ``pooler = "none"`` on a direct connection, or, for
``pgbouncer``, with ``pooler = "transaction"`` through a PgBouncer in transaction mode with round robin (as the
tests start it; ``--pooler-url`` names another transaction pooler instead). ``tests/js/load.mjs`` then runs
``--clients`` concurrent clients (one ``createClient`` each, anon key): every session is finalized once with
``functions.invoke("finalizeAssessment", {session_id, responses})``, as the 2025-09-17 front-end sent it, and its
results are fetched with the share token it returned: two calls a session, each client sending its next call as
soon as the previous one answered. Each session is a respondent's browser of its own (``X-Forwarded-For``, which the
server trusts from 127.0.0.1), so the per-address rate limit sees one respondent's two calls, not a client's many.
Every non-200 answer and transport error is counted and shown.

After each mode it checks what a pooled server connection shows other clients: ``SHOW statement_timeout`` on twelve
consecutive transactions of a new client (round robin: every server connection of the pool) must be the default.
The table shows, per mode, the median over the repeats of the calls per second and of each function's p50/p95, and
the total calls and errors. Node must be installed and ``tests/js`` installed (``make test`` runs ``npm ci``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psycopg
import sqlalchemy as sa
from bench_finalize import write_sessions
from pgserver import admin, libpq, with_database
from psycopg import sql

from gatefill.config import Environment
from gatefill.db import Database
from gatefill.prism.schema import assessment_responses, init_schema
from gatefill.prism.schema import load_reference_data as load_reference_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.pgbouncer starts PgBouncer
from tests.pgbouncer import PgBouncer, start_pgbouncer

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "tests" / "js"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
ANON_KEY = "anon-bench-key-not-a-secret"


def _server_url() -> str:
    return libpq(os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER))


def _sessions(db: Database, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` in-progress sessions and the finalize body the front-end sends for each (its answers as responses)."""
    ids = write_sessions(db, n, seed)
    answers: dict[str, list[dict[str, Any]]] = {}
    with db.connect() as conn:
        r = assessment_responses
        rows = conn.execute(
            sa.select(r.c.session_id, r.c.question_id, r.c.answer_value).order_by(r.c.session_id, r.c.question_id)
        )
        for session_id, question_id, value in rows:
            answers.setdefault(str(session_id), []).append({"question_id": question_id, "answer_value": value})
    return [{"session_id": i, "responses": answers[i]} for i in ids]


def _serve(url: str, pooler: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    variables = {
        **os.environ,
        "GATEFILL_ENV_BENCH_DATABASE_URL": url,
        "GATEFILL_ENV_BENCH_POOLER": pooler,
        "GATEFILL_ENV_BENCH_SERVICE_ROLE_KEY_ENV": "GATEFILL_BENCH_JS_KEY",
        "GATEFILL_BENCH_JS_KEY": f"bench-{uuid.uuid4().hex}",
    }
    command = [sys.executable, "-m", "gatefill", "serve", "functions", "--env", "bench", "--port", str(port)]
    with log.open("wb") as sink:
        server = subprocess.Popen(command, env=variables, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/metrics", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"error: gatefill serve functions did not start: {log.read_text()[-500:]}")
        time.sleep(0.1)


def _load(base: str, clients: int, bodies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    settings = {"url": base, "anonKey": ANON_KEY, "clients": clients, "sessions": list(bodies)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", encoding="utf-8") as arg:
        json.dump(settings, arg)
        arg.flush()
        run = subprocess.run(["node", "load.mjs", "@" + arg.name], capture_output=True, text=True, cwd=JS)
    if run.returncode != 0:
        raise SystemExit(f"error: load.mjs failed: {run.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def _leaked(url: str) -> set[str]:
    """``statement_timeout`` as a new client sees it on consecutive transactions (each on the next server
    connection of a round-robin pool)."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        return {str(conn.execute("SHOW statement_timeout").fetchone()[0]) for _ in range(12)}  # type: ignore[index]


def run_mode(mode: str, args: argparse.Namespace, bouncer: PgBouncer | None) -> dict[str, Any]:
    name = f"gf_bench_js_{uuid.uuid4().hex[:10]}"
    admin(_server_url(), sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    direct = with_database(_server_url(), name)
    served = direct
    if mode == "pgbouncer":
        served = with_database(args.pooler_url, name) if args.pooler_url else bouncer.url(_server_url(), name)  # type: ignore[union-attr]
    server = None
    try:
        with Database(Environment("bench", "staging", direct.replace("postgresql://", "postgresql+psycopg://"))) as db:
            init_schema(db)
            load_reference_rows(db)
            bodies = _sessions(db, args.sessions * args.repeat + args.warmup, args.seed)
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        server, base = _serve(served, "transaction" if mode == "pgbouncer" else "none", Path(f"/tmp/{name}.log"))
        _load(base, args.clients, bodies[: args.warmup])
        runs = []
        for i in range(args.repeat):
            chunk = bodies[args.warmup + i * args.sessions : args.warmup + (i + 1) * args.sessions]
            result = _load(base, args.clients, chunk)
            runs.append(result)
            print(f"  {mode} run {i + 1}: {_line(result)}", flush=True)
        leaked = _leaked(served.replace("postgresql+psycopg://", "postgresql://"))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        admin(_server_url(), sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    return {"mode": mode, "runs": runs, "statement_timeout_seen": sorted(leaked)}


def _errors(result: dict[str, Any]) -> int:
    bad = sum(n for f in result["functions"].values() for s, n in f["statuses"].items() if s != "200")
    return int(bad) + int(result["skipped_results"])


def _line(result: dict[str, Any]) -> str:
    f = result["functions"]
    fin, res = f.get("finalizeAssessment", {}), f.get("get-results-by-session", {})
    return (
        f"{result['calls']} calls, {_errors(result)} not 200, {result['calls_per_second']:.0f} calls/s; "
        f"finalize p50 {fin.get('p50_ms', 0):.1f} p95 {fin.get('p95_ms', 0):.1f} ms; "
        f"results p50 {res.get('p50_ms', 0):.1f} p95 {res.get('p95_ms', 0):.1f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=1000, help="sessions per repeat: two calls each (1000)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent supabase-js clients (20)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode; medians are shown (3)")
    parser.add_argument("--warmup", type=int, default=40, help="sessions finalized before measuring (40)")
    parser.add_argument("--modes", default="direct,pgbouncer", help="direct, pgbouncer or both (default both)")
    parser.add_argument("--pooler-url", help="for the pgbouncer mode: this transaction pooler instead of a PgBouncer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every run here")
    args = parser.parse_args(argv)
    if not (JS / "node_modules" / "@supabase" / "supabase-js").is_dir():
        raise SystemExit("error: tests/js is not installed: run `make test` or `npm ci --prefix tests/js`")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}\nload average at start: {os.getloadavg()}", flush=True)
    bouncer = start_pgbouncer(_server_url()) if "pgbouncer" in modes and not args.pooler_url else None
    try:
        results = [run_mode(mode, args, bouncer) for mode in modes]
    finally:
        if bouncer is not None:
            bouncer.stop()
    print(f"\n{'mode':<10} {'calls':>6} {'errors':>6} {'calls/s':>8} {'fin p50':>8} {'fin p95':>8} {'res p50':>8} "
          f"{'res p95':>8}  statement_timeout seen by other clients")  # fmt: skip
    for r in results:
        runs = r["runs"]

        def med(fn: str, key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(float(x["functions"].get(fn, {}).get(key) or 0.0) for x in runs)

        calls = sum(x["calls"] for x in runs)
        errors = sum(_errors(x) for x in runs)
        rate = statistics.median(x["calls_per_second"] for x in runs)
        print(
            f"{r['mode']:<10} {calls:>6} {errors:>6} {rate:>8.0f} {med('finalizeAssessment', 'p50_ms'):>8.1f} "
            f"{med('finalizeAssessment', 'p95_ms'):>8.1f} {med('get-results-by-session', 'p50_ms'):>8.1f} "
            f"{med('get-results-by-session', 'p95_ms'):>8.1f}  {', '.join(r['statement_timeout_seen'])}"
        )
        for x in runs:
            for e in x["errors"][:5]:
                print(f"    error: {e}")
    print(f"load average at end: {os.getloadavg()}; cpus: {os.cpu_count()}; command: {command}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "results": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
