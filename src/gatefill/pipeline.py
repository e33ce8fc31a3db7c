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

from gatefill import ledger, notify
from gatefill.apply import (
    ApplyOptions,
    ApplyResult,
    BackfillGate,
    ProgressCallback,
    apply_plan,
    ensure_run_for_plan,
    measure_backfill_gate,
)
from gatefill.clock import Clock
from gatefill.config import DEFAULT_BATCH_SIZE, DEFAULT_RATE, Settings
from gatefill.db import Database, format_utc
from gatefill.errors import GateBlocked, UsageError
from gatefill.final_gate import exit_code_for, measure_final_gate
from gatefill.health import HealthResult, check_health
from gatefill.job import Job
from gatefill.ledger import RunStatus
from gatefill.plan import Plan, PlanHead, PlanParams, build_plan, load_plan, plan_from_ledger
from gatefill.reports.apply import write_apply_artifacts
from gatefill.reports.final_gate import write_final_gate
from gatefill.reports.health import write_health_check

__all__ = ["STEPS", "PipelineOptions", "PipelineState", "SoakStep", "note_rollback", "run_pipeline"]

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
    rate: str = DEFAULT_RATE
    batch_size: int = DEFAULT_BATCH_SIZE
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

    @property
    def final_verdict(self) -> str | None:
        """The final gate's verdict (GO, NO-GO, INCONCLUSIVE), None before the pipeline reached it."""
        final = self.steps.get("final_gate") or {}
        return str(final["verdict"]) if final.get("verdict") else None

    @property
    def final_exit_code(self) -> int:
        """The final gate's exit code: GO 0, NO-GO 1, INCONCLUSIVE (or no final gate yet) 3."""
        return exit_code_for(self.final_verdict)

    @property
    def exit_code(self) -> int:
        """The final gate's exit code once the pipeline is done; 4 while it waits at a gate."""
        return self.final_exit_code if self.done else 4


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
    gate = _final_gate(settings, options, state.run_id, state.steps, now)
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
        rate=str(p.get("rate", DEFAULT_RATE)),
        batch_size=int(p.get("batch_size", DEFAULT_BATCH_SIZE)),
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
    notify.send(notify.gate_waiting(env, run_id, gate, page="/pipeline" if gate == "production" else None))
    return False


def _save(db: Database, state: PipelineState, now: datetime) -> None:
    with db.begin() as conn:
        ledger.runs_update_summary(
            conn, state.run_id, {"steps": state.steps, "done": state.done, "waiting_for": state.waiting_for}, now=now
        )


@dataclass(frozen=True)
class _Step:
    """What every step of one invocation of the pipeline works with."""

    settings: Settings
    options: PipelineOptions
    job: Job
    clock: Clock
    apply_clock: Clock
    progress: ProgressCallback | None
    soak_step: SoakStep
    staging: Database
    production: Database
    run_id: str

    def approved(self, state: PipelineState, run_id: str, gate: str, *, production: bool = False) -> bool:
        """Whether ``gate`` of ``run_id`` is approved (or was auto-approved now); else ``state`` says what it awaits."""
        db = self.production if production else self.staging
        return _approve_or_wait(db, run_id, gate, self.options, self.clock.now(), state, db.env.name)


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
    options = replace(options, priority=_plan_params(options).normalized(job).priority)
    with Database(staging_env) as staging, Database(production_env) as production:
        run = _pipeline_run(staging, options, job, clock.now())
        state = _state_of(run)
        if _note_rollbacks(settings, options, state, {"staging": staging, "production": production}, clock.now()):
            _close(staging, state, clock.now(), "final gate rewritten: an apply it relied on was rolled back")
            return state
        if state.done:
            state.log.append("the pipeline already reached its final gate: nothing to do")
            return state
        step = _Step(
            settings, options, job, clock, apply_clock or clock, progress, soak_step, staging, production, run.id
        )
        for advance in (_plan, _staging_apply, _soak, _health, _production_apply):
            if not advance(step, state):
                _save(staging, state, clock.now())
                return state
        state.steps["final_gate"] = _final_gate(settings, options, state.run_id, state.steps, clock.now())
        state.done = True
        state.waiting_for = None
        final = state.steps["final_gate"]
        state.log.append(f"final gate: {final['verdict']} ({final['artifact']})")
        _close(staging, state, clock.now(), "final gate written")
        return state


def _plan_params(options: PipelineOptions) -> PlanParams:
    return PlanParams(since=options.since, priority=options.priority, rate=options.rate, batch_size=options.batch_size)


def _plan(step: _Step, state: PipelineState) -> bool:
    """Plans the staging backfill (once), then waits for the plan's approval."""
    steps = state.steps
    if "plan" not in steps:
        env, artifacts = step.staging.env, step.settings.artifacts_dir
        files = build_plan(
            step.staging, env, step.job, _plan_params(step.options), now=step.clock.now(), artifacts_dir=artifacts
        )
        plan = files.plan
        steps["plan"] = {
            "run_id": plan.run_id,
            "candidates": len(plan.runnable),
            "blocked": plan.blocked_categories(),
            "artifact": str(files.md_path),
        }
        state.log.append(f"plan {plan.run_id}: {len(plan.runnable)} candidates on {env.name}")
    return step.approved(state, steps["plan"]["run_id"], "plan")


