"""Benchmark: the apply phase (local executor) on Postgres, against its floor and against the original HTTP path.

    .venv/bin/python bench/bench_apply.py --sessions 10000,100000 --runs 3 --batch-size 1000

For every size and run it creates a fresh database on the server of ``--server`` / ``GATEFILL_TEST_DATABASE_URL``
(default ``postgresql://postgres@127.0.0.1:5432/postgres``), seeds ``N`` synthetic sessions that all need work
(``seed_scenario(db, "synthetic", missing_fraction=1.0)``: none has its v1.2 fc_scores row, half lack the profile
too), runs ``VACUUM ANALYZE``, and then measures, in this order and in the same database:

(c) the HTTP path: ``--http-sample`` candidates (after a short warm-up) through the functions server running
    in-process on 127.0.0.1 (``create_app`` + ``serve_in_thread``; ``--http-server process`` runs
    ``serve_functions`` in a child process instead), one ``score_fc_session`` then one ``score_prism`` POST per
    session with the service-role key, one keep-alive client, one call at a time, as the original pipeline called
    them. Those sessions are then complete, so the plan below no longer lists them.
(plan) ``build_plan`` with ``rate=unlimited`` and ``--batch-size`` (its time is reported, not counted below).
(a) the floor: one streaming query (server-side cursor) reading, for the plan's candidates, exactly the inputs the
    apply reads (answers in question order, FC answers, the existing profile's ``submitted_at``), ``score_session``
    per session, and the fc_scores and profile rows the apply would write sent with one COPY per table into scratch
    tables shaped like the real ones (``LIKE ... INCLUDING ALL``), no ledger, no fn_logs.
(b) the local executor: ``apply_plan(..., ApplyOptions(rate="unlimited", batch_size=B, approve_as="bench"))`` in a
    fresh child process that loads the plan file as ``gatefill apply PLAN.json`` does; its sessions/s is the
    apply's own measured rate and its peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` of that process.

``--pgbouncer`` (or ``--pooler-url URL``, another transaction pooler in front of ``--server``) makes the plan and the
apply (b) go through a PgBouncer in transaction mode with ``pooler = "transaction"`` (no prepared statements), as a
Supabase project reached through port 6543; seeding, (a) and (c) stay direct, so (b) is the only figure that moves.

A ``CHECKPOINT`` precedes (a) and (b), so neither pays for the other's dirty pages. After (b) the bench checks that
every candidate was written and that the database holds exactly the rows the ledger lists. Every database is dropped
at the end. The summary prints the medians per size, the ratios b/a and b/c, the goals and the exact command, and the
machine's CPU cost per session of (a), (b) and (c) from /proc/stat (all cores, Postgres backends included; on a quiet
machine that is the phase's whole cost), with the apply rate that cost allows on this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from pgserver import admin as _admin
from pgserver import sa_url as _sa_url
from pgserver import with_database as _with_database
from psycopg import sql

from gatefill.config import Environment, Pooler
from gatefill.db import Database, dumps_json
from gatefill.plan import Plan, PlanParams, build_plan
from gatefill.prism import scoring
from gatefill.prism.inputs import load_reference_data_from_db
from gatefill.prism.job import PrismJob
from gatefill.prism.sandbox.seed import WINDOW_START, seed_scenario
from gatefill.prism.schema import fc_scores, init_schema, load_reference_data, profiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.pgbouncer starts PgBouncer
from tests.pgbouncer import start_pgbouncer

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
GOAL_VS_FLOOR = 0.7
GOAL_WAL_RATIO = 2.0
GOAL_RSS_MB = 200.0
_KEY_ENV = "GATEFILL_BENCH_APPLY_SERVICE_ROLE_KEY"
_FC_COLUMNS = tuple(c.name for c in fc_scores.columns)
_PROFILE_COLUMNS = tuple(c.name for c in profiles.columns)
_JSON_PROFILE_COLUMNS = frozenset(c.name for c in profiles.columns if type(c.type).__name__ == "JSONValue")


# ------------------------------------------------------------------------------------------------------ databases


@contextmanager
def _scratch_database(server: str) -> Iterator[str]:
    """A fresh, uniquely named database (its libpq URL), dropped on exit whatever happens."""
    name = f"gf_bench_apply_{uuid.uuid4().hex[:10]}"
    _admin(server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(server, name)
    finally:
        _admin(server, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _checkpoint(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


class WalMeter:
    """WAL written while a phase ran, measured two ways: the server's ``pg_current_wal_lsn()`` before and after (what
    the whole cluster wrote meanwhile, other databases' writers included), and this database's own share, the bytes
    of the WAL records in that range whose block references name this database (``pg_walinspect``; transaction
    commit records name no block and are left out), also without their full-page images (which depend on when the
    server checkpoints, so on everything else it is writing) and per relation.

    A temporary physical replication slot, held by this meter's own connection, keeps the range's segments until they
    are read (checkpoints during a long phase cannot recycle them first), and goes away with that connection whatever
    happens to this process."""

    def __init__(self, url: str) -> None:
        self.url = url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        self.cluster_bytes = self.database_bytes = self.database_no_fpi_bytes = self.ledger_bytes = 0
        self.by_relation: dict[str, int] = {}

    def __enter__(self) -> WalMeter:
        self._conn = psycopg.connect(self.url, autocommit=True)
        slot = f"gf_bench_wal_{uuid.uuid4().hex[:8]}"
        self._conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (slot,))
        self.start = self._one("SELECT pg_current_wal_lsn()::text")
        return self

    def _one(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        row = self._conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._measure()
        finally:
            self._conn.close()  # drops the temporary slot

    def _measure(self) -> None:
        end = self._one("SELECT pg_current_wal_lsn()::text")
        oid = self._one("SELECT oid FROM pg_database WHERE datname = current_database()")
        self.cluster_bytes = int(self._one("SELECT %s::pg_lsn - %s::pg_lsn", (end, self.start)))
        # One scan of the range, summed per relation of this database (a record counts for its first block).
        rows = self._conn.execute(
            "SELECT (regexp_match(block_ref, 'rel \\d+/\\d+/(\\d+)'))[1], sum(record_length)::bigint, "
            "sum(fpi_length)::bigint FROM pg_get_wal_records_info(%s::pg_lsn, %s::pg_lsn) "
            "WHERE block_ref LIKE %s GROUP BY 1",
            (self.start, end, f"%/{oid}/%"),
        ).fetchall()
        # A TOAST table (and its index) is named after the table it belongs to.
        names: dict[str, str] = dict(
            self._conn.execute(
                "SELECT c.relfilenode::text, COALESCE(owner.relname || ' (toast)', c.relname) FROM pg_class c "
                "LEFT JOIN pg_index i ON i.indexrelid = c.oid AND c.relnamespace = 'pg_toast'::regnamespace "
                "LEFT JOIN pg_class owner ON owner.reltoastrelid = COALESCE(i.indrelid, c.oid)"
            ).fetchall()
        )
        per: dict[str, int] = {}
        for node, size, fpi in rows:
            name = str(names.get(node, node))
            per[name] = per.get(name, 0) + int(size)
            self.database_bytes += int(size)
            self.database_no_fpi_bytes += int(size) - int(fpi)
            self.ledger_bytes += int(size) if name.startswith("gatefill") else 0
        self.by_relation = dict(sorted(per.items(), key=lambda kv: -kv[1])[:30])


# ------------------------------------------------------------------------------------------------------ (c) HTTP


def _serve_child(database_url: str, port: int, key: str) -> None:
    """Child process for ``--http-server process``: the server as ``gatefill serve functions`` runs it."""
    from gatefill.prism.platform.server import serve_functions

    os.environ[_KEY_ENV] = key
    env = Environment("bench", "staging", database_url, service_role_key_env=_KEY_ENV)
    serve_functions(env, host="127.0.0.1", port=port, log_level="warning")


@contextmanager
def _functions_server(url: str, key: str, mode: str) -> Iterator[str]:
    """The functions server on 127.0.0.1; yields its ``/functions/v1`` base URL."""
    env = Environment("bench", "staging", _sa_url(url))
    if mode == "thread":
        from gatefill.prism.platform.server import create_app, serve_in_thread

        with Database(env, pool_size=4) as db, serve_in_thread(create_app(env, db, service_role_key=key)) as base:
            yield f"{base}/functions/v1"
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = multiprocessing.get_context("spawn").Process(target=_serve_child, args=(env.database_url, port, key))
    process.start()
    try:
        base = f"http://127.0.0.1:{port}/functions/v1"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.post(f"{base}/score_prism", json={}, timeout=2).status_code in (400, 401):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not process.is_alive():
                raise SystemExit("the functions server did not start")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.join(10)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat: everything but idle and
    iowait), so a phase's total CPU cost, this process, its children and every Postgres backend, is a difference."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measure_http(url: str, warmup: Sequence[str], sample: Sequence[str], mode: str) -> tuple[float, float]:
    """Sessions per second through score_fc_session + score_prism over HTTP, one call at a time, and the machine's
    CPU milliseconds per session meanwhile."""
    key = f"bench-{uuid.uuid4().hex}"
    with _functions_server(url, key, mode) as base:
        # httpx sends headers and body in two writes: without TCP_NODELAY, Nagle's algorithm would hold the body
        # until the server's delayed ACK (40 ms), which would be measured as the server's latency.
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=60.0, transport=transport) as http:

            def one(sid: str) -> None:
                for name in ("score_fc_session", "score_prism"):
                    resp = http.post(f"/{name}", json={"session_id": sid})
                    if resp.status_code != 200:
                        raise SystemExit(f"{name} failed: {resp.status_code} {resp.text[:200]}")

            for sid in warmup:
                one(sid)
            started, busy = time.perf_counter(), machine_busy_seconds()
            for sid in sample:
                one(sid)
            elapsed, busy = time.perf_counter() - started, machine_busy_seconds() - busy
            return len(sample) / elapsed, busy / len(sample) * 1000.0


# ------------------------------------------------------------------------------------------------------ (a) floor

_FLOOR_QUERY = """
SELECT c.id::text, a.qids, a.vals, f.blocks, f.options, p.submitted_at
FROM unnest(%s::uuid[]) AS c(id)
CROSS JOIN LATERAL (
    SELECT array_agg(question_id ORDER BY question_id) AS qids, array_agg(answer_value ORDER BY question_id) AS vals
    FROM assessment_responses r WHERE r.session_id = c.id) a
