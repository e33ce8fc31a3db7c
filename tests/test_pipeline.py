"""The whole pipeline on SQLite and Postgres: it reaches a measured final gate, a re-run is a no-op, an unhealthy
production gets its mini plan applied and re-checked, and a production apply without a passing soak is refused until
an override, which the final gate then shows."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from rich.console import Console

from gatefill import ledger
from gatefill.cli import main
from gatefill.clock import Clock, OffsetClock, RealClock
from gatefill.commands import rollback_environment
from gatefill.config import Environment, Settings
from gatefill.db import Database
from gatefill.jobs import get_job
from gatefill.pipeline import PipelineOptions, run_pipeline
from gatefill.plan import load_plan
from gatefill.prism.job import PrismJob
from gatefill.prism.sandbox.demo import DEMO_SINCE, PIPELINE_START, run_demo_pipeline, seed_demo
from gatefill.prism.schema import assessment_sessions, profiles
from gatefill.reports.soak import write_soak_artifacts
from gatefill.soak import SoakOptions, soak_job
from tests.conftest import create_pg_database, drop_pg_database, pg_env, pooled_env, sqlite_env

#: Enough simulated respondents for the soak to conclude, few enough to keep the test short.
SOAK_SESSIONS = 300


@pytest.fixture(params=["sqlite", "postgresql", "pooled"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """Settings with a fresh ``staging`` and ``production`` database of one dialect (or both reached through
    PgBouncer in transaction mode), dropped afterwards."""
    created: list[str] = []
    if request.param == "sqlite":
        staging = sqlite_env(tmp_path / "staging.db", "staging")
        production = sqlite_env(tmp_path / "production.db", "production", kind="production")
    else:
        template = request.getfixturevalue("pg_template")
        created = [create_pg_database(template), create_pg_database(template)]
        make = pooled_env if request.param == "pooled" else pg_env
        staging = make(created[0], "staging")
        production = make(created[1], "production", kind="production")
    try:
        yield Settings(
            path=None,
            root=tmp_path,
            artifacts_dir=tmp_path / "artifacts",
            environments={"staging": staging, "production": production},
        )
    finally:
        for name in created:
            drop_pg_database(name)


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Console]:
    """Where the pipeline's console output goes (a file in the test's directory)."""
    with (tmp_path / "console.txt").open("w") as sink:
        yield Console(file=sink, width=140)


def ledger_rows(settings: Settings) -> dict[str, tuple[int, int, int]]:
    """Runs, approvals and changes in each environment's ledger: what a no-op must leave as it found it."""
    found = {}
    for name, env in settings.environments.items():
        with Database(env) as db, db.connect() as conn:
            # A healthy production is only read: it has no ledger tables at all.
            found[name] = tuple(
                int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                if sa.inspect(conn).has_table(t.name)
                else -1
                for t in (ledger.runs, ledger.approvals, ledger.change_sets)
            )
    return found


def never_soak(*_args: object) -> dict[str, object]:
    raise AssertionError("this pipeline must not soak (again)")


