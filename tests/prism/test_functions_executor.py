"""The ``functions`` executor against a real uvicorn server running the functions app on the same database (SQLite and
Postgres): the real apply loop drives it (``gatefill.apply._commit_batch`` swapped for ``commit_batch``), and what it
writes is compared with the local executor's rows on a twin database, with the ledger (every fc_scores, profiles and
fn_logs row the calls wrote, with before-images) and with an exact rollback. Also: retries with backoff on 503/429 and
connection errors, final 4xx, interruptions between the calls and the commit followed by recovery, and live writers
racing the calls.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from gatefill import apply as apply_module
from gatefill import ledger
from gatefill.apply import ApplyOptions, ApplyResult, RunPaused, apply_plan, measure_backfill_gate
from gatefill.clock import RealClock, SimulatedClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.errors import ConfigError, DataError
from gatefill.job import BatchTask
from gatefill.ledger import RunStatus
from gatefill.plan import Plan, PlanParams, build_plan
from gatefill.prism.functions_executor import (
    FunctionsExecutor,
    FunctionsUnavailable,
)
from gatefill.prism.job import PrismJob
from gatefill.prism.platform.server import create_app, serve_in_thread
from gatefill.prism.platform.service import CallContext, PrismService
from gatefill.prism.sandbox.seed import seed_scenario
from gatefill.prism.schema import (
    PROFILE_RESULT_COLUMNS,
    fc_scores,
    fn_logs,
    init_schema,
    load_reference_data,
    profiles,
)
from gatefill.reports.apply import write_apply_artifacts
from gatefill.rollback import rollback_run
from tests.conftest import create_pg_database, drop_pg_database, pg_env, sqlite_env
from tests.prism.conftest import SERVICE_KEY

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)
#: The tables the backfill or live users write, with their primary keys (digests and ledger coverage use them).
KEYED = {
    "assessment_sessions": ("id",),
    "fc_scores": ("session_id", "version", "fc_kind"),
    "profiles": ("id",),
    "fn_logs": ("id",),
}


class Killed(Exception):
    """Stands for the worker dying at a chosen point (nothing after it runs)."""


# ---------------------------------------------------------------------------------------------------- databases


class Seeded:
    """A staging-2025-09-17 database of one dialect, seeded once per module and cloned per test."""

    def __init__(self, dialect: str, tmp: Path) -> None:
        self.dialect = dialect
        self.tmp = tmp
        self.clones: list[str] = []
        if dialect == "sqlite":
            self.source = tmp / "seeded.db"
            db = Database(sqlite_env(self.source), create=True)
        else:
            self.source_name = create_pg_database()
            db = Database(pg_env(self.source_name))
        try:
            init_schema(db)
            load_reference_data(db)
            seed_scenario(db, "staging-2025-09-17")
            ledger.init_ledger(db)
        finally:
            db.dispose()

    def clone(self, name: str) -> Environment:
        if self.dialect == "sqlite":
            path = self.tmp / f"{name}.db"
            shutil.copyfile(self.source, path)
            env = sqlite_env(path, env_name="staging")
        else:
            db_name = create_pg_database(self.source_name)
            self.clones.append(db_name)
            env = pg_env(db_name, env_name="staging")
        return dataclasses.replace(env, service_role_key_env="GATEFILL_TEST_SERVICE_ROLE_KEY")

    def close(self) -> None:
        if self.dialect == "postgresql":
            for name in [*self.clones, self.source_name]:
                drop_pg_database(name)


def unleased(conn: sa.Connection) -> None:
    """The fence for batches these tests drive directly, without apply's run lease (no other process competes for
    the run here); the tests that go through ``apply_plan`` get the real lease's fence."""


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    s = Seeded(request.param, tmp_path_factory.mktemp(f"fx-{request.param}"))
    yield s
    s.close()


def make_plan(db: Database, env: Environment, artifacts: Path, **params: Any) -> Plan:
    # profiles="stale" adds the ten stale profiles as rescores: updates with before-images, not only inserts.
    base: dict[str, Any] = {"since": SINCE, "rate": "unlimited", "profiles": "stale"}
    plan = build_plan(db, env, PrismJob(), PlanParams(**{**base, **params}), now=START, artifacts_dir=artifacts)
    return plan.plan


