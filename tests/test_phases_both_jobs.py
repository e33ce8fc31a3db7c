"""The phases run for every built-in job through the same functions, and hold the same invariants: job-neutrality
tested, not claimed. Each test runs for ``prism`` (the seeded staging scenario) and ``sql`` (the README's ``fill_slug``
over a ``posts`` table) on SQLite, Postgres and Postgres through PgBouncer.

The invariants: plan, apply and the apply's reports count the same candidates and rows; rollback restores every
table's content exactly; health after apply finds nothing left to backfill; planning and applying again changes
nothing; a short soak on a simulated clock takes every look and judges every check, N/A ones with their reason.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ApplyOptions, apply_plan, measure_backfill_gate
from gatefill.clock import SimulatedClock
from gatefill.db import Database
from gatefill.errors import GateBlocked
from gatefill.health import check_health
from gatefill.job import NOT_APPLICABLE, VERDICTS, Job
from gatefill.jobs import get_job
from gatefill.ledger import RunStatus
from gatefill.plan import Plan, PlanParams, build_plan
from gatefill.reports.apply import write_apply_artifacts
from gatefill.rollback import rollback_run
from gatefill.soak import SoakOptions, soak_job
from tests.conftest import Seeder, Target
from tests.sql_posts import fill_slug, make_posts

pytestmark = pytest.mark.pooled

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)
JOBS = ("prism", "sql")


@dataclass
class Case:
    """One job on one fresh database, with what it is expected to find there."""

    target: Target
    job: Job
    candidates: int
    #: The soak verdict with no traffic in the window: PRISM's rates need sessions (INCONCLUSIVE); the sql job's
    #: verify holds on the rows themselves.
    soak_verdict: str
    artifacts: Path

    @property
    def db(self) -> Database:
        return self.target.db


@pytest.fixture(params=JOBS)
def case(request: pytest.FixtureRequest, target: Target, seeder: Seeder, tmp_path: Path) -> Case:
    if request.param == "prism":
        seeder(target, "staging-2025-09-17")
        return Case(target, get_job("prism"), 39, "INCONCLUSIVE", tmp_path / "artifacts")
    todo = make_posts(target.db)
    return Case(target, fill_slug(), len(todo), "PASS", tmp_path / "artifacts")


def plan(case: Case) -> Plan:
    params = PlanParams(since=SINCE, rate="unlimited", batch_size=5)
    return build_plan(case.db, case.target.env, case.job, params, now=START, artifacts_dir=case.artifacts).plan


def apply(case: Case, body: Plan) -> Any:
    options = ApplyOptions(approve_as="tester")
    return apply_plan(
        case.db,
        case.target.env,
        case.job,
        body,
        options=options,
        clock=SimulatedClock(START),
        artifacts_dir=case.artifacts,
    )


def content(db: Database) -> dict[str, str]:
    """Every table but the ledger's, as a digest of its rows in sorted order: equal content, whatever the physical
    order (an UPDATE moves a Postgres row; a rollback that restores in place moves it again)."""
    found: dict[str, str] = {}
    with db.connect() as conn:
        names = sorted(n for n in sa.inspect(conn).get_table_names() if not n.startswith("gatefill_"))
        for name in names:
            if conn.dialect.name == "postgresql":
                query = f"SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM \"{name}\" t"
                found[name] = str(conn.execute(sa.text(query)).scalar_one())
            else:
                rows = sorted(repr(tuple(r)) for r in conn.execute(sa.text(f'SELECT * FROM "{name}"')))
                found[name] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    return found


def test_plan_apply_and_the_reports_count_the_same(case: Case) -> None:
    body = plan(case)
    text = body.to_json()  # the plan file's own numbers
    runnable = [c for c in body.candidates if c.operations]
    assert text["totals"]["candidates"] == len(body.runnable) == len(runnable) == case.candidates
    assert sum(len(b.keys) for b in body.batches) == case.candidates
    operations = Counter(op for c in runnable for op in c.operations)
    expected = {f"{t}:{kind}": n[kind] for t, n in text["expected_changes"].items() for kind in ("insert", "update")}
    assert {k: v for k, v in expected.items() if v} == dict(operations)

    result = apply(case, body)
    assert result.status is RunStatus.SUCCEEDED and result.counts == Counter(written=case.candidates)
    with case.db.connect() as conn:
        recorded = Counter(
            (c.table, "insert" if c.before is None else "update") for c in ledger.changes_for(conn, body.run_id)
        )
        assert Counter(ledger.session_results_for(conn, body.run_id).values()) == result.counts
    for table, n in body.expected_changes().items():
        assert (recorded[(table, "insert")], recorded[(table, "update")]) == (n["insert"], n["update"]), table

    gate = measure_backfill_gate(
        case.db, case.target.env, case.job, body.run_id, clock=SimulatedClock(START), artifacts_dir=case.artifacts
    )
    report = write_apply_artifacts(case.db, case.job, gate, case.artifacts)
    assert report.verdict == "PASS", [(c.name, c.verdict, c.summary) for c in report.checks]
    execution = json.loads((case.artifacts / body.run_id / "backfill_logs" / "execution_results.json").read_text())
    assert execution["total_sessions"] == case.candidates and execution["results"] == {"written": case.candidates}
    present = next(c for c in report.checks if c.name == "rows_present_as_written").evidence
    for table, n in body.expected_changes().items():
        assert present[table]["recorded"] == present[table]["present"] == n["insert"] + n["update"]


def test_rollback_restores_every_table_exactly(case: Case) -> None:
    before = content(case.db)
    body = plan(case)
    apply(case, body)
    assert content(case.db) != before
    undone = rollback_run(case.db, body.run_id, case.job.written_tables(), now=START, artifacts_dir=case.artifacts)
    assert undone.committed and undone.verified and not undone.conflicts
    assert content(case.db) == before


def test_after_apply_health_finds_nothing_and_applying_again_changes_nothing(case: Case) -> None:
    body = plan(case)
    apply(case, body)
    health = check_health(case.db, case.target.env, since=SINCE, now=START, job=case.job)
    assert health.plan is None
    assert all(c.verdict in VERDICTS for c in health.checks)
    assert all(c.summary for c in health.checks if c.verdict == NOT_APPLICABLE)

    after = content(case.db)
    with pytest.raises(GateBlocked, match="succeeded; nothing to apply"):
        apply(case, body)
    again = plan(case)
    assert again.runnable == () and again.batches == ()
    assert apply(case, again).counts == Counter()
    assert content(case.db) == after


def test_a_short_soak_on_a_simulated_clock_judges_every_check(case: Case) -> None:
    body = plan(case)
    apply(case, body)
    options = SoakOptions(after=body.run_id, duration=2 * 3600.0, interval=3600.0, chart=False)
    result = soak_job(case.target.env, case.job, options, clock="simulated")
    assert result.complete and result.looks_taken == 2 and len(result.measurements) == 2
    assert result.verdict == case.soak_verdict, [(c.name, c.verdict, c.summary) for c in result.checks]
    assert all(c.verdict in VERDICTS for m in result.measurements for c in m.checks)
    assert all(c.summary for c in result.checks if c.verdict == NOT_APPLICABLE)  # N/A says why, never a bare PASS
    with case.db.connect() as conn:
        soak = ledger.get_run(conn, result.run_id, with_plan=False)
    assert soak.job == case.job.name and soak.versions == dict(case.job.versions)
    assert soak.parent_run_id == body.run_id