def test_full_pipeline_end_to_end_and_rerunning_changes_nothing(pair: Settings, console: Console) -> None:
    census = seed_demo(pair, console, create=True)
    assert census["staging"]["profile+fc"] + census["staging"]["fc_only"] == 39
    state = run_demo_pipeline(pair, console, fast=True, soak_sessions=SOAK_SESSIONS, approver="tess")
    assert state.done and state.waiting_for is None
    steps = state.steps
    assert steps["plan"]["candidates"] == 39
    assert steps["apply"]["verdict"] == "PASS" and steps["apply"]["results"] == {"written": 39}
    assert steps["soak"]["verdict"] == "PASS", steps["soak"]["summary"]
    # The demo's soak read the functions server's own metrics, and could attribute their totals to its window.
    last = json.loads(Path(steps["soak"]["artifacts"]["measurements"]).read_text())["measurements"][-1]
    by_name = {c["name"]: c for c in last["checks"]}
    app = by_name["function_errors"]["evidence"]["app_metrics"]
    assert app["source"].endswith("/metrics") and "inside the window" in app["coverage"], app
    assert app["answers_5xx"] == {} and app["calls"] > SOAK_SESSIONS
    assert by_name["latency"]["summary"].startswith("app histogram: ")
    assert steps["health"]["healthy"] is True and steps["health"]["mini_plan"] is None
    assert "production_apply" not in steps
    assert steps["final_gate"]["verdict"] == "GO"
    final = Path(steps["final_gate"]["artifact"]).read_text()
    assert "## Verdict: **GO**" in final
    assert "Sessions backfilled: 39 on staging, 0 on production." in final
    # Every session once: the ledger's per-session results are exactly the plan's runnable candidates.
    # The plan's work is stored beside its run (the run's row keeps the plan's header).
    with Database(pair.env("staging")) as db, db.connect() as conn:
        pb = ledger.plan_batches
        runnable = list(
            conn.execute(sa.select(pb.c.session_id).where(pb.c.run_id == steps["apply"]["run_id"])).scalars()
        )
        results = ledger.session_results_for(conn, steps["apply"]["run_id"])
    assert len(runnable) == len(set(runnable)) == 39 and set(results) == set(runnable)
    for gate in ("plan", "review", "soak", "production"):
        assert re.search(rf"\| {gate} \| approval \| tess \| \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d", final), gate
    assert "Gate overrides in effect" not in final

    before = ledger_rows(pair)
    assert before["production"] == (-1, -1, -1)
    rerun = run_pipeline(
        pair,
        PipelineOptions(staging="staging", production="production", since=DEMO_SINCE),
        job=PrismJob(),
        clock=RealClock(),
        soak_step=never_soak,
    )
    assert rerun.done and rerun.run_id == state.run_id
    assert rerun.log == ["the pipeline already reached its final gate: nothing to do"]
    assert ledger_rows(pair) == before
    assert Path(steps["final_gate"]["artifact"]).read_text() == final

    # Every report is dated after the evidence it cites, and the demo's clocks agree with each other.
    written = datetime.fromisoformat(re.search(r"\| written \| (\S+) ", final).group(1))  # type: ignore[union-attr]
    with Database(pair.env("staging")) as db, db.connect() as conn:
        soak_run = ledger.get_run(conn, steps["soak"]["run_id"])
        soak_approved = ledger.approvals_for(conn, soak_run.id, "soak")[0].at
        production_approved = ledger.approvals_for(conn, state.run_id, "production")[0].at
    assert soak_run.finished_at is not None
    assert soak_run.finished_at <= soak_approved <= production_approved <= written
    with Database(pair.env("production")) as db, db.connect() as conn:
        newest = conn.execute(
            sa.select(
                sa.func.max(assessment_sessions.c.created_at),
                sa.func.max(assessment_sessions.c.completed_at),
                sa.func.max(assessment_sessions.c.finalized_at),
            )
        ).one()
    health_at = datetime.fromisoformat(steps["health"]["measured_at"])
    assert max(t for t in newest if t is not None) <= health_at <= written
    assert steps["health"]["checks"]["measurement_time"] == "PASS"
    health_report = Path(steps["health"]["artifact"]).read_text()
    assert f"| measured at | {health_at.strftime('%Y-%m-%dT%H:%M:%S')}" in health_report
    # A check that does not apply is N/A with its reason, never PASS, and the GO does not rest on it.
    if pair.env("production").url.get_backend_name() == "sqlite":
        assert "| production RLS | N/A | health check row_level_security N/A: sqlite has no roles" in final
        assert "| production RLS | PASS |" not in final
    else:
        assert "| production RLS | PASS |" in final
    assert "| conversion at least the floor (seed: ≥ 85%) | PASS | soak check conversion_floor PASS |" in final
    assert "| staging backfill still in place | PASS |" in final

    # The staging apply is rolled back afterwards: the pipeline and its final gate say so instead of the old GO.
    apply_run = steps["apply"]["run_id"]
    undone = rollback_environment(
        pair.env("staging"), apply_run, dry_run=False, force=False, artifacts_dir=pair.artifacts_dir, find_job=get_job
    )
    assert undone.committed
    outdated = run_pipeline(
        pair,
        PipelineOptions(staging="staging", production="production", since=DEMO_SINCE),
        job=PrismJob(),
        clock=RealClock(),
        soak_step=never_soak,
    )
    assert outdated.run_id == state.run_id and outdated.done
    assert outdated.steps["final_gate"]["verdict"] == "NO-GO"
    assert outdated.steps["apply"]["status"] == "rolled_back"
    assert outdated.steps["final_gate"]["outdated_by"] == [
        f"apply {apply_run} was rolled back at {outdated.steps['apply']['rolled_back_at']}"
    ]
    rewritten = Path(steps["final_gate"]["artifact"]).read_text()
    assert "## Verdict: **NO-GO**" in rewritten and "## Verdict: **GO**" not in rewritten
    assert re.search(rf"\| staging backfill still in place \| FAIL \| run {apply_run} was rolled back at ", rewritten)
    assert f"| apply (staging) | `{apply_run}` | rolled_back;" in rewritten
    assert "Sessions backfilled: 39 on staging (since rolled back), 0 on production." in rewritten
    with Database(pair.env("staging")) as db, db.connect() as conn:
        summary = ledger.get_run(conn, state.run_id).summary or {}
    assert summary["steps"]["final_gate"]["verdict"] == "NO-GO" and summary["steps"]["apply"]["status"] == "rolled_back"
    # The next run of the pipeline starts a new one, which finds the 39 sessions to backfill again.
    fresh = run_pipeline(
        pair,
        PipelineOptions(staging="staging", production="production", since=DEMO_SINCE),
        job=PrismJob(),
        clock=RealClock(),
        soak_step=never_soak,
    )
    assert fresh.run_id != state.run_id and fresh.steps["plan"]["candidates"] == 39
    assert "--gate plan" in str(fresh.waiting_for)


