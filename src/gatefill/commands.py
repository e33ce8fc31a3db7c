"""One function per ``gatefill`` command (as alembic's ``command.py``): each opens the environments it needs, calls the
phase and its report writer, and returns a result, which the CLI renders and turns into an exit code.

A command takes what the CLI parsed (``Settings``, names, typed options) and raises ``GatefillError`` for what it
refuses. The platform stand-in and the sandbox (the functions server, the simulator, the soak's probes, the demo, the
seed scenarios) are imported by the commands that use them, when they run: they take most of a second to load, which
every other command would pay at start-up.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from rich.console import Console

from gatefill import ledger, notify
from gatefill.apply import ApplyOptions, ApplyResult, BackfillGate, ProgressCallback, apply_plan, measure_backfill_gate
from gatefill.clock import Clock, RealClock
from gatefill.config import EXAMPLE_CONFIG, WATCH_PERIODS, Environment, Settings
from gatefill.db import Database, PoolerFinding, detect_pooler
from gatefill.errors import UsageError
from gatefill.gate import GateRecord, Override, gate_records
from gatefill.health import HealthResult, check_health
from gatefill.job import Baseline, BatchTask, Job, Measurement, SoakSettings
from gatefill.jobs import JobEntry, available_jobs, get_job
from gatefill.lease import RunLease
from gatefill.metrics import MetricsExport, MetricsTargets
from gatefill.pipeline import PipelineOptions, PipelineState, note_rollback, run_pipeline
from gatefill.plan import PlanFiles, PlanHead, PlanParams, build_plan, open_plan, plan_from_ledger
from gatefill.prism.schema import SchemaReport, check_schema, init_schema, load_reference_data
from gatefill.prism.scoring import score_jsonl
from gatefill.reports.apply import write_apply_artifacts
from gatefill.reports.health import write_health_check
from gatefill.reports.rollback import write_rollback_report
from gatefill.reports.soak import write_soak_artifacts
from gatefill.rollback import RollbackResult, rollback_run
from gatefill.runs import ApprovalOutcome, RunProgress, find_run, recent_runs, run_progress
from gatefill.runs import approve as record_approval
from gatefill.soak import SoakOptions, SoakResult, soak_job
from gatefill.watch import WatchResult, watch_forever, watch_once
from gatefill.workers import Coordinator, check_workers, serve

if TYPE_CHECKING:
    from gatefill.prism.sandbox.seed import SeedReport
    from gatefill.prism.sandbox.simulator import SimulationReport

__all__ = [
    "Applied",
    "RolledBack",
    "SchemaCheck",
    "SchemaReady",
    "Simulated",
    "apply",
    "approve",
    "db_check",
    "db_init",
    "demo",
    "gates",
    "health",
    "init",
    "jobs",
    "pipeline",
    "plan",
    "recent",
    "rollback",
    "rollback_environment",
    "score",
    "seed",
    "serve_functions",
    "simulate",
    "soak",
    "status",
    "ui",
    "watch",
    "worker",
]


def jobs(settings: Settings) -> list[JobEntry]:
    """``gatefill jobs``: every job ``--job`` can name, with its kind and where it comes from."""
    return available_jobs(settings)


# ------------------------------------------------------------------------------------------------- set-up and data


def init(path: Path, *, force: bool) -> Path:
    """``gatefill init``: writes the commented example gatefill.toml to ``path``."""
    if path.exists() and not force:
        raise UsageError(f"{path} already exists (use --force to overwrite)")
    path.write_text(EXAMPLE_CONFIG, encoding="utf-8")
    return path


@dataclass(frozen=True)
class SchemaReady:
    """What ``gatefill db init`` did: where, and the reference rows it added per table."""

    display_url: str
    added: dict[str, int]


def db_init(settings: Settings, env_name: str) -> SchemaReady:
    """``gatefill db init``: creates the PRISM tables (idempotently) and loads the reference data."""
    with Database(settings.env(env_name), create=True) as db:
        init_schema(db)
        return SchemaReady(db.display_url, load_reference_data(db))


@dataclass(frozen=True)
class SchemaCheck:
    """What ``gatefill db check`` found: the connection's pooling and the schema's missing pieces."""

    display_url: str
    pooling: PoolerFinding
    schema: SchemaReport

    @property
    def exit_code(self) -> int:
        return 1 if self.schema.missing or self.pooling.mismatch else 0


def db_check(settings: Settings, env_name: str) -> SchemaCheck:
    """``gatefill db check``: what pools the connection and whether every table and column the pipeline needs exists
    (read-only)."""
    with Database(settings.env(env_name)) as db:
        pooling = detect_pooler(db)
        return SchemaCheck(db.display_url, pooling, check_schema(db))


def score(kind: str, lines: Iterable[str]) -> Iterator[str]:
    """``gatefill score KIND``: one output line per input line, scored with the exact PRISM algorithms."""
    return score_jsonl(kind, lines)


def seed(
    settings: Settings,
    env_name: str,
    scenario: str,
    *,
    sessions: int | None,
    missing_fraction: float | None,
    seed: int,
    now: datetime | None,
    replace: bool,
) -> SeedReport:
    """``gatefill seed``: writes a scenario's PRISM data and returns exactly what was built."""
    from gatefill.prism.sandbox.seed import seed_scenario, validate_seed_arguments

    # Validated before the database (file) is created, so bad input writes nothing.
    validate_seed_arguments(scenario, sessions=sessions, missing_fraction=missing_fraction, seed=seed, now=now)
    with Database(settings.env(env_name), create=True) as db:
        init_schema(db)
        load_reference_data(db)
        return seed_scenario(
            db, scenario, sessions=sessions, missing_fraction=missing_fraction, seed=seed, now=now, replace=replace
        )


