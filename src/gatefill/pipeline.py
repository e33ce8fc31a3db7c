"""The whole pipeline as a resumable state machine: plan → plan approval → staging apply → review → soak →
production go/no-go → production health → (mini plan → approval → production apply) → final gate.

The pipeline is a ledger run (phase ``pipeline``) in the staging environment's ledger; its ``summary`` holds the
ids of the runs each step produced. Every invocation re-reads that state and the ledgers, does every step whose
gate is open, and stops at the first gate that is not, saying exactly what it waits for. Nothing is skipped: a gate
opens only through a recorded approval (or, for the production apply, the production gate of ``gatefill.gate``).
A pipeline that reached its final gate is done, and running it again changes nothing, unless an apply it relied on
has been rolled back since: then its steps say so, its final gate is rewritten (a NO-GO), and the next run of the
pipeline starts a new one (``note_rollback`` does the same right after ``gatefill rollback``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import (
    ApplyOptions,
    ApplyResult,
    ProgressCallback,
    apply_plan,
    ensure_run_for_plan,
    write_apply_artifacts,
)
from gatefill.clock import Clock
from gatefill.config import Environment, Settings
from gatefill.db import Database, format_utc
from gatefill.errors import GateBlocked, UsageError
from gatefill.final_gate import write_final_gate
from gatefill.health import HealthResult, check_health
from gatefill.job import Job
from gatefill.ledger import RunStatus
from gatefill.plan import PlanParams, build_plan, load_plan, plan_from_ledger

__all__ = ["STEPS", "PipelineOptions", "PipelineState", "note_rollback", "run_pipeline"]

STEPS = (
    "plan",
    "plan_approval",
    "apply",
    "review",
    "soak",
    "go_no_go",
    "health",
    "mini_plan_approval",
    "production_apply",
    "final_gate",
)


@dataclass(frozen=True)
class PipelineOptions:
    """What the pipeline runs on and how."""

    staging: str
    production: str
    since: datetime
    priority: tuple[str, ...] = ()
    rate: str = "20/min"
    batch_size: int = 5
    soak_duration: str = "6h"
    soak_interval: str = "5m"
    #: Approves every gate under this name as it is reached (the demo: approvals recorded as "demo").
    auto_approve_as: str | None = None


@dataclass
class PipelineState:
    """Where a pipeline stands: the runs of each step, what it waits for, and what each step reported."""

    run_id: str
    steps: dict[str, Any] = field(default_factory=dict)
    waiting_for: str | None = None
    done: bool = False
    log: list[str] = field(default_factory=list)
    #: The gate refusal the pipeline stopped at, if a gate (not a missing approval) stopped it.
    blocked: GateBlocked | None = None


SoakStep = Callable[[Database, Any, str, Clock, Path], Mapping[str, Any]]


def _pipeline_run(db: Database, options: PipelineOptions, job: Job, now: datetime) -> ledger.Run:
    """The unfinished pipeline of these environments, or a new one."""
    ledger.init_ledger(db)
    with db.connect() as conn:
        for run in ledger.list_runs(conn, phase="pipeline", limit=20):
            # The most recent pipeline of these two environments: unfinished (continue it) or done (a no-op), unless
            # a rollback outdated it: then the backfill starts over in a new pipeline.
            if run.params.get("staging") == options.staging and run.params.get("production") == options.production:
                if not _outdated_by(run):
                    return run
                break
    with db.begin() as conn:
        run = ledger.create_run(
            conn,
            run_id=ledger.new_run_id("pipeline", now),
            phase="pipeline",
            environment=options.staging,
            job=job.name,
            versions=job.versions,
            params={
                "staging": options.staging,
                "production": options.production,
                "since": format_utc(options.since),
                "priority": list(options.priority),
                "rate": options.rate,
                "batch_size": options.batch_size,
            },
            now=now,
        )
        return ledger.transition(conn, run.id, RunStatus.RUNNING, now=now, reason="pipeline started")


def _outdated_by(run: ledger.Run) -> list[str]:
    """Why a pipeline's final gate no longer stands (an apply it relied on was rolled back), if it does not."""
    return _outdated_by_steps((run.summary or {}).get("steps", {}))