CROSS JOIN LATERAL (
    SELECT array_agg(block_id::text ORDER BY answered_at, block_id) AS blocks,
           array_agg(option_id::text ORDER BY answered_at, block_id) AS options
    FROM fc_responses f WHERE f.session_id = c.id) f
LEFT JOIN profiles p ON p.session_id = c.id
"""


def measure_floor(url: str, plan: Plan, now: datetime) -> tuple[float, int, WalMeter]:
    """(sessions/s, sessions, WAL written) of read + score + COPY for the plan's candidates; scratch tables dropped
    after."""
    candidates = sorted(plan.runnable, key=lambda c: c.key)
    ops = {c.key: frozenset(c.operations) for c in candidates}
    env = Environment("bench", "staging", _sa_url(url))
    with Database(env, pool_size=1) as db, db.connect() as conn:
        ref = load_reference_data_from_db(conn)
    with psycopg.connect(url, autocommit=True) as ddl:
        ddl.execute("CREATE TABLE floor_fc_scores (LIKE fc_scores INCLUDING ALL)")
        ddl.execute("CREATE TABLE floor_profiles (LIKE profiles INCLUDING ALL)")
    _checkpoint(url)
    wal = WalMeter(url)
    fc_cols = sql.SQL(", ").join(sql.Identifier(c) for c in _FC_COLUMNS)
    profile_cols = sql.SQL(", ").join(sql.Identifier(c) for c in _PROFILE_COLUMNS)
    n = 0
    try:
        started = time.perf_counter()
        with (
            wal,
            psycopg.connect(url) as reader,
            psycopg.connect(url) as fc_writer,
            psycopg.connect(url) as profile_writer,
            fc_writer.cursor().copy(sql.SQL("COPY floor_fc_scores ({}) FROM STDIN").format(fc_cols)) as fc_copy,
            profile_writer.cursor().copy(
                sql.SQL("COPY floor_profiles ({}) FROM STDIN").format(profile_cols)
            ) as profile_copy,
        ):
            cursor = reader.cursor(name="floor")
            cursor.itersize = 1000
            cursor.execute(_FLOOR_QUERY, ([c.key for c in candidates],))
            for sid, qids, values, blocks, options, submitted_at in cursor:
                answers = [{"question_id": q, "answer_value": v} for q, v in zip(qids or (), values or (), strict=True)]
                fc = [{"block_id": b, "option_id": o} for b, o in zip(blocks or (), options or (), strict=True)]
                existing = {"submitted_at": submitted_at} if submitted_at is not None else None
                scored = scoring.score_session(scoring.SessionInputs(sid, answers, fc, None), ref, now, existing)
                wanted = ops[sid]
                if "fc_scores:insert" in wanted and scored.fc_scores_row is not None:
                    row = {**scored.fc_scores_row, "created_at": now}
                    fc_copy.write_row([_copy_value(c, row[c]) for c in _FC_COLUMNS])
                if "profiles:insert" in wanted and scored.profile_row is not None:
                    values_ = {**scored.profile_row, "id": str(uuid.uuid4()), "share_token": str(uuid.uuid4())}
                    profile_copy.write_row([_copy_value(c, values_.get(c)) for c in _PROFILE_COLUMNS])
                n += 1
            cursor.close()
        elapsed = time.perf_counter() - started
    finally:
        with psycopg.connect(url, autocommit=True) as ddl:
            ddl.execute("DROP TABLE IF EXISTS floor_fc_scores, floor_profiles")
    if n != len(candidates):
        raise SystemExit(f"floor read {n} sessions, the plan has {len(candidates)} candidates")
    return n / elapsed, n, wal


def _copy_value(column: str, value: Any) -> Any:
    # JSON goes over the wire as the apply's JSONValue binds it: compact JSON with JavaScript number forms.
    if value is not None and (column in _JSON_PROFILE_COLUMNS or column == "scores_json"):
        return dumps_json(value)
    return value


# ------------------------------------------------------------------------------------------------------ (b) apply


def _child_apply(url: str, plan_path: str, artifacts: str, batch_size: int, pooler: Pooler) -> None:
    """Child process: ``gatefill apply PLAN.json`` in library form; prints its measurements as one JSON line."""
    from gatefill.apply import ApplyOptions, apply_plan
    from gatefill.clock import RealClock
    from gatefill.plan import open_plan

    plan = open_plan(Path(plan_path))  # as `gatefill apply PLAN.json` does: streamed, never held whole
    env = Environment(plan.environment.name, "staging", _sa_url(url), pooler=pooler)
    cpu = time.process_time()
    with Database(env, pool_size=2) as db:
        result = apply_plan(
            db,
            env,
            PrismJob(),
            plan,
            options=ApplyOptions(rate="unlimited", batch_size=batch_size, approve_as="bench"),
            clock=RealClock(),
            artifacts_dir=Path(artifacts),
        )
    out = {
        "sessions": sum(result.counts.values()),
        "counts": dict(result.counts),
        "seconds": result.elapsed_seconds,
        "cpu_seconds": time.process_time() - cpu,
        "status": result.status.value,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "vmhwm_mb": _vm_hwm_mb(),
    }
    print("RESULT " + json.dumps(out), flush=True)


def _vm_hwm_mb() -> float | None:
    """The kernel's own peak-RSS figure for this process (Linux), as a cross-check of ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def measure_apply(
    url: str, direct_url: str, plan_path: Path, artifacts: Path, batch_size: int, pooler: Pooler
) -> dict[str, Any]:
    """The apply child's measurements, with the WAL it wrote (``direct_url``: the database without a pooler)."""
    _checkpoint(direct_url)
    wal = WalMeter(direct_url)
    # Linux folds the parent's memory into a child's ru_maxrss when the child is spawned straight from this (large)
    # process (vfork + exec), so a small launcher process starts the measured one.
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    child = [sys.executable, __file__, "--child-apply", url, str(plan_path), str(artifacts), str(batch_size), pooler]
    with wal:
        proc = subprocess.run([sys.executable, "-c", launcher, *child], capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"apply child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    result["wal_cluster_mb"] = wal.cluster_bytes / 1e6
    result["wal_database_mb"] = wal.database_bytes / 1e6
    result["wal_by_relation_mb"] = {k: round(v / 1e6, 2) for k, v in wal.by_relation.items()}
    result["wal_ledger_mb"] = wal.ledger_bytes / 1e6
    result["wal_database_no_fpi_mb"] = wal.database_no_fpi_bytes / 1e6
    return result


def _verify(url: str, run_id: str, expected: int) -> None:
    """Every candidate written, and the database holds exactly the fc_scores/profiles rows the ledger lists."""
    with psycopg.connect(url) as conn:
        results: dict[str, int] = dict(
            conn.execute(
                "SELECT result, count(*) FROM gatefill_session_results WHERE run_id = %s GROUP BY result", (run_id,)
            ).fetchall()
        )
        missing = conn.execute(
            # An entry's candidate: its third element, or the key value of the set's candidate_key column.
            "SELECT count(*) FROM gatefill_change_sets c, json_array_elements(c.entries::json) e "
            "WHERE c.run_id = %s AND c.table_name = 'fc_scores' AND NOT EXISTS (SELECT 1 FROM fc_scores f "
            "WHERE f.session_id::text = CASE WHEN c.candidate_key IS NULL THEN e->>2 ELSE e->0->>(SELECT "
            "k.i - 1 FROM jsonb_array_elements_text(c.key_columns) WITH ORDINALITY k(name, i) "
            "WHERE k.name = c.candidate_key)::int END)",
            (run_id,),
        ).fetchone()
    if results != {"written": expected}:
        raise SystemExit(f"apply results {results}, expected {expected} written")
    if missing is None or missing[0] != 0:
        raise SystemExit(f"{missing} fc_scores rows listed in the ledger are not in the database")


# ------------------------------------------------------------------------------------------------------ driver


def one_run(server: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    with _scratch_database(server) as url, tempfile.TemporaryDirectory(prefix="gf_bench_apply_") as tmp:
        env = Environment("bench", "staging", _sa_url(url))
        with Database(env, pool_size=2) as db:
            init_schema(db)
            load_reference_data(db)
            t0 = time.perf_counter()
            report = seed_scenario(db, "synthetic", sessions=n, missing_fraction=1.0)
            seed_s = time.perf_counter() - t0
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        http, http_cpu, http_n = 0.0, 0.0, 0
        if args.http_sample > 0:
            pool = sorted(report.missing_both + report.missing_fc_only)
            want = min(len(pool), args.http_sample + args.http_warmup)
            step = max(1, len(pool) // max(1, want))
            chosen = pool[::step][:want]
            http_n = len(chosen) - args.http_warmup
            http, http_cpu = measure_http(url, chosen[: args.http_warmup], chosen[args.http_warmup :], args.http_server)

        now = datetime.now(UTC)
        # Plan and apply run as a user's would: through the transaction pooler when there is one.
        served_url = _with_database(args.pooler_url, url.rsplit("/", 1)[1].split("?")[0]) if args.pooler_url else url
        pooler: Pooler = "transaction" if args.pooler_url else "none"
        served = Environment("bench", "staging", _sa_url(served_url), pooler=pooler)
        with Database(served, pool_size=2) as db:
            t0 = time.perf_counter()
            plan = build_plan(
                db,
                served,
                PrismJob(),
                PlanParams(since=WINDOW_START, rate="unlimited", batch_size=args.batch_size),
                now=now,
                artifacts_dir=Path(tmp),
            )
            plan_s = time.perf_counter() - t0
        candidates = len(plan.plan.runnable)
        busy = machine_busy_seconds()
        floor, floor_n, floor_wal = measure_floor(url, plan.plan, now)
        floor_cpu = (machine_busy_seconds() - busy) / floor_n * 1000.0
        busy = machine_busy_seconds()
        applied = measure_apply(served_url, url, plan.json_path, Path(tmp), args.batch_size, pooler)
        apply_cpu = (machine_busy_seconds() - busy) / applied["sessions"] * 1000.0
        _verify(url, plan.run_id, candidates)
        apply_rate = applied["sessions"] / applied["seconds"]
        out = {
            "sessions": n,
            "candidates": candidates,
            "seed_seconds": seed_s,
            "plan_seconds": plan_s,
            "floor_per_s": floor,
            "apply_per_s": apply_rate,
            "apply_cpu_ms_per_session": applied["cpu_seconds"] / applied["sessions"] * 1000.0,
            "machine_cpu_ms_floor": floor_cpu,
            "machine_cpu_ms_apply": apply_cpu,
            "machine_cpu_ms_http": http_cpu,
            "http_per_s": http,
            "apply_maxrss_mb": applied["maxrss_mb"],
            "apply_vmhwm_mb": applied["vmhwm_mb"] or 0.0,
            "vs_floor": apply_rate / floor,
            "vs_http": apply_rate / http if http else 0.0,
            "http_sample": http_n,
            "floor_sessions": floor_n,
            "floor_wal_cluster_mb": floor_wal.cluster_bytes / 1e6,
            "floor_wal_database_mb": floor_wal.database_bytes / 1e6,
            "apply_wal_cluster_mb": applied["wal_cluster_mb"],
            "apply_wal_database_mb": applied["wal_database_mb"],
            "apply_wal_ledger_mb": applied["wal_ledger_mb"],
            "floor_wal_no_fpi_mb": floor_wal.database_no_fpi_bytes / 1e6,
            "apply_wal_no_fpi_mb": applied["wal_database_no_fpi_mb"],
            "wal_ratio_no_fpi": applied["wal_database_no_fpi_mb"] / max(1e-9, floor_wal.database_no_fpi_bytes / 1e6),
            "wal_ratio_cluster": applied["wal_cluster_mb"] / max(1e-9, floor_wal.cluster_bytes / 1e6),
            "wal_ratio_database": applied["wal_database_mb"] / max(1e-9, floor_wal.database_bytes / 1e6),
            "load_1min": os.getloadavg()[0],
        }
        print(f"  WAL by relation (MB), floor: {_top(floor_wal.by_relation)}", flush=True)
        print(f"  WAL by relation (MB), apply: {_top(applied['wal_by_relation_mb'], scale=1.0)}", flush=True)
        print(
            f"  N={n:,}: seed {seed_s:.0f} s, plan {plan_s:.1f} s; floor {floor:.0f}/s, apply {apply_rate:.0f}/s "
            f"({out['apply_cpu_ms_per_session']:.2f} ms CPU/session, peak RSS {applied['maxrss_mb']:.0f} MB, "
            f"VmHWM {out['apply_vmhwm_mb']:.0f} MB), "
            f"HTTP {http:.1f}/s; b/a {out['vs_floor']:.2f}, b/c {out['vs_http']:.0f}; machine CPU ms/session: "
            f"floor {floor_cpu:.2f}, apply {apply_cpu:.2f}, HTTP {http_cpu:.2f}; WAL MB (cluster / this database): "
            f"floor {out['floor_wal_cluster_mb']:.1f} / {out['floor_wal_database_mb']:.1f}, apply "
            f"{out['apply_wal_cluster_mb']:.1f} / {out['apply_wal_database_mb']:.1f}, ratio "
            f"{out['wal_ratio_cluster']:.2f} / {out['wal_ratio_database']:.2f}; load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        return out


def _top(by_relation: dict[str, Any], scale: float = 1e6) -> str:
    return ", ".join(f"{name} {value / scale:.1f}" for name, value in by_relation.items())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child-apply"]:
        _child_apply(argv[1], argv[2], argv[3], int(argv[4]), "transaction" if argv[5] == "transaction" else "none")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sessions", default="10000,100000", help="sizes, comma-separated (default 10000,100000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per size; medians are reported (default 3)")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--http-sample", type=int, default=0, help="sessions timed over HTTP (default 0: not run)")
    parser.add_argument("--http-warmup", type=int, default=20)
    parser.add_argument("--http-server", choices=("thread", "process"), default="thread")
    parser.add_argument("--server", default=os.environ.get("GATEFILL_TEST_DATABASE_URL", DEFAULT_SERVER))
    parser.add_argument("--json", type=Path, help="also write every run and the medians here")
    parser.add_argument("--pgbouncer", action="store_true", help="plan and apply through PgBouncer (transaction mode)")
    parser.add_argument("--pooler-url", help="plan and apply through this transaction pooler in front of --server")
    args = parser.parse_args(argv)
    bouncer = start_pgbouncer(args.server) if args.pgbouncer else None
    if bouncer is not None:
        args.pooler_url = bouncer.url(args.server.replace("postgresql+psycopg://", "postgresql://"), "postgres")
    print(f"plan and apply: {'through ' + args.pooler_url if args.pooler_url else 'direct'}", flush=True)
    try:
        return _run_all(args)
    finally:
        if bouncer is not None:
            bouncer.stop()


def _run_all(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in args.sessions.split(",") if x.strip()]
    command = shlex.join([sys.executable, *sys.argv])
    print("command:", command, flush=True)
    runs: dict[int, list[dict[str, Any]]] = {}
    for n in sizes:
        for i in range(args.runs):
            print(f"size {n:,}, run {i + 1}/{args.runs}", flush=True)
            runs.setdefault(n, []).append(one_run(args.server, n, args))
    summary = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    print("\nmedians (per size):")
    print(
        f"{'sessions':>9} {'floor/s':>8} {'apply/s':>8} {'b/a':>5} {'RSS MB':>7} {'CPU ms':>7} "
        f"{'WAL a MB':>9} {'WAL b MB':>9} {'b/a WAL':>8} {'load':>5}"
    )
    for n, m in summary.items():
        print(
            f"{n:>9,} {m['floor_per_s']:>8.0f} {m['apply_per_s']:>8.0f} {m['vs_floor']:>5.2f} "
            f"{m['apply_maxrss_mb']:>7.0f} {m['apply_cpu_ms_per_session']:>7.2f} {m['floor_wal_cluster_mb']:>9.1f} "
            f"{m['apply_wal_cluster_mb']:>9.1f} {m['wal_ratio_cluster']:>8.2f} {m['load_1min']:>5.1f}"
        )
    print(
        "WAL of this database alone (pg_walinspect, records naming its blocks), MB: floor / apply = ratio "
        "(of the apply's: the ledger's gatefill_* tables)"
    )
    for n, m in summary.items():
        print(
            f"{n:>9,} {m['floor_wal_database_mb']:.1f} / {m['apply_wal_database_mb']:.1f} = "
            f"{m['wal_ratio_database']:.2f} (ledger {m['apply_wal_ledger_mb']:.1f}); without full-page images "
            f"{m['floor_wal_no_fpi_mb']:.1f} / {m['apply_wal_no_fpi_mb']:.1f} = {m['wal_ratio_no_fpi']:.2f}"
        )
    print("machine CPU ms per session (all cores: this bench, its children, the Postgres backends, anything else):")
    for n, m in summary.items():
        http = f", HTTP {m['machine_cpu_ms_http']:.2f} ({m['http_per_s']:.1f}/s)" if m["http_per_s"] else ""
        print(f"{n:>9,} floor {m['machine_cpu_ms_floor']:.2f}, apply {m['machine_cpu_ms_apply']:.2f}{http}")
    rss = [m["apply_maxrss_mb"] for m in summary.values()]
    goals = {
        f"apply >= {GOAL_VS_FLOOR}x floor": all(m["vs_floor"] >= GOAL_VS_FLOOR for m in summary.values()),
        f"apply WAL <= {GOAL_WAL_RATIO:g}x floor's (this database)": all(
            m["wal_ratio_database"] <= GOAL_WAL_RATIO for m in summary.values()
        ),
        f"peak RSS <= {GOAL_RSS_MB:g} MB": all(r <= GOAL_RSS_MB for r in rss),
        "RSS flat across sizes (max/min <= 1.2)": len(rss) < 2 or max(rss) / min(rss) <= 1.2,
    }
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")
    print(f"cpus: {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}; command: {command}")
    if args.json:
        args.json.write_text(
            json.dumps({"command": command, "runs": runs, "medians": summary, "goals": goals}, indent=2),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