def demo(directory: Path, console: Console, *, fast: bool) -> PipelineState:
    """``gatefill demo``: the whole pipeline on embedded SQLite environments under ``directory``."""
    from gatefill.prism.sandbox.demo import run_full_demo

    return run_full_demo(directory, console, fast=fast)


# ------------------------------------------------------------------------------------------------------ the phases


def plan(settings: Settings, env_name: str, params: PlanParams, *, job_name: str | None = None) -> PlanFiles:
    """``gatefill plan``: discovers what needs backfilling, writes the plan files and records a planned run."""
    job = get_job(job_name, settings)
    environment = settings.env(env_name)
    params = params.normalized(job)
    with Database(environment) as db, notify.notifying(settings.notify):
        job.require_schema(db)
        files = build_plan(db, environment, job, params, now=RealClock().now(), artifacts_dir=settings.artifacts_dir)
        if files.plan.runnable:
            notify.send(notify.gate_waiting(environment.name, files.plan.run_id, "plan"))
        return files


def approve(
    settings: Settings, run_id: str, *, gate: str, by: str, note: str | None, env_name: str | None
) -> ApprovalOutcome:
    """``gatefill approve``: records an approval of a run's gate (once)."""
    return record_approval(settings, run_id, gate=gate, by=by, note=note, env_name=env_name)


@dataclass(frozen=True)
class Applied:
    """What ``gatefill apply`` did: the apply itself and the backfill gate measured (and written) after it."""

    result: ApplyResult
    gate: BackfillGate

    @property
    def exit_code(self) -> int:
        return self.gate.exit_code


def apply(
    settings: Settings,
    target: str,
    *,
    env_name: str | None,
    options: ApplyOptions,
    override: Override | None,
    job_name: str | None = None,
    progress: ProgressCallback | None = None,
    workers: int | None = None,
    metrics_file: Path | None = None,
    pushgateway: str | None = None,
) -> Applied:
    """``gatefill apply RUN|PLAN.json``: applies an approved plan with the job it names (``job_name``, when given,
    must be that job), then measures and writes its backfill gate. ``workers`` (Postgres): the batches are committed
    by that many local worker processes (and any ``gatefill worker`` joining from elsewhere). ``metrics_file`` and
    ``pushgateway`` receive the run's metrics after each committed batch (at most once a second) and at the end."""
    targets = MetricsTargets.resolve(settings.metrics, metrics_file, pushgateway)
    path = Path(target)
    body: PlanHead
    if target.endswith(".json") or path.is_file():
        body = open_plan(path)  # streamed: the candidates are read a batch at a time, never held whole
        environment = settings.env(env_name or body.environment.name)
    else:
        environment, _ = find_run(settings, target, env_name)
        with Database(environment) as db:
            body = plan_from_ledger(db, target)
    if job_name is not None and job_name != body.job:
        raise UsageError(f"--job {job_name}: the plan is for job {body.job}")
    job = get_job(body.job, settings)
    if override is not None:
        override.validate()
    clock, artifacts = RealClock(), settings.artifacts_dir
    with (
        Database(environment) as db,
        MetricsExport(environment, targets, clock) as export,
        notify.notifying(settings.notify),
    ):
        check_workers(db, workers, options.executor)
        result = apply_plan(
            db,
            environment,
            job,
            body,
            options=options,
            clock=clock,
            artifacts_dir=artifacts,
            progress=_exporting(export, progress),
            settings=settings,
            override=override,
            run_batches=_coordinator(settings, environment, workers) if db.caps.dialect == "postgresql" else None,
            on_start=export.started,
        )
        gate = measure_backfill_gate(
            db,
            environment,
            job,
            result.run_id,
            clock=clock,
            artifacts_dir=artifacts,
            max_failures=options.max_failures,
            result=result,
        )
        return Applied(result, write_apply_artifacts(db, job, gate, artifacts))


