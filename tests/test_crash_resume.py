"""kill -9 of an apply subprocess at ten different points, then resume: the final state equals an uninterrupted
run's and the ledger holds no duplicates. Also: a database that goes away mid-run pauses the run, which resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ApplyOptions, RunPaused, apply_plan
from gatefill.clock import SimulatedClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.lease import lease_name
from gatefill.ledger import RunStatus
from gatefill.plan import Plan, PlanParams, build_plan
from gatefill.prism.job import PrismJob
from gatefill.prism.sandbox.seed import seed_scenario
from gatefill.prism.schema import PROFILE_RESULT_COLUMNS, fc_scores, fn_logs, profiles
from tests.conftest import (
    _admin,
    create_pg_database,
    drop_pg_database,
    pg_env,
    sqlite_env,
)

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)
KILL_POINTS = [
    "before:1",
    "before:2",
    "before:5",
    "before:8",
    "mid:1:1",
    "mid:3:2",
    "mid:6:4",
    "ledger:2",
    "ledger:4",
    "ledger:7",
]


class Seeded:
    """A seeded staging database of one dialect that tests clone."""

    def __init__(self, dialect: str, tmp: Path) -> None:
        self.dialect = dialect
        self.tmp = tmp
        if dialect == "sqlite":
            self.source = tmp / "seeded.db"
            env = sqlite_env(self.source)
            db = Database(env, create=True)
        else:
            self.source_name = create_pg_database()
            env = pg_env(self.source_name)
            db = Database(env)
        from gatefill.prism.schema import init_schema, load_reference_data

        init_schema(db)
        load_reference_data(db)
        seed_scenario(db, "staging-2025-09-17")
        ledger.init_ledger(db)
        db.dispose()

    def clone(self, name: str) -> Environment:
        if self.dialect == "sqlite":
            path = self.tmp / f"{name}.db"
            shutil.copyfile(self.source, path)
            return sqlite_env(path, env_name="staging")
        return pg_env(create_pg_database(self.source_name), env_name="staging")

    def drop(self, env: Environment) -> None:
        if self.dialect == "postgresql":
            drop_pg_database(env.url.database or "")

    def close(self) -> None:
        if self.dialect == "postgresql":
            drop_pg_database(self.source_name)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    s = Seeded(request.param, tmp_path_factory.mktemp(f"seeded-{request.param}"))
    yield s
    s.close()


def plan_for(db: Database, env: Environment, artifacts: Path) -> Plan:
    plan = build_plan(
        db,
        env,
        PrismJob(),
        PlanParams(since=datetime(2025, 8, 1, tzinfo=UTC), batch_size=4),
        now=START,
        artifacts_dir=artifacts,
    )
    with db.begin() as conn:
        ledger.record_approval(
            conn, run_id=plan.run_id, gate="plan", approved_by="test", now=START, plan_hash=plan.hash
        )
    return plan.plan


def digest(db: Database, run_id: str) -> dict[str, Any]:
    """What an apply produced, without generated ids, tokens or timestamps (those differ between runs)."""
    with db.connect() as conn:
        fc = sorted(
            (r.session_id, r.version, r.fc_kind, json.dumps(r.scores_json, sort_keys=True), r.blocks_answered)
            for r in conn.execute(sa.select(fc_scores))
        )
        prof = sorted(
            tuple(
                [r.session_id, r.results_version, r.version]
                + [json.dumps(r._mapping[c], sort_keys=True) for c in PROFILE_RESULT_COLUMNS]
            )
            for r in conn.execute(sa.select(profiles))
        )
        events = Counter(
            (r.evt, (r.payload or {}).get("session_id"))
            for r in conn.execute(sa.select(fn_logs.c.evt, fn_logs.c.payload))
        )
        results = dict(ledger.session_results_for(conn, run_id))
        change_keys = [(c.table, c.row_key) for c in ledger.changes_for(conn, run_id)]
        batches = sorted(ledger.committed_batches(conn, run_id))
        status = ledger.get_run(conn, run_id).status
    assert len(change_keys) == len(set(change_keys)), "duplicate ledger changes"
    assert batches == list(range(1, len(batches) + 1)), f"batch numbers not contiguous: {batches}"
    return {
        "fc_scores": fc,
        "profiles": prof,
        "events": sorted(events.items()),
        "results": results,
        "changes_per_table": Counter(t for t, _ in change_keys),
        "status": status,
    }


@pytest.fixture(scope="module")
def reference(seeded: Seeded) -> dict[str, Any]:
    env = seeded.clone("reference")
    try:
        with Database(env) as db:
            body = plan_for(db, env, seeded.tmp / "art-ref")
            apply_plan(
                db,
                env,
                PrismJob(),
                body,
                options=ApplyOptions(rate="unlimited"),
                clock=SimulatedClock(START),
                artifacts_dir=seeded.tmp / "art-ref",
            )
            return digest(db, body.run_id)
    finally:
        seeded.drop(env)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_then_resume_equals_an_uninterrupted_run(
    seeded: Seeded, reference: dict[str, Any], point: str, tmp_path: Path
) -> None:
    env = seeded.clone(f"kill-{point.replace(':', '-')}")
    try:
        with Database(env) as db:
            body = plan_for(db, env, tmp_path / "art")
            plan_file = tmp_path / "plan.json"
            body.dump(plan_file)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests.workers.apply_killer",
                    env.database_url,
                    str(plan_file),
                    str(tmp_path / "art"),
                    point,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
            run_id = body.run_id
            with db.connect() as conn:
                assert ledger.get_run(conn, run_id).status is RunStatus.RUNNING
                stale = ledger.get_lease(conn, lease_name(run_id))
            # The killed apply left its lease (nothing released it); the resume takes it over once it has expired.
            assert stale is not None and stale.holder.pid != os.getpid() and stale.holder.command == "apply"
            wait_for_expiry(db, run_id)
            result = apply_plan(
                db,
                env,
                PrismJob(),
                body,
                options=ApplyOptions(rate="unlimited"),
                clock=SimulatedClock(START),
                artifacts_dir=tmp_path / "art",
            )
            assert result.status is RunStatus.SUCCEEDED
            assert digest(db, run_id) == reference
            with db.connect() as conn:
                reasons = [r for (r,) in conn.execute(sa.select(ledger.run_events.c.reason))]
                assert ledger.get_lease(conn, lease_name(run_id)) is None
            assert any(f"{stale.holder.host}:{stale.holder.pid}" in (r or "") and "took over" in r for r in reasons), (
                reasons
            )
    finally:
        seeded.drop(env)


def wait_for_expiry(db: Database, run_id: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while True:
        with db.connect() as conn:
            lease = ledger.get_lease(conn, lease_name(run_id))
        if lease is None or lease.expired:
            return
        assert time.monotonic() < deadline, f"lease never expired: {lease.describe()}"
        time.sleep(0.1)


@pytest.mark.parametrize("seeded", ["postgresql"], indirect=True)
def test_database_down_mid_run_pauses_and_resumes(seeded: Seeded, reference: dict[str, Any], tmp_path: Path) -> None:
    # The paused apply cannot release its lease while the database is away: the resume waits for it to expire.
    env = dataclasses.replace(seeded.clone("down"), lease_ttl=1.0)
    name = env.url.database or ""
    try:
        with Database(env) as db:
            body = plan_for(db, env, tmp_path / "art")

            def outage(batch_no: int) -> None:
                if batch_no == 4:
                    with _admin() as admin:
                        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                        admin.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()",
                            (name,),
                        )

            options = ApplyOptions(rate="unlimited", retry_attempts=3, retry_base_seconds=0.05)
            with pytest.raises(RunPaused) as paused:
                apply_plan(
                    db,
                    env,
                    PrismJob(),
                    body,
                    options=options,
                    clock=SimulatedClock(START),
                    artifacts_dir=tmp_path / "art",
                    before_batch=outage,
                )
            assert "database unreachable" in str(paused.value)
            assert f"gatefill apply {body.run_id}" in str(paused.value)
            with _admin() as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            db.engine.dispose()
            with db.connect() as conn:
                assert len(ledger.committed_batches(conn, body.run_id)) == 3
            wait_for_expiry(db, body.run_id)
            result = apply_plan(
                db, env, PrismJob(), body, options=options, clock=SimulatedClock(START), artifacts_dir=tmp_path / "art"
            )
            assert result.status is RunStatus.SUCCEEDED
            assert digest(db, body.run_id) == reference
    finally:
        try:
            with _admin() as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        except psycopg.Error:
            pass
        seeded.drop(env)
