"""Plan and apply on SQLite and Postgres against the seeded staging scenario: ground truth, exact rows, idempotence,
gate refusals, and a live writer finalizing candidates while apply runs."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ApplyOptions, apply_plan, measure_backfill_gate
from gatefill.clock import SimulatedClock
from gatefill.db import canonical_json
from gatefill.errors import GateBlocked, UsageError
from gatefill.job import BatchOutcome
from gatefill.ledger import RunStatus
from gatefill.plan import Plan, PlanParams, build_plan, plan_hash
from gatefill.prism import scoring
from gatefill.prism.inputs import load_reference_data_from_db, load_session_inputs
from gatefill.prism.job import PrismJob
from gatefill.prism.platform.service import CallContext, PrismService
from gatefill.prism.sandbox.seed import TEST_SESSION_A, TEST_SESSION_B, SeedReport
from gatefill.prism.schema import fc_scores, fn_logs, profiles
from gatefill.reports.apply import write_apply_artifacts
from tests.conftest import Seeder, Target

# Phase 1 and health also run through PgBouncer in transaction mode (the `pooled` target).
pytestmark = pytest.mark.pooled

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)


@pytest.fixture
def staging(target: Target, seeder: Seeder) -> tuple[Target, SeedReport]:
    return target, seeder(target, "staging-2025-09-17")


def make_plan(target: Target, tmp_path: Path, **params: object) -> Plan:
    plan = build_plan(
        target.db,
        target.env,
        PrismJob(),
        PlanParams(since=SINCE, **params),  # type: ignore[arg-type]
        now=START,
        artifacts_dir=tmp_path / "artifacts",
    )
    return plan.plan


def test_plan_matches_what_the_scenario_built(staging: tuple[Target, SeedReport], tmp_path: Path) -> None:
    target, truth = staging
    body = make_plan(target, tmp_path, priority=(TEST_SESSION_A, TEST_SESSION_B)).to_json()
    cats = {name: sorted(c["keys"]) for name, c in body["categories"].items()}
    assert cats["profile+fc"] == sorted(truth.missing_both)
    assert cats["fc_only"] == sorted(truth.missing_fc_only)
    assert cats.get("profile_only", []) == sorted(truth.missing_profile_only)
    assert cats["stale_profile"] == sorted(truth.stale_profile)
    assert cats["no_fc_responses"] == sorted(truth.no_fc_responses)
    assert cats["unresolvable_fc_options"] == sorted(truth.unresolvable_fc_options)
    assert cats["insufficient_answers"] == sorted(truth.insufficient_answers)
    assert cats["not_completed"] == sorted(truth.in_progress + truth.abandoned)
    assert body["totals"]["candidates"] == 39
    assert body["expected_changes"] == {
        "fc_scores": {"insert": 39, "update": 0},
        "profiles": {"insert": 13, "update": 0},
    }
    batches = body["batches"]
    assert batches[0] == {"batch_no": 1, "group": "priority", "keys": [TEST_SESSION_A, TEST_SESSION_B]}
    assert all(len(b["keys"]) <= 5 for b in batches)
    text = (tmp_path / "artifacts" / str(body["run_id"]) / "backfill_plan.md").read_text()
    if target.dialect == "sqlite":
        # SQLite has no roles or privileges: the write-privileges precheck does not apply, and says so, not PASS.
        assert text.count("| PASS |") == 3 and "| write_privileges | N/A | sqlite has no roles" in text
    else:
        assert text.count("| PASS |") == 4


def test_apply_writes_exactly_what_the_scoring_library_computes(
    staging: tuple[Target, SeedReport], tmp_path: Path
) -> None:
    target, truth = staging
    body = make_plan(target, tmp_path)
    clock = SimulatedClock(START)
    result = apply_plan(
        target.db,
        target.env,
        PrismJob(),
        body,
        options=ApplyOptions(approve_as="t"),
        clock=clock,
        artifacts_dir=tmp_path / "artifacts",
    )
    assert result.status is RunStatus.SUCCEEDED
    assert result.counts == Counter({"written": 39})
    assert result.elapsed_seconds == pytest.approx(117.0, rel=0.02)  # 39 sessions at 20/min
    candidates = sorted(truth.missing_both + truth.missing_fc_only)
    with target.db.connect() as conn:
        ref = load_reference_data_from_db(conn)
        inputs = load_session_inputs(conn, candidates)
        fc_rows = {
            r.session_id: r for r in conn.execute(sa.select(fc_scores).where(fc_scores.c.session_id.in_(candidates)))
        }
        prof = {
            r.session_id: r
            for r in conn.execute(sa.select(profiles).where(profiles.c.session_id.in_(truth.missing_both)))
        }
    for sid in candidates:
        expected = scoring.score_session(
            scoring.SessionInputs(sid, inputs[sid].answers, inputs[sid].fc_responses, None), ref, START
        )
        assert expected.fc_scores_row is not None
        assert fc_rows[sid].scores_json == expected.fc_scores_row["scores_json"]
        assert fc_rows[sid].blocks_answered == expected.fc_scores_row["blocks_answered"]
        if sid in truth.missing_both:
            assert expected.profile_row is not None
            for column in (
                "type_code",
                "top_types",
                "top_3_fits",
                "strengths",
                "conf_raw",
                "conf_calibrated",
                "confidence",
                "fit_band",
                "score_fit_raw",
                "fc_answered_ct",
                "results_version",
            ):
                assert getattr(prof[sid], column) == expected.profile_row[column], (sid, column)
    assert fc_rows[TEST_SESSION_A].scores_json == {
        "Te": 90,
        "Ti": 90,
        "Fe": 50,
        "Fi": 60,
        "Ne": 80,
        "Ni": 100,
        "Se": 70,
        "Si": 50,
    }
    gate = measure_backfill_gate(
        target.db, target.env, PrismJob(), result.run_id, clock=clock, artifacts_dir=tmp_path / "artifacts"
    )
    report = write_apply_artifacts(target.db, PrismJob(), gate, tmp_path / "artifacts")
    assert report.verdict == "PASS", [(c.name, c.summary) for c in report.checks if c.verdict != "PASS"]
    executed = json.loads(report.paths["execution_results"].read_text())
    assert executed["results"] == {"written": 39}
    assert executed["measured_rate_per_minute"] == pytest.approx(20.0, rel=0.02)

    # A second plan finds nothing left; re-applying the finished run is refused and changes nothing.
    again = make_plan(target, tmp_path)
    assert not again.runnable
    # Applying the empty plan writes nothing: the checks of written rows do not apply (N/A, with why), not PASS.
    empty = apply_plan(
        target.db,
        target.env,
        PrismJob(),
        again,
        options=ApplyOptions(approve_as="t"),
        clock=clock,
        artifacts_dir=tmp_path / "artifacts",
    )
    gate = measure_backfill_gate(
        target.db, target.env, PrismJob(), empty.run_id, clock=clock, artifacts_dir=tmp_path / "artifacts"
    )
    nothing = write_apply_artifacts(target.db, PrismJob(), gate, tmp_path / "artifacts")
    verdicts = {c.name: (c.verdict, c.summary) for c in nothing.checks}
    assert verdicts["version_stamps"][0] == "N/A" and "no stamp to check" in verdicts["version_stamps"][1]
    assert verdicts["rollback_dry_run"][0] == "N/A" and "nothing to roll back" in verdicts["rollback_dry_run"][1]
    assert nothing.verdict == "PASS"  # every check that applies passed
    assert "| rollback_dry_run | N/A | yes |" in nothing.paths["gate"].read_text()
    with pytest.raises(GateBlocked, match="succeeded; nothing to apply"):
        apply_plan(
            target.db,
            target.env,
            PrismJob(),
            body,
            options=ApplyOptions(),
            clock=clock,
            artifacts_dir=tmp_path / "artifacts",
        )


def test_the_plan_hash_is_the_sha256_of_the_canonical_plan_text(
    staging: tuple[Target, SeedReport], tmp_path: Path
) -> None:
    # plan_hash feeds the digest piece by piece; it must equal hashing the canonical text in one go.
    target, _ = staging
    body = make_plan(target, tmp_path).to_json()
    content = {k: v for k, v in body.items() if k != "hash"}
    assert plan_hash(body) == body["hash"] == hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()
    reread = json.loads(json.dumps(body))
    reread["categories"] = {"é": [1.0, (2, 3.5)], **reread["categories"]}  # non-ASCII, integral floats, tuples
    reread["candidates"] = [*reread["candidates"], {"x": 90.0}]
    content = {k: v for k, v in reread.items() if k != "hash"}
    assert plan_hash(reread) == hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest() != body["hash"]


def test_gate_refusals_write_nothing(staging: tuple[Target, SeedReport], tmp_path: Path) -> None:
    target, _ = staging
    plan = make_plan(target, tmp_path)
    clock = SimulatedClock(START)
    run = lambda p: apply_plan(  # noqa: E731
        target.db, target.env, PrismJob(), p, options=ApplyOptions(), clock=clock, artifacts_dir=tmp_path / "a"
    )
    with pytest.raises(GateBlocked) as blocked:
        run(plan)
    assert blocked.value.exit_code == 4 and "gatefill approve" in str(blocked.value)
    tampered = json.loads(json.dumps(plan.to_json()))
    tampered["candidates"][0]["operations"] = ["profiles:update"]
    with pytest.raises(UsageError, match="hash does not match"):
        run(Plan.from_json(tampered))
    # A plan made (and hashed) for another environment is refused by apply.
    other = replace(plan, environment=replace(plan.environment, name="production")).sealed()
    with pytest.raises(UsageError, match="made for environment 'production'"):
        run(other)
    with target.db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger.change_sets)).scalar_one() == 0
        assert ledger.get_run(conn, plan.run_id).status is RunStatus.PLANNED


def test_a_live_writer_finalizing_candidates_is_never_overwritten(
    staging: tuple[Target, SeedReport], tmp_path: Path
) -> None:
    target, truth = staging
    body = make_plan(target, tmp_path, batch_size=3)
    later = [k for b in body.batches[2:] for k in b.keys]
    live_sessions = [k for k in later if k in truth.missing_both][:4]
    assert len(live_sessions) == 4
    service = PrismService(target.db, clock=SimulatedClock(START))
    live_rows: dict[str, object] = {}

    def live_writer(batch_no: int) -> None:
        # Between batches 2 and 3, the live app finalizes four sessions that are still waiting in later batches.
        if batch_no == 3:
            for sid in live_sessions:
                service.finalize(sid, CallContext(now=START), results_base_url="http://127.0.0.1")
            with target.db.connect() as conn:
                for row in conn.execute(sa.select(profiles).where(profiles.c.session_id.in_(live_sessions))):
                    live_rows[row.session_id] = dict(row._mapping)

    result = apply_plan(
        target.db,
        target.env,
        PrismJob(),
        body,
        options=ApplyOptions(approve_as="t"),
        clock=SimulatedClock(START),
        artifacts_dir=tmp_path / "artifacts",
        before_batch=live_writer,
    )
    assert result.status is RunStatus.SUCCEEDED
    assert result.counts["already_present"] == len(live_sessions)
    assert result.counts["written"] == 39 - len(live_sessions)
    with target.db.connect() as conn:
        for row in conn.execute(sa.select(profiles).where(profiles.c.session_id.in_(live_sessions))):
            assert dict(row._mapping) == live_rows[row.session_id]  # untouched by apply
        changed_keys = {
            json.loads(c.row_key).get("session_id")
            for c in ledger.changes_for(conn, result.run_id)
            if c.table == "fc_scores"
        }
        assert not changed_keys & set(live_sessions)
        # Every session the run wrote has events that name the run (its scoring's, or one gatefill_backfill).
        payloads = conn.execute(sa.select(fn_logs.c.payload)).scalars().all()
        marked = {p["session_id"] for p in payloads if p.get("run_id") == result.run_id}
        assert len(marked) == 39 - len(live_sessions) and not marked & set(live_sessions)


def test_ctrl_c_finishes_the_current_batch_pauses_and_resumes(
    staging: tuple[Target, SeedReport], tmp_path: Path
) -> None:
    import threading

    from gatefill.apply import RunPaused

    target, _ = staging
    body = make_plan(target, tmp_path)
    stop = threading.Event()

    class CtrlCInBatch3(PrismJob):
        batches = 0

        def process_batch(self, *args: Any, **kwargs: Any) -> BatchOutcome:
            self.batches += 1
            if self.batches == 3:
                stop.set()  # what the SIGINT handler does while batch 3 is being written: it still commits
            return super().process_batch(*args, **kwargs)

    with pytest.raises(RunPaused) as paused:
        apply_plan(
            target.db,
            target.env,
            CtrlCInBatch3(),
            body,
            options=ApplyOptions(approve_as="t", rate="unlimited"),
            clock=SimulatedClock(START),
            artifacts_dir=tmp_path / "a",
            stop=stop,
        )
    assert paused.value.exit_code == 130 and "before batch 4" in str(paused.value)
    with target.db.connect() as conn:
        assert ledger.get_run(conn, body.run_id).status is RunStatus.PAUSED
        assert ledger.committed_batches(conn, body.run_id) == {1, 2, 3}
    result = apply_plan(
        target.db,
        target.env,
        PrismJob(),
        body,
        options=ApplyOptions(rate="unlimited"),
        clock=SimulatedClock(START),
        artifacts_dir=tmp_path / "a",
    )
    assert result.status is RunStatus.SUCCEEDED
    with target.db.connect() as conn:
        assert len(ledger.session_results_for(conn, body.run_id)) == 39


def test_a_resumed_runs_summary_counts_runtime_and_rate_over_every_invocation(
    staging: tuple[Target, SeedReport], tmp_path: Path
) -> None:
    """Paused after batch 3 and resumed an hour later: the summary's runtime is both invocations' running time
    (the hour between them not counted) and its rate is all 39 sessions over that time, each invocation listed."""
    import threading

    from gatefill.apply import RunPaused

    target, _ = staging
    body = make_plan(target, tmp_path)
    run_id = body.run_id
    stop = threading.Event()

    def pause_at_three(batch_no: int) -> None:
        # A stop before batch 4 starts pauses the run there: batches 1-3 are the first invocation's.
        if batch_no == 4:
            stop.set()

    def run(clock: SimulatedClock, **kwargs: object) -> None:
        apply_plan(
            target.db,
            target.env,
            PrismJob(),
            body,
            options=ApplyOptions(approve_as="t", rate="20/min"),
            clock=clock,
            artifacts_dir=tmp_path / "a",
            **kwargs,  # type: ignore[arg-type]
        )

    with pytest.raises(RunPaused):
        run(SimulatedClock(START), stop=stop, before_batch=pause_at_three)
    later = SimulatedClock(START + timedelta(hours=1))
    run(later)
    gate = measure_backfill_gate(target.db, target.env, PrismJob(), run_id, clock=later, artifacts_dir=tmp_path / "a")
    report = write_apply_artifacts(target.db, PrismJob(), gate, tmp_path / "a")
    with target.db.connect() as conn:
        e = ledger.run_events
        events = conn.execute(sa.select(e.c.at, e.c.from_status, e.c.to_status).where(e.c.run_id == run_id)).all()
        last_invocation = float((ledger.get_run(conn, run_id).summary or {})["elapsed_seconds"])
    starts = [at for at, _, to in events if to == "running"]
    ends = [at for at, was, _ in events if was == "running"]
    assert len(starts) == len(ends) == 2
    running = sum((end - start).total_seconds() for start, end in zip(starts, ends, strict=True))
    assert running > last_invocation + 1.0  # the first invocation's time counts too
    executed = json.loads(report.paths["execution_results"].read_text())
    assert executed["runtime_seconds"] == pytest.approx(running, abs=0.01)
    assert executed["measured_rate_per_minute"] == pytest.approx(39 / running * 60.0, rel=1e-3)
    assert [i["ended_as"] for i in executed["invocations"]] == ["paused", "succeeded"]
    assert [i["batches"] for i in executed["invocations"]] == [3, len(body.batches) - 3]
    assert sum(i["sessions"] for i in executed["invocations"]) == 39
    assert report.runtime_seconds == pytest.approx(running, abs=0.01)
    summary = report.paths["summary"].read_text()
    assert f"| runtime | {running:.1f} s running, over 2 invocations (pauses between them not counted)" in summary
    assert f"measured {39 / running * 60.0:.2f} sessions/min (39 sessions in {running:.1f} s)" in summary
    assert "| 1 | " in summary and "| paused | " in summary and "| succeeded | " in summary


@pytest.mark.parametrize("target", ["postgresql"], indirect=True)
def test_write_privileges_needs_every_privilege_not_just_one(staging: tuple[Target, SeedReport]) -> None:
    """A role that may only INSERT into the written tables cannot back them out: the precheck fails (with a list of
    privileges, has_table_privilege is true when any one is held, which let such a role through)."""
    import uuid

    from gatefill.config import Environment
    from gatefill.db import Database

    target, _ = staging
    role = f"gf_insert_only_{uuid.uuid4().hex[:8]}"
    with target.db.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role}")
    env = Environment(name="test", kind="staging", database_url=target.url.replace("postgres@", f"{role}@", 1))
    try:
        with Database(env) as db, db.connect() as conn:
            checks = {c.name: c for c in PrismJob().prechecks(conn, env.name)}
        privileges = checks["write_privileges"]
        assert privileges.verdict == "FAIL", privileges.summary
        assert "privileges MISSING" in privileges.summary
        assert privileges.evidence["fc_ok"] is False and privileges.evidence["logs_ok"] is False
    finally:
        with target.db.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