def _exporting(export: MetricsExport, progress: ProgressCallback | None) -> ProgressCallback:
    """The progress callback that exports the run's metrics after each committed batch, then shows progress."""

    def after_batch(done: int, total: int, elapsed: float) -> None:
        export.moment()
        if progress is not None:
            progress(done, total, elapsed)

    return after_batch


def _coordinator(settings: Settings, env: Environment, workers: int | None) -> Coordinator | None:
    """With ``--workers N``: the coordinator that starts N local ``gatefill worker`` processes for ``env``."""
    if workers is None:
        return None
    config = ["--config", str(settings.path)] if settings.path is not None else []
    return Coordinator(workers, [sys.executable, "-m", "gatefill", *config, "worker", "--env", env.name])


def worker(
    settings: Settings,
    env_name: str,
    *,
    on_batch: Callable[[BatchTask, str], None] | None = None,
    until_pid: int | None = None,
) -> None:
    """``gatefill worker --env NAME``: commits the batches every ``apply --workers`` queues in that environment's
    database, with the jobs gatefill.toml defines, until Ctrl-C or SIGTERM."""
    environment = settings.env(env_name)
    with Database(environment) as db:
        serve(db, lambda name: get_job(name, settings), on_batch=on_batch, until_pid=until_pid)


def soak(
    settings: Settings,
    options: SoakOptions,
    *,
    env_name: str | None,
    clock: str,
    latency_p95_ms: float,
    job_name: str | None = None,
    on_look: Callable[[Measurement], None] | None = None,
    on_baseline: Callable[[Baseline], None] | None = None,
    metrics_file: Path | None = None,
    pushgateway: str | None = None,
) -> SoakResult:
    """``gatefill soak``: watches an environment (``env_name``, or the one of the soak ``options.resume`` names) for a
    window, look by look, with the job's checks, and writes the soak's files. ``metrics_file`` and ``pushgateway``
    receive the soak's metrics after each look and at the end."""
    targets = MetricsTargets.resolve(settings.metrics, metrics_file, pushgateway)
    job = get_job(job_name, settings)
    if env_name is not None:
        environment = settings.env(env_name)
    elif options.resume is not None:
        environment, _ = find_run(settings, options.resume)
    else:
        raise UsageError("--env NAME is required (or --resume RUN, which knows its environment)")
    with MetricsExport(environment, targets, RealClock()) as export, notify.notifying(settings.notify):

        def look(measurement: Measurement) -> None:
            export.moment(force=True)
            if on_look is not None:
                on_look(measurement)

        result = soak_job(
            environment,
            job,
            options,
            clock=clock,
            settings=SoakSettings(latency_p95_ms=latency_p95_ms),
            on_look=look,
            on_baseline=on_baseline,
            on_start=export.started,
        )
        _announce_soak(environment.name, result)
    return write_soak_artifacts(result, settings.artifacts_dir)


def _announce_soak(env: str, result: SoakResult) -> None:
    """A finished soak: a PASS waits at the soak gate, a FAIL is a failed run, an interrupted one is paused."""
    if result.interrupted:
        notify.send(notify.run_paused(env, result.run_id, result.reason))
    elif result.verdict == "FAIL":
        notify.send(notify.run_failed(env, result.run_id, result.reason))
    elif result.verdict == "PASS" and result.complete:
        notify.send(notify.gate_waiting(env, result.run_id, "soak"))