def _note_rollbacks(
    settings: Settings, options: PipelineOptions, state: PipelineState, dbs: Mapping[str, Database], now: datetime
) -> bool:
    """True when an apply this pipeline relied on has been rolled back since it was recorded: its step says so and
    the final gate is (re)written from the ledgers, which makes it a NO-GO, instead of keeping the old verdict."""
    news = []
    for step, where in (("apply", "staging"), ("production_apply", "production")):
        record = state.steps.get(step)
        if not record or record.get("status") == RunStatus.ROLLED_BACK.value:
            continue
        with dbs[where].connect() as conn:
            run = ledger.get_run(conn, str(record["run_id"]), with_plan=False)
        if run.status is RunStatus.ROLLED_BACK:
            at = run.finished_at.isoformat() if run.finished_at else None
            record.update(status=run.status.value, rolled_back_at=at)
            news.append(f"{step.replace('_', ' ')} {run.id} was rolled back at {at}")
    if not news:
        return False
    gate = write_final_gate(settings, options, state.run_id, state.steps, now=now)
    state.steps["final_gate"] = {**gate, "outdated_by": _outdated_by_steps(state.steps) + news}
    state.done, state.waiting_for = True, None
    state.log.append("; ".join(news) + f": final gate rewritten, {gate['verdict']} ({gate['artifact']})")
    return True


def _outdated_by_steps(steps: Mapping[str, Any]) -> list[str]:
    """The rollbacks recorded against the final gate of these steps."""
    return list((steps.get("final_gate") or {}).get("outdated_by") or [])


def _close(db: Database, state: PipelineState, now: datetime, reason: str) -> None:
    """Saves the state of a pipeline that reached its final gate and marks its run finished (once)."""
    _save(db, state, now)
    with db.begin() as conn:
        if ledger.get_run(conn, state.run_id, with_plan=False).status is RunStatus.RUNNING:
            ledger.transition(conn, state.run_id, RunStatus.SUCCEEDED, now=now, reason=reason)


def _options_of(run: ledger.Run) -> PipelineOptions:
    """A stored pipeline's options, as it was started with."""
    p = run.params
    since = datetime.fromisoformat(str(p["since"]).replace("Z", "+00:00"))
    return PipelineOptions(
        staging=str(p["staging"]),
        production=str(p["production"]),
        since=since,
        priority=tuple(p.get("priority") or ()),
        rate=str(p.get("rate", "20/min")),
        batch_size=int(p.get("batch_size", 5)),
    )


def note_rollback(settings: Settings, run_id: str, *, clock: Clock) -> list[PipelineState]:
    """After ``run_id`` was rolled back: every pipeline (in the ledgers of the staging environments) that relied on
    it records so and rewrites its final gate (NO-GO); returns those pipelines' states."""
    touched: list[PipelineState] = []
    for env in settings.environments.values():
        if env.kind != "staging":
            continue
        with Database(env) as db:
            with db.connect() as conn:
                if not sa.inspect(conn).has_table(ledger.runs.name):
                    continue
                pipelines = [
                    r
                    for r in ledger.list_runs(conn, phase="pipeline", limit=200)
                    if run_id in _step_runs(r) and r.params.get("staging") == env.name
                ]
            for run in pipelines:
                state = _state_of(run)
                options = _options_of(run)
                with Database(settings.env(options.production)) as production:
                    if _note_rollbacks(
                        settings, options, state, {"staging": db, "production": production}, clock.now()
                    ):
                        _close(db, state, clock.now(), "final gate rewritten: an apply it relied on was rolled back")
                        touched.append(state)
    return touched


def _step_runs(run: ledger.Run) -> set[str]:
    steps = (run.summary or {}).get("steps", {})
    return {str(steps[s]["run_id"]) for s in ("apply", "production_apply") if steps.get(s, {}).get("run_id")}


def _state_of(run: ledger.Run) -> PipelineState:
    summary = run.summary or {}
    return PipelineState(run.id, dict(summary.get("steps", {})), done=bool(summary.get("done")))


def _approved(db: Database, run_id: str, gate: str) -> ledger.Approval | None:
    with db.connect() as conn:
        found = [a for a in ledger.approvals_for(conn, run_id, gate)]
    return found[-1] if found else None


def _approve_or_wait(
    db: Database, run_id: str, gate: str, options: PipelineOptions, now: datetime, state: PipelineState, env: str
) -> bool:
    """True when the gate is approved (auto-approving under the demo name if asked); else records what is awaited."""
    if _approved(db, run_id, gate):
        return True
    if options.auto_approve_as:
        with db.begin() as conn:
            run = ledger.get_run(conn, run_id)
            ledger.record_approval(
                conn,
                run_id=run_id,
                gate=gate,
                approved_by=options.auto_approve_as,
                now=now,
                note="recorded automatically by the demo pipeline",
                plan_hash=run.plan_hash,
            )
        return True
    state.waiting_for = f"`gatefill approve {run_id} --gate {gate} --by NAME --env {env}`"
    return False


