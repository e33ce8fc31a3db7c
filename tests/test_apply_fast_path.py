"""The local executor's batch writes on SQLite and Postgres: exact after-images, one failing session recorded while the
rest of its batch commits (scoring refusal, a write error, a live race on Postgres), scoring_config drift seen at the
next batch, and the bulk input loader equal to the functions' own reader."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ApplyOptions, ApplyResult, apply_plan, measure_backfill_gate
from gatefill.clock import SimulatedClock
from gatefill.images import row_digest
from gatefill.ledger import RunStatus
from gatefill.plan import Plan, PlanParams, build_plan
from gatefill.prism import job as job_module
from gatefill.prism.inputs import load_reference_data_from_db, load_session_inputs
from gatefill.prism.job import PrismJob, _load_inputs
from gatefill.prism.sandbox.seed import SeedReport
from gatefill.prism.schema import assessment_responses, fc_scores, fn_logs, profiles, scoring_config
from gatefill.reports.apply import write_apply_artifacts
from tests.conftest import Seeder, Target

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)
TABLES = {"fc_scores": fc_scores, "profiles": profiles, "fn_logs": fn_logs}


@pytest.fixture
def staging(target: Target, seeder: Seeder) -> tuple[Target, SeedReport]:
    return target, seeder(target, "staging-2025-09-17")


def make_plan(target: Target, tmp_path: Path, batch_size: int = 100) -> Plan:
    plan = build_plan(
        target.db,
        target.env,
        PrismJob(),
        PlanParams(since=SINCE, batch_size=batch_size),
        now=START,
        artifacts_dir=tmp_path / "artifacts",
    )
    return plan.plan


def run_apply(target: Target, body: Plan, tmp_path: Path, **kwargs: Any) -> ApplyResult:
    return apply_plan(
        target.db,
        target.env,
        PrismJob(),
        body,
        options=ApplyOptions(rate="unlimited", approve_as="t"),
        clock=SimulatedClock(START),
        artifacts_dir=tmp_path / "artifacts",
        **kwargs,
    )


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}


def stored_row(conn: sa.Connection, table: str, key: dict[str, Any]) -> dict[str, Any] | None:
    t = TABLES[table]
    found = conn.execute(sa.select(t).where(*(t.c[k] == v for k, v in key.items()))).first()
    return _plain(dict(found._mapping)) if found is not None else None


def results_of(target: Target, run_id: str) -> dict[str, tuple[str, str | None]]:
    with target.db.connect() as conn:
        rows = conn.execute(
            sa.select(
                ledger.session_results.c.session_id, ledger.session_results.c.result, ledger.session_results.c.error
            ).where(ledger.session_results.c.run_id == run_id)
        )
        return {sid: (result, error) for sid, result, error in rows}


def changed_sessions(target: Target, run_id: str) -> Counter[str]:
    with target.db.connect() as conn:
        return Counter(c.candidate for c in ledger.changes_for(conn, run_id))


def test_every_after_image_equals_the_stored_row(staging: tuple[Target, SeedReport], tmp_path: Path) -> None:
    target, truth = staging
    body = make_plan(target, tmp_path)
    result = run_apply(target, body, tmp_path)
    assert result.status is RunStatus.SUCCEEDED
    assert result.counts == Counter({"written": 39})
    with target.db.connect() as conn:
        changes = list(ledger.changes_for(conn, result.run_id))
        tables = Counter(c.table for c in changes)
        assert tables["fc_scores"] == 39 and tables["profiles"] == len(truth.missing_both)
        assert tables["fn_logs"] >= 39
        for change in changes:
            key = json.loads(change.row_key)
            if change.table == "fn_logs":
                key = {"id": int(key["id"])}
            stored = stored_row(conn, change.table, key)
            assert change.before is None
            # What the ledger records of the after-image covers the whole row (every column) and digests exactly as
            # what a read-back gives.
            assert stored is not None and change.after_columns is None and change.after is None
            assert row_digest(TABLES[change.table], stored) == change.after_digest, (change.table, key)
        logged = conn.execute(sa.select(fn_logs.c.evt, fn_logs.c.payload)).all()
    # One event per session at least, each naming the run: its scoring's, or gatefill_backfill when it logged none.
    marked = Counter(p["session_id"] for _, p in logged if p.get("run_id") == result.run_id)
    assert len(marked) == 39 and tables["fn_logs"] == sum(marked.values())


def test_a_session_whose_profile_is_withheld_fails_alone(staging: tuple[Target, SeedReport], tmp_path: Path) -> None:
    target, truth = staging
    body = make_plan(target, tmp_path)
    victim = sorted(truth.missing_both)[3]
    # Between plan and apply an empty FC row appears: the FC write is then already present, and scoring withholds
    # the profile (scoring spec §7.3), so that session fails while the rest of its batch commits.
    with target.db.begin() as conn:
        conn.execute(
            fc_scores.insert().values(
                session_id=victim,
                version="v1.2",
                fc_kind="functions",
                scores_json={},
                blocks_answered=0,
                created_at=START,
            )
        )
    result = run_apply(target, body, tmp_path)
    assert result.status is RunStatus.COMPLETED_WITH_ERRORS
    assert result.counts == Counter({"written": 38, "failed": 1})
    outcome, error = results_of(target, result.run_id)[victim]
    assert outcome == "failed" and error is not None and "existing_fc_scores_empty" in error
    assert victim not in changed_sessions(target, result.run_id)
    with target.db.connect() as conn:
        assert conn.execute(sa.select(profiles.c.id).where(profiles.c.session_id == victim)).first() is None


def _install_failing_trigger(target: Target, session_id: str) -> None:
    """A write error for one session's fc_scores insert, from the database itself."""
    with target.db.begin() as conn:
        if target.dialect == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER gf_test_fail BEFORE INSERT ON fc_scores "
                f"WHEN NEW.session_id = '{session_id}' BEGIN SELECT RAISE(ABORT, 'injected write failure'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION gf_test_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.session_id = '{session_id}'::uuid THEN RAISE EXCEPTION 'injected write failure'; END IF; "
                "RETURN NEW; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER gf_test_fail BEFORE INSERT ON fc_scores FOR EACH ROW EXECUTE FUNCTION gf_test_fail()"
            )