def health(
    settings: Settings, env_name: str, *, since: datetime, at: datetime | None, job_name: str | None = None
) -> HealthResult:
    """``gatefill health``: read-only health checks of an environment as of ``at`` (default now), written with the
    mini backfill plan when anything needs work."""
    environment = settings.env(env_name)
    job = get_job(job_name, settings)
    with Database(environment) as db:
        job.require_schema(db)
        result = check_health(
            db,
            environment,
            job=job,
            since=since,
            now=at or RealClock().now(),
            # Without --at the report is dated when the measurement finished; with it, at the instant asked for.
            clock=None if at else RealClock(),
        )
    return write_health_check(result, settings.artifacts_dir)


def pipeline(
    settings: Settings,
    options: PipelineOptions,
    *,
    soak_duration: float,
    soak_interval: float,
    job_name: str | None = None,
) -> PipelineState:
    """``gatefill pipeline``: advances the whole pipeline as far as its gates allow; its soak step watches staging
    for ``soak_duration`` seconds, a look every ``soak_interval``."""
    job = get_job(job_name, settings)

    def soak_step(db: Database, env: Environment, apply_run: str, clock: Any, artifacts: Path) -> dict[str, Any]:
        options = SoakOptions(after=apply_run, duration=soak_duration, interval=soak_interval)
        return write_soak_artifacts(soak_job(env, job, options), artifacts).step_record()

    with notify.notifying(settings.notify):
        return run_pipeline(settings, options, job=job, clock=RealClock(), soak_step=soak_step)


@dataclass(frozen=True)
class RolledBack:
    """What ``gatefill rollback`` did: the rollback, and the pipelines whose final gate it outdated (rewritten)."""

    result: RollbackResult
    pipelines: list[PipelineState]

    @property
    def exit_code(self) -> int:
        return self.result.exit_code


def rollback(settings: Settings, run_id: str, *, env_name: str | None, dry_run: bool, force: bool) -> RolledBack:
    """``gatefill rollback RUN``: restores exactly what an apply run changed and writes the report; a committed
    rollback rewrites the final gate of every pipeline that relied on the run."""
    environment, _ = find_run(settings, run_id, env_name)
    result = rollback_environment(
        environment,
        run_id,
        dry_run=dry_run,
        force=force,
        artifacts_dir=settings.artifacts_dir,
        find_job=lambda name: get_job(name, settings),
    )
    pipelines = note_rollback(settings, run_id, clock=RealClock()) if result.committed else []
    return RolledBack(result, pipelines)


def rollback_environment(
    env: Environment,
    run_id: str,
    *,
    dry_run: bool,
    force: bool,
    artifacts_dir: Path,
    find_job: Callable[[str], Job],
    now: datetime | None = None,
) -> RollbackResult:
    """Rolls back ``run_id`` of ``env`` under the run's lease with its job's tables (``find_job``: the job by the name
    the ledger recorded), writes the report, and raises when the rollback was refused (conflicts) or failed
    verification (nothing committed)."""
    with Database(env) as db:
        with db.connect() as conn:
            if not sa.inspect(conn).has_table(ledger.runs.name):
                raise ledger.RunNotFound(run_id, f"{db.display_url} (it has no run ledger)")
            run = ledger.get_run(conn, run_id, where=db.display_url)
        tables = find_job(run.job).written_tables()
        # The run's lease: a rollback never interleaves with an apply (or another rollback) of the same run.
        with RunLease(db, run_id, "rollback") as lease:
            result = rollback_run(
                db,
                run_id,
                tables,
                now=now or datetime.now(UTC),
                artifacts_dir=artifacts_dir,
                dry_run=dry_run,
                force=force,
                fence=lease.fence,
            )
            result = write_rollback_report(result, artifacts_dir)
    result.raise_for_verdict()
    return result


@dataclass(frozen=True)
class Watched:
    """What ``gatefill watch`` did: the last pass (with ``--once``, the only one) and what stopped the loop."""

    last: WatchResult | None
    once: bool
    stopped_by: str | None = None

    @property
    def exit_code(self) -> int:
        """``--once``: 1 when a check FAILed, else 0; the loop: 0 once a signal stopped it cleanly."""
        return self.last.exit_code if self.once and self.last is not None else 0


