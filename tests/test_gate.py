"""The production gate: refused without a passing staging soak (nothing written), or let through by a recorded
override that every later report shows."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ApplyOptions, apply_plan, measure_backfill_gate
from gatefill.clock import SimulatedClock
from gatefill.config import Environment, Settings
from gatefill.errors import GateBlocked, UsageError
from gatefill.gate import Override, gate_records
from gatefill.health import check_health
from gatefill.plan import Plan, load_plan
from gatefill.prism.job import PrismJob
from gatefill.prism.schema import profiles
from gatefill.reports.apply import write_apply_artifacts
from gatefill.reports.health import write_health_check
from tests.conftest import Seeder, Target

AT = datetime(2025, 9, 18, 0, 10, tzinfo=UTC)


def production(target: Target, tmp_path: Path, seeder: Seeder) -> tuple[Environment, Settings, Plan]:
    env = Environment(name="production", kind="production", database_url=target.url)
    staging = Environment(name="staging", kind="staging", database_url=f"sqlite:///{tmp_path / 'staging.db'}")
    settings = Settings(
        path=None, root=tmp_path, artifacts_dir=tmp_path / "a", environments={"production": env, "staging": staging}
    )
    seeder(target, "production-2025-09-18")
    with target.db.begin() as conn:
        conn.execute(
            profiles.delete().where(
                profiles.c.session_id.in_(
                    sa.select(profiles.c.session_id).order_by(profiles.c.session_id).limit(2).scalar_subquery()
                )
            )
        )
    health = write_health_check(
        check_health(target.db, env, since=datetime(2025, 8, 1, tzinfo=UTC), now=AT, job=PrismJob()), tmp_path
    )
    return env, settings, load_plan(health.paths["mini_plan"])


def test_production_apply_needs_a_soak_or_an_override(target: Target, tmp_path: Path, seeder: Seeder) -> None:
    env, settings, body = production(target, tmp_path, seeder)
    run = lambda override=None: apply_plan(  # noqa: E731
        target.db,
        env,
        PrismJob(),
        body,
        options=ApplyOptions(rate="unlimited", approve_as="ana"),
        clock=SimulatedClock(AT),
        artifacts_dir=tmp_path / "a",
        settings=settings,
        override=override,
    )
    with pytest.raises(GateBlocked) as refused:
        run()
    assert refused.value.exit_code == 4
    assert "staging soak" in str(refused.value) and "--override-gate" in str(refused.value)
    with target.db.connect() as conn:
        assert ledger.approvals_for(conn, body.run_id) == []  # a refused apply records nothing
    with pytest.raises(UsageError):
        run(Override("bo", " "))
    result = run(Override("bo", "incident 42: results pages down"))
    assert result.counts["written"] == 2
    gate = measure_backfill_gate(
        target.db, env, PrismJob(), result.run_id, clock=SimulatedClock(AT), artifacts_dir=tmp_path / "a"
    )
    report = write_apply_artifacts(target.db, PrismJob(), gate, tmp_path / "a")
    gate_md = report.paths["gate"].read_text()
    assert "| soak | override | bo |" in gate_md and "incident 42" in gate_md
    records = [r for r in gate_records(settings, "production") if r.approval.kind == "override"]
    assert [(r.approval.approved_by, r.approval.gate) for r in records] == [("bo", "soak")]
