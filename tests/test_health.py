"""Production health on SQLite and Postgres: a healthy scenario passes, damage is listed session by session, the
mini plan is accepted by apply unchanged and fixes it, and the check itself writes nothing to the database."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from gatefill.apply import ApplyOptions, apply_plan
from gatefill.clock import SimulatedClock
from gatefill.health import check_health
from gatefill.plan import load_plan
from gatefill.prism.job import PrismJob
from gatefill.prism.schema import fc_scores, profiles
from gatefill.reports.health import write_health_check
from tests.conftest import Seeder, Target

# Phase 1 and health also run through PgBouncer in transaction mode (the `pooled` target).
pytestmark = pytest.mark.pooled

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
AT = datetime(2025, 9, 18, 0, 10, tzinfo=UTC)


def table_names(target: Target) -> set[str]:
    with target.db.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def test_healthy_production_passes_and_writes_nothing(target: Target, tmp_path: Path, seeder: Seeder) -> None:
    seeder(target, "production-2025-09-18")
    tables_before = table_names(target)
    result = write_health_check(check_health(target.db, target.env, since=SINCE, now=AT, job=PrismJob()), tmp_path)
    assert result.healthy and result.exit_code == 0, [(c.name, c.summary) for c in result.checks if c.verdict != "PASS"]
    assert result.plan is None and "mini_plan" not in result.paths
    assert "discovery" not in result.seconds  # nothing missing: no second scan for candidates
    assert "discovery was not needed" in result.paths["report"].read_text()
    by_name = {c.name: c for c in result.checks}
    assert by_name["missing_profiles"].evidence["completed"] == 157
    assert by_name["version_distribution"].evidence["fc_scores"] == {"v1.2/functions": 157}
    assert table_names(target) == tables_before  # no ledger tables, nothing created
    report = result.paths["report"].read_text()
    assert "HEALTHY" in report and "157" in report


def test_unhealthy_production_lists_the_exact_sessions_and_its_mini_plan_fixes_them(
    target: Target, tmp_path: Path, seeder: Seeder
) -> None:
    seeder(target, "production-2025-09-18")
    with target.db.begin() as conn:
        victims = sorted(
            r[0] for r in conn.execute(sa.select(profiles.c.session_id).order_by(profiles.c.session_id).limit(4))
        )
        conn.execute(profiles.delete().where(profiles.c.session_id.in_(victims[:2])))
        conn.execute(fc_scores.delete().where(fc_scores.c.session_id.in_(victims[1:])))
    result = write_health_check(check_health(target.db, target.env, since=SINCE, now=AT, job=PrismJob()), tmp_path)
    assert not result.healthy and result.exit_code == 1
    by_name = {c.name: c for c in result.checks}
    assert by_name["missing_profiles"].evidence["sessions"] == victims[:2]
    assert by_name["missing_fc_scores"].evidence["sessions"] == victims[1:]
    assert "discovery" in result.seconds
    plan_path = result.paths["mini_plan"]
    plan = load_plan(plan_path)
    assert plan.source == "health"
    assert {c.key: c.category for c in plan.runnable} == {
        victims[0]: "profile_only",
        victims[1]: "profile+fc",
        victims[2]: "fc_only",
        victims[3]: "fc_only",
    }
    applied = apply_plan(
        target.db,
        target.env,
        PrismJob(),
        load_plan(plan_path),  # the file as it is
        options=ApplyOptions(rate="unlimited", approve_as="oncall"),
        clock=SimulatedClock(AT),
        artifacts_dir=tmp_path,
    )
    assert applied.counts["written"] == 4
    again = write_health_check(check_health(target.db, target.env, since=SINCE, now=AT, job=PrismJob()), tmp_path)
    assert again.healthy, [(c.name, c.summary) for c in again.checks if c.verdict != "PASS"]


def test_staging_traps_are_reported_not_hidden(target: Target, tmp_path: Path, seeder: Seeder) -> None:
    truth = seeder(target, "staging-2025-09-17")
    result = write_health_check(
        check_health(target.db, target.env, since=SINCE, now=datetime(2025, 9, 17, 8, tzinfo=UTC), job=PrismJob()),
        tmp_path,
    )
    by_name = {c.name: c for c in result.checks}
    sufficiency = by_name["answer_sufficiency"].evidence
    assert sufficiency["below_148_sessions"] == sorted(truth.insufficient_answers)
    assert sufficiency["below_148"] == len(truth.insufficient_answers)
    # Fewer than six FC answers: at least the sessions seeded without any, and the one with a single unresolvable one.
    assert set(truth.no_fc_responses) | set(truth.unresolvable_fc_options) <= set(sufficiency["fc_below_6_sessions"])
    assert sufficiency["fc_below_6"] == len(sufficiency["fc_below_6_sessions"])
    assert by_name["version_distribution"].evidence["legacy_profiles"] >= len(truth.stale_profile)
    assert result.plan is not None and len(result.plan.runnable) == 39
    if target.dialect == "postgresql":
        rls = by_name["row_level_security"]
        assert rls.verdict == "PASS", rls.summary
        assert rls.evidence["anon_visible_profiles"] in (0, "no access (privilege revoked)")


def test_a_report_is_never_dated_before_the_sessions_it_counts_and_rls_on_sqlite_is_not_a_pass(
    target: Target, tmp_path: Path, seeder: Seeder
) -> None:
    seeder(target, "production-2025-09-18")  # sessions stamped up to 2025-09-17T20:06
    early = datetime(2025, 9, 17, 18, 0, tzinfo=UTC)
    result = write_health_check(
        check_health(target.db, target.env, since=SINCE, now=early, job=PrismJob()), tmp_path / "early"
    )
    by_name = {c.name: c for c in result.checks}
    timing = by_name["measurement_time"]
    assert timing.verdict == "INCONCLUSIVE" and not result.healthy and result.exit_code == 1
    newest = datetime.fromisoformat(timing.evidence["newest_session_stamp"])
    assert newest > early and f"stamped {newest.isoformat()}, after this report's time" in timing.summary
    # Dated by a clock when the measurement is over: after every session it counted, so it stands.
    clock = SimulatedClock(AT)
    later = write_health_check(
        check_health(target.db, target.env, since=SINCE, now=AT, clock=clock, job=PrismJob()), tmp_path / "at"
    )
    assert later.healthy and {c.name: c.verdict for c in later.checks}["measurement_time"] == "PASS"
    assert later.measured_at == AT and later.step_record()["measured_at"] == AT.isoformat()
    report = later.paths["report"].read_text()
    rls = {c.name: c for c in later.checks}["row_level_security"]
    if target.dialect == "sqlite":
        assert rls.verdict == "N/A" and "sqlite has no roles or row-level security" in rls.summary
        assert "| row_level_security | N/A |" in report
        assert later.step_record()["notes"] == {"row_level_security": rls.summary}
    else:
        assert rls.verdict == "PASS"