def _save(db: Database, state: PipelineState, now: datetime) -> None:
    with db.begin() as conn:
        ledger.runs_update_summary(
            conn, state.run_id, {"steps": state.steps, "done": state.done, "waiting_for": state.waiting_for}, now=now
        )


def run_pipeline(
    settings: Settings,
    options: PipelineOptions,
    *,
    job: Job,
    clock: Clock,
    soak_step: SoakStep,
    apply_clock: Clock | None = None,
    progress: ProgressCallback | None = None,
) -> PipelineState:
    """Advances the pipeline as far as its gates allow and returns where it stands; ``progress`` hears from both
    applies after each committed batch."""
    staging_env = settings.env(options.staging)
    production_env = settings.env(options.production)
    if staging_env.kind != "staging" or production_env.kind != "production":
        raise UsageError(
            f"--staging must name a staging environment and --production a production one "
            f"({staging_env.name} is {staging_env.kind}, {production_env.name} is {production_env.kind})"
        )
    # Every parameter is checked before the pipeline's run is recorded, so bad input writes nothing.
    priority = (
        PlanParams(since=options.since, priority=options.priority, rate=options.rate, batch_size=options.batch_size)
        .normalized(job)
        .priority
    )
    options = replace(options, priority=priority)
    with Database(staging_env) as staging, Database(production_env) as production:
        run = _pipeline_run(staging, options, job, clock.now())
        state = _state_of(run)
        if _note_rollbacks(settings, options, state, {"staging": staging, "production": production}, clock.now()):
            _close(staging, state, clock.now(), "final gate rewritten: an apply it relied on was rolled back")
            return state
        if state.done:
            state.log.append("the pipeline already reached its final gate: nothing to do")
            return state
        p = _Invocation(
            settings, options, clock, apply_clock or clock, progress, soak_step, job, state, staging, production
        )
        if _advance(p):
            steps = state.steps
            steps["final_gate"] = write_final_gate(settings, options, state.run_id, steps, now=clock.now())
            state.done = True
            state.waiting_for = None
            state.log.append(f"final gate: {steps['final_gate']['verdict']} ({steps['final_gate']['artifact']})")
            _close(staging, state, clock.now(), "final gate written")
        return state


@dataclass
class _Invocation:
    """One invocation of a pipeline: what it runs with, where, and the state it advances."""

    settings: Settings
    options: PipelineOptions
    clock: Clock
    apply_clock: Clock
    progress: ProgressCallback | None
    soak_step: SoakStep
    job: Job
    state: PipelineState
    staging: Database
    production: Database

    @property
    def staging_env(self) -> Environment:
        return self.staging.env

    @property
    def production_env(self) -> Environment:
        return self.production.env

    def approved(self, db: Database, run_id: str, gate: str, env: Environment) -> bool:
        """True when ``gate`` of ``run_id`` is approved; otherwise the state, saying what it waits for, is saved."""
        if _approve_or_wait(db, run_id, gate, self.options, self.clock.now(), self.state, env.name):
            return True
        self.save()
        return False

    def save(self) -> None:
        _save(self.staging, self.state, self.clock.now())


def _advance(p: _Invocation) -> bool:
    """Does every step whose gate is open, in order; True when the final gate is next, False when it stopped at a
    gate (the state says which)."""
    steps = p.state.steps
    if "plan" not in steps:
        _plan_step(p)
    plan_run = steps["plan"]["run_id"]
    if not p.approved(p.staging, plan_run, "plan", p.staging_env):
        return False
    if "apply" not in steps:
        _staging_apply_step(p, plan_run)
    if steps["apply"]["verdict"] != "PASS":
        p.state.waiting_for = f"the staging backfill gate is {steps['apply']['verdict']}: fix or roll back"
        p.save()
        return False
    if not p.approved(p.staging, plan_run, "review", p.staging_env):
        return False
    if "soak" not in steps:
        steps["soak"] = dict(p.soak_step(p.staging, p.staging_env, plan_run, p.clock, p.settings.artifacts_dir))
        p.state.log.append(f"soak {steps['soak']['run_id']}: {steps['soak']['verdict']}")
    if not p.approved(p.staging, steps["soak"]["run_id"], "soak", p.staging_env):
        return False
    if not p.approved(p.staging, p.state.run_id, "production", p.staging_env):
        return False
    if "health" not in steps:
        health = _check_production(p)
        steps["health"] = health.step_record()
        p.state.log.append(f"health {health.run_id}: {'healthy' if health.healthy else 'not healthy'}")
    mini = steps["health"]["mini_plan"]
    if mini and "production_apply" not in steps:
        return _production_apply_step(p, mini)
    return True