def _staging_apply(step: _Step, state: PipelineState) -> bool:
    """Applies the approved plan on staging (once); goes on when its backfill gate passed and it was reviewed."""
    steps = state.steps
    plan_run = steps["plan"]["run_id"]
    if "apply" not in steps:
        result = _apply(step, step.staging, plan_from_ledger(step.staging, plan_run))
        gate = _backfill_gate(step, step.staging, plan_run, result)
        steps["apply"] = {
            "run_id": plan_run,
            "status": result.status.value,
            "verdict": gate.verdict,
            "results": dict(result.counts),
            # The whole run's, every invocation counted (the ledger's events), as backfill_summary.md shows them.
            "elapsed_seconds": gate.runtime_seconds,
            "rate_per_minute": gate.rate_per_minute,
            "artifacts": {k: str(v) for k, v in gate.paths.items()},
        }
        state.log.append(f"apply {plan_run}: {result.status.value}, gate {gate.verdict}")
    if steps["apply"]["verdict"] != "PASS":
        state.waiting_for = f"the staging backfill gate is {steps['apply']['verdict']}: fix or roll back"
        return False
    return step.approved(state, plan_run, "review")


def _apply(step: _Step, db: Database, plan: Plan | PlanHead) -> ApplyResult:
    return apply_plan(
        db,
        db.env,
        step.job,
        plan,
        options=ApplyOptions(),
        clock=step.apply_clock,
        artifacts_dir=step.settings.artifacts_dir,
        settings=step.settings,
        progress=step.progress,
    )


def _backfill_gate(step: _Step, db: Database, run_id: str, result: ApplyResult | None) -> BackfillGate:
    """The apply gate of ``run_id``, measured and written (``backfill_gate.md`` and the rest)."""
    artifacts = step.settings.artifacts_dir
    gate = measure_backfill_gate(db, db.env, step.job, run_id, clock=step.clock, artifacts_dir=artifacts, result=result)
    return write_apply_artifacts(db, step.job, gate, artifacts)


def _soak(step: _Step, state: PipelineState) -> bool:
    """Soaks staging after the apply (once); goes on when the soak and the production go/no-go are approved."""
    steps = state.steps
    if "soak" not in steps:
        plan_run = steps["plan"]["run_id"]
        record = step.soak_step(step.staging, step.staging.env, plan_run, step.clock, step.settings.artifacts_dir)
        steps["soak"] = {**record, "gate_checks": _gate_checks(step.job, "soak")}
        state.log.append(f"soak {steps['soak']['run_id']}: {steps['soak']['verdict']}")
    return step.approved(state, steps["soak"]["run_id"], "soak") and step.approved(state, step.run_id, "production")


def _health(step: _Step, state: PipelineState) -> bool:
    """Checks production's health (once)."""
    if "health" not in state.steps:
        health = _health_check(step)
        state.steps["health"] = {**health.step_record(), "gate_checks": _gate_checks(step.job, "health")}
        state.log.append(f"health {health.run_id}: {'healthy' if health.healthy else 'not healthy'}")
    return True


def _gate_checks(job: Job, phase: str) -> list[list[str]]:
    """What the final gate's checklist cites of ``phase``, kept in the step record: a rewritten final gate (after a
    rollback) reads it without the job."""
    return [[g.check, g.label] for g in job.gate_checks(phase)]


def _health_check(step: _Step) -> HealthResult:
    db, clock = step.production, step.clock
    result = check_health(db, db.env, job=step.job, since=step.options.since, now=clock.now(), clock=clock)
    return write_health_check(result, step.settings.artifacts_dir)


def _production_apply(step: _Step, state: PipelineState) -> bool:
    """Applies production's mini plan, when health wrote one (once): after its approval and the production gate."""
    mini = state.steps["health"]["mini_plan"]
    if not mini or "production_apply" in state.steps:
        return True
    mini_plan = load_plan(Path(mini))
    ensure_run_for_plan(step.production, mini_plan, now=step.clock.now())
    if not step.approved(state, mini_plan.run_id, "plan", production=True):
        return False
    with step.production.connect() as conn:
        mini_run = ledger.get_run(conn, mini_plan.run_id, with_plan=False)
    applied: ApplyResult | None = None
    if mini_run.status != RunStatus.SUCCEEDED:
        try:
            applied = _apply(step, step.production, mini_plan)
        except GateBlocked as exc:
            if exc.gate != "production":
                raise
            # The production gate (no approved, passing soak) is lifted only by a person: an override on the apply
            # itself, after which this pipeline picks the finished run up and carries on.
            state.waiting_for = (
                f"{exc}; or `gatefill apply {mini} --env {step.production.env.name} --override-gate "
                f"--by NAME --reason TEXT`"
            )
            state.blocked = exc
            return False
    # else: applied outside the pipeline (e.g. with --override-gate): its ledger is the record.
    _record_production_apply(step, state, mini_run.id, _backfill_gate(step, step.production, mini_run.id, applied))
    return True


def _record_production_apply(step: _Step, state: PipelineState, run_id: str, gate: BackfillGate) -> None:
    """The production apply's step record: its gate, its results, and production's health after it."""
    with step.production.connect() as conn:
        finished = ledger.get_run(conn, run_id, with_plan=False)
        results = Counter(ledger.session_results_for(conn, run_id).values())
    after = _health_check(step)
    state.steps["production_apply"] = {
        "run_id": run_id,
        "status": finished.status.value,
        "verdict": gate.verdict,
        "results": dict(results),
        "healthy_after": after.healthy,
        "health_after": after.run_id,
        "artifacts": {k: str(v) for k, v in gate.paths.items()},
    }
    state.log.append(f"production apply {run_id}: {finished.status.value}, gate {gate.verdict}")


def _final_gate(
    settings: Settings, options: PipelineOptions, run_id: str, steps: Mapping[str, Any], now: datetime
) -> dict[str, Any]:
    """Judges the final gate from the ledgers now, writes ``pipeline_final_gate.md`` and returns its step record."""
    staging, production = settings.env(options.staging), settings.env(options.production)
    gate = measure_final_gate(staging, production, options.since, run_id, steps, now=now)
    return write_final_gate(gate, settings.artifacts_dir).step_record()