def empty_soak(db: Database, env: Environment, apply_run: str, clock: Clock, artifacts: Path) -> dict[str, object]:
    """A real soak over six simulated hours in which nobody used staging: nothing to measure, so INCONCLUSIVE.
    Like the demo's, it moves the pipeline's clock past those hours, so nothing later is dated before them."""
    result = write_soak_artifacts(soak_job(env, PrismJob(), SoakOptions(after=apply_run), clock="simulated"), artifacts)
    assert isinstance(clock, OffsetClock)
    clock.advance_to(result.window_end)
    return {
        "run_id": result.run_id,
        "verdict": result.verdict,
        "summary": result.reason,
        "checks": {c.name: c.verdict for c in result.checks},
        "artifacts": {k: str(v) for k, v in result.paths.items()},
    }


def test_unhealthy_production_without_a_passing_soak_is_refused_until_an_override_the_final_gate_shows(
    pair: Settings, tmp_path: Path, console: Console, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_demo(pair, console, create=True)
    with Database(pair.env("production")) as db, db.begin() as conn:
        victims = [r[0] for r in conn.execute(sa.select(profiles.c.session_id).order_by(profiles.c.session_id))][:3]
        conn.execute(profiles.delete().where(profiles.c.session_id.in_(victims)))
    options = PipelineOptions(
        staging="staging", production="production", since=DEMO_SINCE, rate="unlimited", auto_approve_as="tess"
    )
    state = run_pipeline(pair, options, job=PrismJob(), clock=OffsetClock(PIPELINE_START), soak_step=empty_soak)
    assert not state.done and state.blocked is not None and state.blocked.exit_code == 4
    assert state.steps["soak"]["verdict"] == "INCONCLUSIVE"
    assert state.steps["health"]["healthy"] is False
    mini = state.steps["health"]["mini_plan"]
    mini_run = load_plan(Path(mini)).run_id
    assert "an approved, PASS staging soak" in str(state.waiting_for)
    assert "has verdict INCONCLUSIVE" in str(state.blocked)
    assert "--override-gate" in str(state.waiting_for)
    with Database(pair.env("production")) as db, db.connect() as conn:
        assert ledger.session_results_for(conn, mini_run) == {}  # nothing applied

    config = tmp_path / "gatefill.toml"
    config.write_text(
        f'artifacts_dir = "{pair.artifacts_dir}"\n'
        + "".join(
            f'[env.{n}]\ndatabase_url = "{e.database_url}"\nkind = "{e.kind}"\n' for n, e in pair.environments.items()
        ),
        encoding="utf-8",
    )
    capsys.readouterr()
    assert main(["--config", str(config), "apply", mini, "--env", "production"]) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: gate 'production' blocks this step:") and "\n" not in err
    assert "an approved, PASS staging soak of the same versions within the last 7 days" in err
    assert "--override-gate" in err
    with Database(pair.env("production")) as db, db.connect() as conn:
        # The refused apply wrote nothing: no session result, no gate record.
        assert ledger.session_results_for(conn, mini_run) == {}
        assert ledger.approvals_for(conn, mini_run, "soak") == []
    argv = ["--config", str(config), "apply", mini, "--env", "production", "--rate", "unlimited"]
    argv += ["--override-gate", "--by", "ola"]
    assert main([*argv, "--reason", "incident 7: profiles missing for paying users"]) == 0

    # The override's apply above ran on the wall clock, so the pipeline continues on it (never dated before it).
    done = run_pipeline(pair, options, job=PrismJob(), clock=RealClock(), soak_step=never_soak)
    assert done.done and done.blocked is None
    prod = done.steps["production_apply"]
    assert prod["results"] == {"written": 3} and prod["healthy_after"] is True and prod["verdict"] == "PASS"
    final = Path(done.steps["final_gate"]["artifact"]).read_text()
    assert "## Verdict: **INCONCLUSIVE**" in final  # an override never makes a GO
    assert "Gate overrides in effect" in final
    assert re.search(r"soak gate of `[^`]+` overridden by \*\*ola\*\*.*incident 7", final)
    assert re.search(r"\| soak \| override \| ola \| .*incident 7", final)
    assert "Sessions backfilled: 39 on staging, 3 on production." in final

    # Rolling the production apply back through the CLI rewrites this pipeline's final gate on the spot: NO-GO.
    capsys.readouterr()
    assert main(["--config", str(config), "rollback", mini_run, "--env", "production"]) == 0
    said = capsys.readouterr().out
    assert f"pipeline {done.run_id}: production apply {mini_run} was rolled back at " in said
    assert "final gate rewritten, NO-GO" in said
    final = Path(done.steps["final_gate"]["artifact"]).read_text()
    assert "## Verdict: **NO-GO**" in final
    assert re.search(rf"\| production backfill still in place \| FAIL \| run {mini_run} was rolled back at ", final)
    assert main(["--config", str(config), "status", done.run_id]) == 0
    assert f"outdated: production apply {mini_run} was rolled back" in capsys.readouterr().out