def _plan_step(p: _Invocation) -> None:
    """Plans the backfill on staging."""
    o = p.options
    params = PlanParams(since=o.since, priority=o.priority, rate=o.rate, batch_size=o.batch_size)
    files = build_plan(
        p.staging, p.staging_env, p.job, params, now=p.clock.now(), artifacts_dir=p.settings.artifacts_dir
    )
    plan = files.plan
    p.state.steps["plan"] = {
        "run_id": plan.run_id,
        "candidates": len(plan.runnable),
        "blocked": plan.blocked_categories(),
        "artifact": str(files.md_path),
    }
    p.state.log.append(f"plan {plan.run_id}: {len(plan.runnable)} candidates on {p.staging_env.name}")


def _staging_apply_step(p: _Invocation, plan_run: str) -> None:
    """Applies the approved staging plan and writes its gate."""
    artifacts = p.settings.artifacts_dir
    result = apply_plan(
        p.staging,
        p.staging_env,
        p.job,
        plan_from_ledger(p.staging, plan_run),
        options=ApplyOptions(),
        clock=p.apply_clock,
        artifacts_dir=artifacts,
        settings=p.settings,
        progress=p.progress,
    )
    report = write_apply_artifacts(
        p.staging, p.staging_env, p.job, plan_run, clock=p.clock, artifacts_dir=artifacts, result=result
    )
    p.state.steps["apply"] = {
        "run_id": plan_run,
        "status": result.status.value,
        "verdict": report.verdict,
        "results": dict(result.counts),
        # The whole run's, every invocation counted (the ledger's events), as backfill_summary.md shows them.
        "elapsed_seconds": report.runtime_seconds,
        "rate_per_minute": report.rate_per_minute,
        "artifacts": {k: str(v) for k, v in report.paths.items()},
    }
    p.state.log.append(f"apply {plan_run}: {result.status.value}, gate {report.verdict}")


def _check_production(p: _Invocation) -> HealthResult:
    return check_health(
        p.production,
        p.production_env,
        since=p.options.since,
        now=p.clock.now(),
        artifacts_dir=p.settings.artifacts_dir,
        job=p.job,
        clock=p.clock,
    )


def _production_apply_step(p: _Invocation, mini: str) -> bool:
    """Applies health's mini plan on production once it is approved and the production gate lets it through (a
    blocked gate waits for a person's override); False when it stopped at a gate."""
    mini_plan = load_plan(Path(mini))
    ensure_run_for_plan(p.production, mini_plan, now=p.clock.now())
    if not p.approved(p.production, mini_plan.run_id, "plan", p.production_env):
        return False
    with p.production.connect() as conn:
        mini_run = ledger.get_run(conn, mini_plan.run_id, with_plan=False)
    applied: ApplyResult | None = None
    if mini_run.status != RunStatus.SUCCEEDED:
        try:
            applied = apply_plan(
                p.production,
                p.production_env,
                p.job,
                mini_plan,
                options=ApplyOptions(),
                clock=p.apply_clock,
                artifacts_dir=p.settings.artifacts_dir,
                settings=p.settings,
                progress=p.progress,
            )
        except GateBlocked as exc:
            if exc.gate != "production":
                raise
            # The production gate (no approved, passing soak) is lifted only by a person: an override on the
            # apply itself, after which this pipeline picks the finished run up and carries on.
            p.state.waiting_for = (
                f"{exc}; or `gatefill apply {mini} --env {p.production_env.name} --override-gate "
                f"--by NAME --reason TEXT`"
            )
            p.state.blocked = exc
            p.save()
            return False
    # else: applied outside the pipeline (e.g. with --override-gate): its ledger is the record.
    _record_production_apply(p, mini_run.id, applied)
    return True


def _record_production_apply(p: _Invocation, run_id: str, applied: ApplyResult | None) -> None:
    """Writes the production apply's gate, checks production's health again and records the step."""
    report = write_apply_artifacts(
        p.production,
        p.production_env,
        p.job,
        run_id,
        clock=p.clock,
        artifacts_dir=p.settings.artifacts_dir,
        result=applied,
    )
    with p.production.connect() as conn:
        finished = ledger.get_run(conn, run_id, with_plan=False)
        results = Counter(ledger.session_results_for(conn, run_id).values())
    after = _check_production(p)
    p.state.steps["production_apply"] = {
        "run_id": run_id,
        "status": finished.status.value,
        "verdict": report.verdict,
        "results": dict(results),
        "healthy_after": after.healthy,
        "health_after": after.run_id,
        "artifacts": {k: str(v) for k, v in report.paths.items()},
    }
    p.state.log.append(f"production apply {run_id}: {finished.status.value}, gate {report.verdict}")