def data(db: Database) -> dict[str, Any]:
    """The rows that must equal the local executor's: FC scores and the profile result columns, per session."""
    with db.connect() as conn:
        fc = sorted(
            (r.session_id, r.version, r.fc_kind, json.dumps(r.scores_json, sort_keys=True), r.blocks_answered)
            for r in conn.execute(sa.select(fc_scores))
        )
        prof = sorted(
            (r.session_id, r.results_version, r.version, *(json.dumps(r._mapping[c]) for c in PROFILE_RESULT_COLUMNS))
            for r in conn.execute(sa.select(profiles))
        )
    return {"fc_scores": fc, "profiles": prof}


def snapshot(db: Database) -> dict[str, dict[str, str]]:
    """table → row key → the row exactly as stored (SQLite's raw values, Postgres's text of the row)."""
    out: dict[str, dict[str, str]] = {}
    with db.connect() as conn:
        for name, pk in KEYED.items():
            order = ", ".join(pk)
            if db.caps.dialect == "postgresql":
                query = f"SELECT {', '.join(f't.{c}::text' for c in pk)}, t::text FROM {name} t ORDER BY {order}"
            else:
                query = f"SELECT {order}, * FROM {name} ORDER BY {order}"
            out[name] = {
                ledger.row_key(dict(zip(pk, row[: len(pk)], strict=True))): repr(tuple(row[len(pk) :]))
                for row in conn.exec_driver_sql(query)
            }
    return out


def assert_ledger_covers(db: Database, run_id: str, before: dict[str, dict[str, str]]) -> Counter[str]:
    """Every row inserted or changed since ``before`` is one ledger change of the run (inserts without a
    before-image, updates with one), and the ledger lists nothing else; returns the changes per table."""
    after = snapshot(db)
    assert after["assessment_sessions"] == before["assessment_sessions"]
    with db.connect() as conn:
        recorded = [(c.table, c.row_key, c.before is None) for c in ledger.changes_for(conn, run_id)]
    assert len(recorded) == len({(t, k) for t, k, _ in recorded}), "a row recorded twice"
    for table in ("fc_scores", "profiles", "fn_logs"):
        inserted = set(after[table]) - set(before[table])
        updated = {k for k in set(after[table]) & set(before[table]) if after[table][k] != before[table][k]}
        assert set(before[table]) <= set(after[table]), f"{table}: rows vanished"
        assert {k for t, k, new in recorded if t == table and new} == inserted, table
        assert {k for t, k, new in recorded if t == table and not new} == updated, table
    return Counter(t for t, _, _ in recorded)


# ---------------------------------------------------------------------------------------------------- the server


Faults = dict[str, list[tuple[int, dict[str, str]] | None]]


@contextmanager
def functions_server(env: Environment, *, echo_request_id: bool = True, faults: Faults | None = None) -> Iterator[str]:
    """The functions app on ``env``'s database in a uvicorn thread; yields the functions URL.

    ``echo_request_id`` makes the server stamp the caller's ``X-Request-Id`` into its events (the server change the
    executor asks for); without it the server stamps ids of its own, as today's server does (and keeps doing so here
    once that change is made, so the fallback attribution stays tested). ``faults`` maps a function to the answers
    its next requests get instead of reaching it (``None``: let that request through).
    """
    server_db = Database(env, pool_size=3)
    try:
        app = create_app(env, server_db, clock=RealClock(), service_role_key=SERVICE_KEY)
        if faults is not None:
            _inject(app, faults)
        handler = app.state.gatefill
        original = handler.context

        def context(request: Request) -> CallContext:
            ctx: CallContext = original(request)
            presented = request.headers.get("x-request-id")
            if echo_request_id and presented and handler.authorised(request):
                return dataclasses.replace(ctx, request_id=presented)
            return dataclasses.replace(ctx, request_id=uuid.uuid4().hex)

        handler.context = context
        with serve_in_thread(app) as url:
            yield f"{url}/functions/v1"
    finally:
        server_db.dispose()


def _inject(app: FastAPI, faults: Faults) -> None:
    @app.middleware("http")
    async def inject(request: Request, call_next: Callable[[Request], Any]) -> Response:
        queue = faults.get(request.url.path.rsplit("/", 1)[-1])
        if queue:
            planned = queue.pop(0)
            if planned is not None:
                status, headers = planned
                return JSONResponse({"error": "injected", "code": "INJECTED"}, status_code=status, headers=headers)
        response: Response = await call_next(request)
        return response


def executor(url: str, sleeps: list[float] | None = None, **options: Any) -> FunctionsExecutor:
    record = sleeps if sleeps is not None else []
    return FunctionsExecutor(url, SERVICE_KEY, timeout=20, sleep=record.append, **options)