def test_a_write_error_is_isolated_to_its_session(staging: tuple[Target, SeedReport], tmp_path: Path) -> None:
    target, truth = staging
    body = make_plan(target, tmp_path)
    victim = sorted(truth.missing_fc_only)[5]
    _install_failing_trigger(target, victim)
    result = run_apply(target, body, tmp_path)
    assert result.status is RunStatus.COMPLETED_WITH_ERRORS
    assert result.counts == Counter({"written": 38, "failed": 1})
    outcome, error = results_of(target, result.run_id)[victim]
    assert outcome == "failed" and error is not None and "injected write failure" in error
    changed = changed_sessions(target, result.run_id)
    assert victim not in changed and len(changed) == 38
    with target.db.connect() as conn:
        # The failed session left nothing behind, not even its events.
        logged = [
            p
            for (p,) in conn.execute(sa.select(fn_logs.c.payload))
            if (p or {}).get("session_id") == victim and (p or {}).get("source") == "gatefill"
        ]
        assert logged == []
        assert conn.execute(sa.select(fc_scores.c.session_id).where(fc_scores.c.session_id == victim)).first() is None
    # Everything the run did write is present as written, and its rollback verifies.
    gate = measure_backfill_gate(
        target.db,
        target.env,
        PrismJob(),
        result.run_id,
        clock=SimulatedClock(START),
        artifacts_dir=tmp_path / "artifacts",
        max_failures=1,
    )
    report = write_apply_artifacts(target.db, PrismJob(), gate, tmp_path / "artifacts")
    assert report.verdict == "PASS", [(c.name, c.summary) for c in report.checks if c.verdict != "PASS"]


@pytest.mark.postgres
def test_a_live_race_leaves_the_live_row_and_commits_the_rest(
    pg_target: Target, tmp_path: Path, seeder: Seeder
) -> None:
    target = pg_target
    truth = seeder(target, "staging-2025-09-17")
    body = make_plan(target, tmp_path)
    victim = sorted(truth.missing_both)[0]
    live_scores = {"Te": 1, "Ti": 2, "Fe": 3, "Fi": 4, "Ne": 5, "Ni": 6, "Se": 7, "Si": 8}
    name = target.env.url.database
    conninfo = target.url.replace("postgresql+psycopg://", "postgresql://", 1)
    outcome: dict[str, Any] = {}
    with psycopg.connect(conninfo) as live:
        # A live writer has inserted the row but not committed: apply's re-check cannot see it, its insert waits.
        live.execute(
            "INSERT INTO fc_scores (session_id, version, fc_kind, scores_json, blocks_answered, created_at) "
            "VALUES (%s, 'v1.2', 'functions', %s::jsonb, 6, now())",
            (victim, json.dumps(live_scores)),
        )

        def apply_in_thread() -> None:
            try:
                outcome["result"] = run_apply(target, body, tmp_path)
            except BaseException as exc:  # reported by the assertion below
                outcome["error"] = exc

        worker = threading.Thread(target=apply_in_thread)
        worker.start()
        deadline = time.monotonic() + 60
        with psycopg.connect(conninfo, autocommit=True) as watcher:
            while True:
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (name,)
                ).fetchone()
                if waiting is not None and waiting[0] > 0:
                    break
                assert worker.is_alive() and time.monotonic() < deadline, "apply never waited for the live row"
                time.sleep(0.05)
        live.commit()
        worker.join(60)
    assert "error" not in outcome, outcome.get("error")
    result: ApplyResult = outcome["result"]
    assert result.status is RunStatus.SUCCEEDED
    assert result.counts == Counter({"written": 38, "already_present": 1})
    state, error = results_of(target, result.run_id)[victim]
    assert state == "already_present" and error is not None and "raced by a live writer" in error
    assert victim not in changed_sessions(target, result.run_id)
    with target.db.connect() as conn:
        stored = conn.execute(sa.select(fc_scores.c.scores_json).where(fc_scores.c.session_id == victim)).scalar_one()
        assert stored == live_scores  # theirs stands
        assert conn.execute(sa.select(profiles.c.id).where(profiles.c.session_id == victim)).first() is None