def watch(
    settings: Settings,
    env_name: str,
    *,
    once: bool,
    only: str | None = None,
    job_name: str | None = None,
    clock: Clock | None = None,
    on_result: Callable[[WatchResult], None] | None = None,
    stop: threading.Event | None = None,
) -> Watched:
    """``gatefill watch``: the job's checks over the latest period, each set when it is due, recorded in the
    environment's ledger; with ``once``, what is due now and no more."""
    if only is not None and only not in WATCH_PERIODS:
        raise UsageError(f"--set {only}: unknown set (use {', '.join(WATCH_PERIODS)})")
    environment = settings.env(env_name)
    job = get_job(job_name, settings)
    clock = clock or RealClock()
    with Database(environment) as db, notify.notifying(settings.notify):
        job.require_schema(db)
        if once:
            result = watch_once(db, environment, job, clock=clock, only=only)
            if on_result is not None:
                on_result(result)
            return Watched(result, once=True)
        seen: list[WatchResult] = []

        def keep(result: WatchResult) -> None:
            seen[:] = [result]
            if on_result is not None:
                on_result(result)

        stopped = watch_forever(db, environment, job, clock=clock, only=only, stop=stop, on_result=keep)
        return Watched(seen[-1] if seen else None, once=False, stopped_by=stopped)


# ------------------------------------------------------------------------------------------------- runs and gates


def gates(settings: Settings, env_name: str | None) -> list[GateRecord]:
    """``gatefill gates``: every approval and override recorded, with who, when and why."""
    return gate_records(settings, env_name)


def status(settings: Settings, run_id: str, env_name: str | None) -> RunProgress:
    """``gatefill status RUN``: how far a run got."""
    return run_progress(settings, run_id, env_name)


def recent(settings: Settings, env_name: str | None) -> list[tuple[str, ledger.Run]]:
    """``gatefill status``: the recent runs of each environment."""
    return recent_runs(settings, env_name)


# ------------------------------------------------------------------------------------------------- the console


def ui(
    settings: Settings,
    env_names: list[str],
    *,
    host: str,
    port: int,
    token_env: str | None,
    on_ready: Callable[[str], None],
) -> None:
    """``gatefill ui``: serves the operator console of ``env_names`` until stopped; approvals clicked there are
    recorded by :func:`approve`, as ``gatefill approve`` records them. Read-only without ``token_env``."""
    from gatefill.console import ConsoleConfig, serve_console

    if not env_names:
        raise UsageError("--env NAME is required (repeat it for each environment the console shows)")
    for name in env_names:
        settings.env(name)
    token = None
    if token_env is not None:
        token = os.environ.get(token_env, "")
        if not token.strip():
            raise UsageError(f"--auth-token-env {token_env}: that environment variable is not set or is empty")
    config = ConsoleConfig(settings, tuple(dict.fromkeys(env_names)), token, approve)
    serve_console(config, host=host, port=port, on_ready=on_ready)


# ------------------------------------------------------------------------------------------- the platform stand-in


def serve_functions(
    settings: Settings,
    env_name: str,
    *,
    host: str,
    port: int,
    allow_fault_injection: bool,
    workers: int,
    call_timeout: float,
    on_ready: Callable[[str], None],
) -> None:
    """``gatefill serve functions``: serves the PRISM edge functions over HTTP until stopped."""
    from gatefill.prism.platform.server import serve_functions as serve

    serve(
        settings.env(env_name),
        host=host,
        port=port,
        allow_fault_injection=allow_fault_injection,
        on_ready=on_ready,
        workers=workers,
        call_timeout=call_timeout,
    )


@dataclass(frozen=True)
class Simulated:
    """The simulation's report; calls that got no answer make the ground truth incomplete (exit 1)."""

    report: SimulationReport

    @property
    def exit_code(self) -> int:
        return 1 if self.report.totals()["transport_errors"] else 0


def simulate(
    settings: Settings,
    env_name: str,
    *,
    functions_url: str | None,
    sessions: int | None,
    rate: str | None,
    duration: str | None,
    clock: str,
    start: datetime | None,
    inject: str | None,
    seed: int,
    json_path: Path | None,
) -> Simulated:
    """``gatefill simulate``: live respondents against the functions, with injected faults; the full report (every
    respondent) is also written to ``json_path`` when given."""
    from gatefill.prism.sandbox.simulator import run_simulation

    report = run_simulation(
        settings.env(env_name),
        functions_url=functions_url,
        sessions=sessions,
        rate=rate,
        duration=duration,
        clock=clock,
        start=start,
        inject=inject,
        seed=seed,
    )
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return Simulated(report)