def apply_with(
    ex: FunctionsExecutor,
    db: Database,
    env: Environment,
    body: Plan,
    artifacts: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> ApplyResult:
    """The real apply loop with the functions executor in place of the local batch."""
    with monkeypatch.context() as mp:
        mp.setattr(apply_module, "_commit_batch", ex.commit_batch)
        return apply_plan(
            db,
            env,
            PrismJob(),
            body,
            options=ApplyOptions(approve_as="test", rate="unlimited"),
            clock=SimulatedClock(START),
            artifacts_dir=artifacts,
        )


def task(plan: Plan, batch_no: int, keys: list[str]) -> BatchTask:
    """A batch of the plan's candidates as apply hands it to an executor."""
    by_key = {c.key: c for c in plan.candidates}
    return BatchTask(plan.run_id, batch_no, "test", tuple(by_key[k] for k in keys))


@pytest.fixture(scope="module")
def local_reference(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The local executor's rows and results on a twin of the seeded database."""
    env = seeded.clone("local-twin")
    art = tmp_path_factory.mktemp("local")
    with Database(env) as db:
        body = make_plan(db, env, art)
        result = apply_plan(
            db,
            env,
            PrismJob(),
            body,
            options=ApplyOptions(approve_as="test", rate="unlimited"),
            clock=SimulatedClock(START),
            artifacts_dir=art,
        )
        assert result.status is RunStatus.SUCCEEDED
        return {"data": data(db), "counts": result.counts}


# ---------------------------------------------------------------------------------------------------- tests


def test_apply_through_the_functions_equals_local_and_rolls_back_exactly(
    seeded: Seeded, local_reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = seeded.clone("uninterrupted")
    art = tmp_path / "art"
    with Database(env) as db, functions_server(env) as url, executor(url) as ex:
        body = make_plan(db, env, art)
        pre = snapshot(db)
        result = apply_with(ex, db, env, body, art, monkeypatch)
        assert result.status is RunStatus.SUCCEEDED
        assert result.counts == local_reference["counts"] == Counter({"written": 49})
        assert data(db) == local_reference["data"]
        per_table = assert_ledger_covers(db, result.run_id, pre)
        assert per_table["fc_scores"] == 39 and per_table["profiles"] == 23 and per_table["fn_logs"] > 0
        with db.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(ledger.intents)).scalar_one() == 0
            details = [b.detail for b in conn.execute(sa.select(ledger.batches.c.detail))]
        assert {d["fn_logs_attribution"] for d in details} == {"request_id"}
        gate = measure_backfill_gate(db, env, PrismJob(), result.run_id, clock=SimulatedClock(START), artifacts_dir=art)
        report = write_apply_artifacts(db, PrismJob(), gate, art)
        assert report.verdict == "PASS", [(c.name, c.summary) for c in report.checks if c.verdict != "PASS"]
        # The key is nowhere: artifacts, batch logs, ledger rows, the server's events.
        for path in art.rglob("*"):
            if path.is_file():
                assert SERVICE_KEY not in path.read_text(encoding="utf-8"), path
        with db.connect() as conn:
            for table in (ledger.change_sets, ledger.session_results, ledger.batches, fn_logs):
                assert SERVICE_KEY not in repr(conn.execute(sa.select(table)).all())
        rollback_run(db, result.run_id, PrismJob().written_tables(), now=START, artifacts_dir=art)
        assert snapshot(db) == pre


def test_interrupted_between_calls_and_commit_then_recovered(
    seeded: Seeded, local_reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after batch 2's calls (before its commit), then killed again in the middle of batch 4's calls; against
    today's server (request ids not echoed). Recovery and resume equal an uninterrupted run, with a complete ledger."""
    env = seeded.clone("interrupted")
    art = tmp_path / "art"
    with Database(env) as db, functions_server(env, echo_request_id=False) as url:
        body = make_plan(db, env, art)
        run_id = body.run_id
        pre = snapshot(db)
        ex = executor(url)
        original_record = ex._record

        def die_before_commit(*args: Any, **kwargs: Any) -> Any:
            if args[1][0].batch_no == 2:  # the batch's intents
                raise Killed("killed after the calls of batch 2")
            return original_record(*args, **kwargs)

        monkeypatch.setattr(ex, "_record", die_before_commit)
        with pytest.raises(Killed):
            apply_with(ex, db, env, body, art, monkeypatch)
        ex.close()
        with db.connect() as conn:
            assert ledger.pending_batches(conn, run_id) == [2]
            assert ledger.committed_batches(conn, run_id) == {1}
            assert ledger.get_run(conn, run_id).status is RunStatus.RUNNING
        # The calls of batch 2 wrote rows that the ledger does not list yet...
        unrecorded = set(snapshot(db)["fc_scores"]) - set(pre["fc_scores"])
        with db.connect() as conn:
            recorded = {c.row_key for c in ledger.changes_for(conn, run_id) if c.table == "fc_scores"}
        assert unrecorded - recorded

        # ...until a new worker recovers the batch: calls whose rows are there are not made again.
        sleeps: list[float] = []
        with executor(url, sleeps) as fresh:
            calls: list[str] = []
            real_call = fresh._call

            def counting(function: str, body_: Any, request_id: str) -> Any:
                calls.append(function)
                return real_call(function, body_, request_id)

            monkeypatch.setattr(fresh, "_call", counting)
            recovered = fresh.recover(db, PrismJob(), run_id, clock=SimulatedClock(START), fence=unleased)
            assert [r.batch_no for r in recovered] == [2]
            assert calls == []
            assert recovered[0].log()["recovered"] is True
            assert recovered[0].log()["fn_logs_attribution"] == "session_window"
            with db.connect() as conn:
                assert ledger.pending_batches(conn, run_id) == []
                assert ledger.committed_batches(conn, run_id) == {1, 2}

            # Second interruption: the server goes away in the middle of batch 4's calls.
            batch_4 = set(body.batches[3].keys)
            made_in_4: list[str] = []

            def dies_mid_batch(function: str, body_: Any, request_id: str) -> Any:
                if body_["session_id"] in batch_4:
                    made_in_4.append(function)
                if len(made_in_4) == 2:  # the second call of batch 4
                    raise FunctionsUnavailable(fresh.display_url, function, 3, "ConnectError: refused")
                return real_call(function, body_, request_id)

            monkeypatch.setattr(fresh, "_call", dies_mid_batch)
            # Today apply lets the error through; once wired for the functions executor it pauses the run instead.
            with pytest.raises((FunctionsUnavailable, RunPaused)):
                apply_with(fresh, db, env, body, art, monkeypatch)
            with db.connect() as conn:
                assert ledger.pending_batches(conn, run_id) == [4]
            # apply's own retry path: the same batch again finishes it (here without calling recover first).
            monkeypatch.setattr(fresh, "_call", real_call)
            result = apply_with(fresh, db, env, body, art, monkeypatch)
        assert result.status is RunStatus.SUCCEEDED
        assert data(db) == local_reference["data"]
        with db.connect() as conn:
            results = ledger.session_results_for(conn, run_id)
            assert Counter(results.values()) == local_reference["counts"]
            assert sorted(ledger.committed_batches(conn, run_id)) == list(range(1, len(body.batches) + 1))
        assert_ledger_covers(db, run_id, pre)
        assert sleeps == []
        rollback_run(db, run_id, PrismJob().written_tables(), now=START, artifacts_dir=art)
        assert snapshot(db) == pre


@pytest.mark.parametrize("seeded", ["sqlite"], indirect=True)
def test_retries_backoff_final_4xx_and_a_failing_session_in_a_batch(seeded: Seeded, tmp_path: Path) -> None:
    """503 twice then 200 is retried; 429 waits for Retry-After; a 400 is final and fails only its session; 5xx past
    the retries fails its session; the other sessions of the batch are written."""
    env = seeded.clone("retries")
    faults: Faults = {
        # s1: two 503s, then through; s2, s3: through; s4: 503 on every attempt (retries=2 → 3 attempts).
        "score_fc_session": [(503, {}), (503, {}), None, None, None, (503, {}), (503, {}), (503, {})],
        # s1: 429 with Retry-After, then through; s2: 400 (final); s3: through.
        "score_prism": [(429, {"Retry-After": "4"}), None, (400, {})],
    }
    sleeps: list[float] = []
    with Database(env) as db, functions_server(env, faults=faults) as url:
        body = make_plan(db, env, tmp_path / "art")
        keys = [c.key for c in body.candidates if c.category == "profile+fc"][:4]
        with executor(url, sleeps, retries=2, backoff_base=0.5, backoff_max=3.0) as ex:
            batch = ex.commit_batch(db, PrismJob(), task(body, 1, keys), SimulatedClock(START), unleased)
            sessions, log = batch.sessions, batch.log()
        results = {s.key: s for s in sessions}
        assert [results[k].result for k in keys] == ["written", "failed", "written", "failed"]
        calls = {k: [op for op in results[k].operations if "call" in op] for k in keys}
        assert [(c["call"], c["status"], c["attempts"]) for c in calls[keys[0]]] == [
            ("score_fc_session", 200, 3),
            ("score_prism", 200, 2),
        ]
        assert [(c["call"], c["status"], c["attempts"]) for c in calls[keys[1]]] == [
            ("score_fc_session", 200, 1),
            ("score_prism", 400, 1),
        ]
        assert results[keys[1]].error == "score_prism answered HTTP 400 INJECTED: injected"
        assert [(c["call"], c["status"], c["attempts"]) for c in calls[keys[3]]] == [("score_fc_session", 503, 3)]
        assert "HTTP 503" in (results[keys[3]].error or "") and "after 3 attempts" in (results[keys[3]].error or "")
        # Backoff: 0.5·2^(n-1) times jitter in [0.5, 1.5); Retry-After 4 is capped at backoff_max 3.
        assert len(sleeps) == 5
        assert 0.25 <= sleeps[0] < 0.75 and 0.5 <= sleeps[1] < 1.5
        assert sleeps[2] == 3.0
        assert 0.25 <= sleeps[3] < 0.75 and 0.5 <= sleeps[4] < 1.5
        # The failed s2 keeps its FC row (written and recorded, so rollback removes it); s4 wrote nothing.
        with db.connect() as conn:
            changes = {(c.table, c.candidate) for c in ledger.changes_for(conn, body.run_id)}
        assert ("fc_scores", keys[1]) in changes and ("profiles", keys[1]) not in changes
        assert not {t for t, s in changes if s == keys[3] and t != "fn_logs"}
        assert log["sessions_failed"] == 2 and log["sessions_written"] == 2
        assert SERVICE_KEY not in json.dumps(log)


@pytest.mark.parametrize("seeded", ["sqlite"], indirect=True)
def test_unreachable_server_stops_the_batch_and_recovery_finishes_it(seeded: Seeded, tmp_path: Path) -> None:
    env = seeded.clone("unreachable")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = f"http://127.0.0.1:{port}/functions/v1"
    sleeps: list[float] = []
    with Database(env) as db:
        body = make_plan(db, env, tmp_path / "art")
        run_id = body.run_id
        keys = [c.key for c in body.candidates if c.category == "profile+fc"][:2]
        with executor(dead, sleeps, retries=2) as ex, pytest.raises(FunctionsUnavailable) as stopped:
            ex.commit_batch(db, PrismJob(), task(body, 1, keys), SimulatedClock(START), unleased)
        assert "after 3 attempt(s)" in str(stopped.value) and SERVICE_KEY not in str(stopped.value)
        assert len(sleeps) == 2
        with db.connect() as conn:
            assert ledger.pending_batches(conn, run_id) == [1]
        # A different batch may not start while calls of another one are unaccounted for.
        with executor(dead) as ex, pytest.raises(DataError, match="recover them before batch 2"):
            ex.commit_batch(db, PrismJob(), task(body, 2, keys[:1]), SimulatedClock(START), unleased)
        with functions_server(env) as url, executor(url) as ex:
            recovered = ex.recover(db, PrismJob(), run_id, clock=SimulatedClock(START), fence=unleased)
        assert [(r.batch_no, [s.result for s in r.sessions]) for r in recovered] == [(1, ["written", "written"])]
        with db.connect() as conn:
            assert ledger.pending_batches(conn, run_id) == []
            assert ledger.session_results_for(conn, run_id) == dict.fromkeys(keys, "written")


@pytest.mark.parametrize("seeded", ["sqlite"], indirect=True)
def test_live_writers_racing_the_calls_are_left_alone(
    seeded: Seeded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session finalized by a live user after the intent but before its calls is skipped; one finalized between
    our score_fc_session and score_prism calls is reported already_present and nothing of it is recorded. Rollback
    then restores everything else exactly and leaves the live rows."""
    env = seeded.clone("live")
    with Database(env) as db, functions_server(env) as url, executor(url) as ex:
        body = make_plan(db, env, tmp_path / "art")
        run_id = body.run_id
        keys = [c.key for c in body.candidates if c.category == "profile+fc"][:3]
        before_calls, between_calls, untouched = keys
        pre = snapshot(db)
        live = PrismService(db, clock=RealClock())

        def finalize(sid: str) -> None:
            live.finalize(sid, CallContext(now=RealClock().now()), results_base_url="http://127.0.0.1")

        real_call_session = ex._call_session
        real_call = ex._call

        def call_session(db_: Database, intent: Any, seen: Any, fc_version: str) -> Any:
            if intent.session_id == keys[0]:
                finalize(before_calls)  # after step 1, before any call of that session
            return real_call_session(db_, intent, seen, fc_version)

        def call(function: str, body_: Any, request_id: str) -> Any:
            if function == "score_prism" and body_["session_id"] == between_calls:
                finalize(between_calls)  # after our FC call, before our score_prism
            return real_call(function, body_, request_id)

        monkeypatch.setattr(ex, "_call_session", call_session)
        monkeypatch.setattr(ex, "_call", call)
        sessions = ex.commit_batch(db, PrismJob(), task(body, 1, keys), SimulatedClock(START), unleased).sessions
        results = {s.key: s for s in sessions}
        assert results[before_calls].result == "already_present"
        assert not [op for op in results[before_calls].operations if "call" in op]  # never called over
        assert results[between_calls].result == "already_present"
        assert results[untouched].result == "written"
        live_rows = snapshot(db)
        with db.connect() as conn:
            changes = list(ledger.changes_for(conn, run_id))
            log_ids = [int(json.loads(c.row_key)["id"]) for c in changes if c.table == "fn_logs"]
            payloads = conn.execute(sa.select(fn_logs.c.payload).where(fn_logs.c.id.in_(log_ids))).scalars().all()
        recorded_sessions = {c.candidate for c in changes if c.table != "fn_logs"}
        assert recorded_sessions == {untouched}
        # fn_logs: only our calls' events (the live finalize events are not ours), as the rows themselves say.
        assert len(payloads) == len(log_ids) > 0
        assert all(p["fn"] in ("score_fc_session", "score_prism") for p in payloads)
        with db.begin() as conn:
            # The run has to be in a state that may be rolled back; this test drove one batch by hand.
            ledger.transition(conn, run_id, RunStatus.RUNNING, now=START)
            ledger.transition(conn, run_id, RunStatus.SUCCEEDED, now=START)
        rollback_run(db, run_id, PrismJob().written_tables(), now=START, artifacts_dir=tmp_path / "art")
        after = snapshot(db)
        with db.connect() as conn:
            live_keys = {
                "fc_scores": {
                    ledger.row_key({"session_id": s, "version": "v1.2", "fc_kind": "functions"})
                    for s in (before_calls, between_calls)
                },
                "profiles": {
                    ledger.row_key({"id": i})
                    for i in conn.execute(
                        sa.select(profiles.c.id).where(profiles.c.session_id.in_([before_calls, between_calls]))
                    ).scalars()
                },
                "assessment_sessions": {ledger.row_key({"id": s}) for s in (before_calls, between_calls)},
                "fn_logs": {
                    ledger.row_key({"id": e.id})
                    for e in conn.execute(sa.select(fn_logs.c.id, fn_logs.c.payload))
                    if (e.payload or {}).get("fn") == "finalizeAssessment"
                },
            }
        for table in KEYED:
            kept = {k: v for k, v in after[table].items() if k not in live_keys[table]}
            assert kept == {k: v for k, v in pre[table].items() if k not in live_keys[table]}, table
            # The live rows are still there after rollback, exactly as the live writers (and our race) left them.
            assert {k: after[table].get(k) for k in live_keys[table]} == {
                k: live_rows[table].get(k) for k in live_keys[table]
            }, table
            assert all(after[table].get(k) is not None for k in live_keys[table]), table


def test_config_errors_are_one_line_and_never_show_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    env = Environment("staging", "staging", "sqlite:///x.db", service_role_key_env="GATEFILL_FX_KEY")
    monkeypatch.delenv("GATEFILL_FX_KEY", raising=False)
    with pytest.raises(ConfigError, match="functions_url is not set"):
        FunctionsExecutor.from_env(env)
    with_url = dataclasses.replace(env, functions_url="http://127.0.0.1:1/functions/v1")
    with pytest.raises(ConfigError, match="variable GATEFILL_FX_KEY") as missing:
        FunctionsExecutor.from_env(with_url)
    assert "\n" not in str(missing.value)
    monkeypatch.setenv("GATEFILL_FX_KEY", SERVICE_KEY)
    with FunctionsExecutor.from_env(with_url) as ex:
        assert SERVICE_KEY not in repr(ex) and SERVICE_KEY not in str(vars(ex).get("display_url"))
    with pytest.raises(ConfigError, match="must start with http"):
        FunctionsExecutor("ftp://example", SERVICE_KEY)