def test_scoring_config_drift_shows_in_the_next_batch(
    staging: tuple[Target, SeedReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, _ = staging
    body = make_plan(target, tmp_path, batch_size=5)
    drifted_from = 3
    loads: list[int] = []
    real_load = load_reference_data_from_db

    def counting_load(conn: sa.Connection) -> Any:
        loads.append(1)
        return real_load(conn)

    monkeypatch.setattr(job_module, "load_reference_data_from_db", counting_load)

    def drift(batch_no: int) -> None:
        if batch_no == drifted_from:
            with target.db.begin() as conn:
                conn.execute(
                    scoring_config.update().where(scoring_config.c.key == "results_version").values(value="v1.2.0")
                )

    job = PrismJob()  # one job object for the whole run: its static reference data is cached
    result = apply_plan(
        target.db,
        target.env,
        job,
        body,
        options=ApplyOptions(rate="unlimited", approve_as="t"),
        clock=SimulatedClock(START),
        artifacts_dir=tmp_path / "artifacts",
        before_batch=drift,
    )
    assert result.counts == Counter({"written": 39})
    with target.db.connect() as conn:
        batch_of = {
            sid: n
            for sid, n in conn.execute(
                sa.select(ledger.session_results.c.session_id, ledger.session_results.c.batch_no)
            )
        }
        overridden = {
            p["session_id"]
            for (p,) in conn.execute(sa.select(fn_logs.c.payload).where(fn_logs.c.evt == "engine_version_override"))
        }
    assert overridden == {sid for sid, n in batch_of.items() if n >= drifted_from}
    assert overridden and len(overridden) < 39
    # The reference tables were read twice in all: for the first batch and after the drift, not once per batch.
    assert len(loads) == 2 and max(batch_of.values()) > 4


@pytest.mark.postgres
def test_bulk_loader_equals_the_functions_reader(pg_target: Target, seeder: Seeder) -> None:
    target = pg_target
    truth = seeder(target, "staging-2025-09-17")
    ids = sorted({*truth.candidates, *truth.completed[:20], *truth.no_fc_responses, *truth.insufficient_answers})
    repeated = truth.missing_both[0]
    with target.db.begin() as conn:
        # Without uniq_session_question a question can be answered twice; the later answer must win, as upstream.
        conn.exec_driver_sql("ALTER TABLE assessment_responses DROP CONSTRAINT uniq_session_question")
        first = conn.execute(
            sa.select(assessment_responses).where(assessment_responses.c.session_id == repeated).limit(1)
        ).one()
        again = {**dict(first._mapping), "answer_value": "5", "created_at": datetime(2025, 9, 17, 9, tzinfo=UTC)}
        again.pop("id")
        conn.execute(assessment_responses.insert().values(**again))
    with target.db.connect() as conn:
        existing = {
            sid: scores
            for sid, scores in conn.execute(
                sa.select(fc_scores.c.session_id, fc_scores.c.scores_json).where(
                    fc_scores.c.session_id.in_(ids), fc_scores.c.version == "v1.2", fc_scores.c.fc_kind == "functions"
                )
            )
        }
        assert _load_inputs(conn, ids, existing) == load_session_inputs(conn, ids)
        # That session took the functions' own re-read (ids and timestamps kept, so the latest answer wins).
        assert "created_at" in _load_inputs(conn, [repeated], {})[repeated].answers[0]
