"""The ``gatefill`` command line: parses, calls one ``gatefill.commands`` function, renders its result, and exits
with the result's exit code or the error's.

No logic lives here. ``GatefillError`` is caught once, in ``main``: one line ``error: ...`` on stderr and the exit code
of the error's class (0 ok/PASS, 1 FAIL or run errors, 2 usage/config error, 3 INCONCLUSIVE, 4 blocked by a gate);
a traceback only with ``--traceback``.
"""

from __future__ import annotations

import os
import sys
import textwrap
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gatefill import commands
from gatefill.apply import ApplyOptions, ApplyResult
from gatefill.artifacts import counts_text
from gatefill.clock import parse_duration
from gatefill.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RATE,
    DEFAULT_SINCE,
    DEFAULT_SOAK_DURATION,
    DEFAULT_SOAK_INTERVAL,
    DEFAULT_THROTTLE_INTERVAL,
    Settings,
    load_settings,
)
from gatefill.errors import GatefillError, UsageError
from gatefill.gate import Override
from gatefill.job import Baseline, BatchTask, Measurement
from gatefill.lease import describe_lease
from gatefill.ledger import Hold, PaceDecision
from gatefill.pipeline import PipelineOptions
from gatefill.plan import PlanParams
from gatefill.progress import apply_progress
from gatefill.reports.rollback import render_rollback
from gatefill.soak import DEFAULT_MIN_CONVERSION, SoakOptions, parse_margin, parse_min_conversion
from gatefill.watch import WatchResult

__all__ = ["app", "main"]

app = typer.Typer(
    name="gatefill",
    help="Guarded backfills of derived data in Postgres and SQLite: plan, apply, soak, health check, final gate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Create or check the PRISM schema of an environment.", no_args_is_help=True)
score_app = typer.Typer(
    help="Score JSON Lines from stdin with the exact PRISM algorithms (one output line per input line).",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
app.add_typer(score_app, name="score")

out = Console(highlight=False, soft_wrap=True)


@dataclass
class _State:
    """Options given before the command name."""

    config: Path | None = None
    traceback: bool = False


_STATE = _State()

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Path to gatefill.toml (default: $GATEFILL_CONFIG or ./gatefill.toml).")
]
EnvOption = Annotated[str, typer.Option("--env", help="Environment name from gatefill.toml.")]
JobOption = Annotated[
    str | None, typer.Option("--job", metavar="NAME", help="The job (`gatefill jobs` lists them; default prism).")
]
MetricsFileOption = Annotated[
    Path | None,
    typer.Option(
        "--metrics-file",
        metavar="PATH.prom",
        help="Write the run's and its environment's metrics (Prometheus text) to this file, atomically, for "
        "node_exporter's textfile collector.",
    ),
]
PushgatewayOption = Annotated[
    str | None,
    typer.Option(
        "--pushgateway",
        metavar="URL",
        help="Push the same metrics to this Pushgateway (group job/gatefill/env/ENV/run/RUN); failures are logged "
        "once and never stop the run. Default: pushgateway_url_env or pushgateway_url in the metrics table of "
        "gatefill.toml.",
    ),
]


@app.callback()
def _root(
    config: ConfigOption = None,
    show_traceback: Annotated[bool, typer.Option("--traceback", help="Show a traceback on errors.")] = False,
) -> None:
    _STATE.config = config
    _STATE.traceback = show_traceback


def _settings() -> Settings:
    return load_settings(_STATE.config)


@app.command("init")
def init_command(
    path: Annotated[Path, typer.Option("--path", help="Where to write the example.")] = Path("gatefill.toml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented example gatefill.toml."""
    out.print(f"wrote {commands.init(path, force=force)}")


@db_app.command("init")
def db_init_command(env: EnvOption) -> None:
    """Create the PRISM tables (idempotently) and load the reference data."""
    ready = commands.db_init(_settings(), env)
    out.print(f"schema ready on {ready.display_url}")
    for table, n in ready.added.items():
        out.print(f"  {table}: +{n} rows")


@db_app.command("check")
def db_check_command(env: EnvOption) -> None:
    """Verify (read-only) that the tables and columns the pipeline needs exist; list what is missing."""
    found = commands.db_check(_settings(), env)
    pooling, report = found.pooling, found.schema
    if pooling.mismatch:
        out.print(f"[bold red]{pooling.describe()}[/]", markup=True)
    if report.missing:
        out.print(f"[bold red]MISSING[/] on {found.display_url}: {len(report.missing)} table(s)/column(s)")
        for item in report.missing:
            out.print(f"  - {item}")
    elif not pooling.mismatch:
        out.print(f"[bold green]OK[/] {found.display_url}: every required table and column is present")
        table = Table("check", "finding")
        for name, finding in {"connection": pooling.describe(), **report.reference, **report.security}.items():
            table.add_row(name, finding)
        out.print(table)
    raise typer.Exit(found.exit_code)


def _score(kind: str) -> None:
    for line in commands.score(kind, sys.stdin):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


@score_app.command("profile")
def score_profile_command() -> None:
    """ProfileInput lines (as tests/prism/goldens/g*.input.json) → engine output lines (as g*.output.json)."""
    _score("profile")


@score_app.command("fc")
def score_fc_command() -> None:
    """{session_id, version, basis, responses, options} lines → {blocks_answered, scores, written} lines."""
    _score("fc")


@score_app.command("calibrate")
def score_calibrate_command() -> None:
    """{profile, conf_raw_params, cuts} lines → {conf_raw, conf_calibrated, confidence} lines."""
    _score("calibrate")


def _parse_when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"not an ISO-8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command("seed")
def seed_command(
    env: EnvOption,
    scenario: Annotated[str, typer.Option(help="staging-2025-09-17, production-2025-09-18 or synthetic.")],
    sessions: Annotated[int | None, typer.Option(help="Number of sessions (synthetic).")] = None,
    missing_fraction: Annotated[
        float | None, typer.Option("--missing-fraction", help="Share of sessions lacking rows (synthetic).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed builds the same data.")] = 0,
    now: Annotated[str | None, typer.Option(help="Simulated 'now' (ISO-8601); default: the scenario's date.")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Delete existing PRISM data rows first.")] = False,
) -> None:
    """Write realistic PRISM data for a scenario and print exactly what was built."""
    when = _parse_when(now)
    report = commands.seed(
        _settings(),
        env,
        scenario,
        sessions=sessions,
        missing_fraction=missing_fraction,
        seed=seed,
        now=when,
        replace=replace,
    )
    out.print(report.render(), markup=False)


@app.command("demo")
def demo_command(
    directory: Annotated[Path, typer.Option("--dir", help="Where to build the demo.")] = Path("gatefill-demo"),
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help="Apply unthrottled instead of 20 sessions/minute, and soak 600 simulated respondents instead of 1200.",
        ),
    ] = False,
) -> None:
    """The whole pipeline on embedded SQLite staging/production: plan, apply, soak, health, final gate."""
    state = commands.demo(directory, out, fast=fast)
    raise typer.Exit(state.final_exit_code)


SinceOption = Annotated[str, typer.Option("--since", help="Only sessions created at or after this date (ISO-8601).")]


def _since(value: str) -> datetime:
    parsed = _parse_when(value)
    assert parsed is not None
    return parsed


@app.command("plan")
def plan_command(
    env: EnvOption,
    since: SinceOption = DEFAULT_SINCE,
    priority: Annotated[
        list[str] | None, typer.Option("--priority", help="Session ids to process first (repeatable).")
    ] = None,
    rate: Annotated[str, typer.Option(help="Throttle for apply: e.g. 20/min, or unlimited.")] = DEFAULT_RATE,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Sessions per batch (one transaction).")
    ] = DEFAULT_BATCH_SIZE,
    profiles: Annotated[str, typer.Option(help="missing: only absent profiles; stale: also rescore stale ones.")] = (
        "missing"
    ),
    job_name: JobOption = None,
) -> None:
    """Discover what needs backfilling, write backfill_plan.json/.md and record a planned run (halts for approval)."""
    params = PlanParams(
        since=_since(since), priority=tuple(priority or ()), rate=rate, batch_size=batch_size, profiles=profiles
    )
    files = commands.plan(_settings(), env, params, job_name=job_name)
    plan = files.plan
    out.print(f"run [bold]{plan.run_id}[/] planned on {plan.environment.name}: {len(plan.runnable)} candidates")
    table = Table("category", "sessions", "operations")
    for name, keys in plan.categories().items():
        table.add_row(name, str(len(keys)), ", ".join(plan.operations_of(name)) or "not processed")
    out.print(table)
    for t, n in plan.expected_changes().items():
        out.print(f"expected {t}: +{n['insert']} inserted, {n['update']} updated")
    out.print(f"plan: {files.json_path}\nreport: {files.md_path}\nhash: {plan.hash}")
    out.print(f"next: gatefill approve {plan.run_id} --gate plan --by NAME")


@app.command("approve")
def approve_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    gate: Annotated[
        str,
        typer.Option("--gate", help="plan or review (an apply run), soak (a soak run), production (a pipeline run)."),
    ],
    by: Annotated[str, typer.Option("--by", help="Who approves.")],
    env: Annotated[str | None, typer.Option("--env", help="Environment of the run (default: search all).")] = None,
    note: Annotated[str | None, typer.Option("--note", help="Why.")] = None,
) -> None:
    """Record an approval (who, when, note, plan hash) for a gate of a run."""
    outcome = commands.approve(_settings(), run_id, gate=gate, by=by, note=note, env_name=env)
    a = outcome.approval
    if outcome.recorded:
        out.print(f"approved {a.gate} of {a.run_id} by {a.approved_by} at {a.at.isoformat()}", markup=False)
    else:
        out.print(
            f"{a.gate} of {a.run_id} was already approved by {a.approved_by} at {a.at.isoformat()}"
            + (f" ({a.note})" if a.note else "")
            + "; nothing recorded",
            markup=False,
        )


@app.command("apply")
def apply_command(
    target: Annotated[str, typer.Argument(metavar="RUN|PLAN.json", help="A planned run id or a plan file.")],
    env: Annotated[str | None, typer.Option("--env", help="Environment (default: the plan's).")] = None,
    rate: Annotated[
        str | None,
        typer.Option(
            help="Override the plan's rate (e.g. 20/min). unlimited: as fast as the indicators allow (a Hold then "
            "halves the measured throughput)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="A fixed batch size: wins over the plan's and over --target-batch-time (never resized; a Hold "
            "still halves it).",
        ),
    ] = None,
    target_batch_time: Annotated[
        float | None,
        typer.Option(
            "--target-batch-time",
            help="Seconds a batch should take: batches are sized from the measured ones, within --min-batch-size "
            "and --max-batch-size; 0 keeps the plan's size. [default: 1, or [throttle] target_batch_time]",
        ),
    ] = None,
    min_batch_size: Annotated[
        int | None, typer.Option("--min-batch-size", help="Smallest batch (sizing and Holds). [default: 1]")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option("--max-batch-size", help="Largest batch --target-batch-time may size. [default: 1000]")
    ] = None,
    cool_down: Annotated[
        float | None,
        typer.Option(
            "--cool-down",
            help="After a Stop, seconds every indicator must read Normal before the next batch. [default: 60]",
        ),
    ] = None,
    health: Annotated[
        bool,
        typer.Option(
            "--health/--no-health",
            help="Read the health indicators (replica lag, WAL rate, checkpoints, autovacuum, lock waits, "
            "connections, the app's metrics); thresholds in [throttle] of gatefill.toml.",
        ),
    ] = True,
    executor: Annotated[
        str, typer.Option(help="local (in-process), or one of the job's own (prism: functions, over HTTP).")
    ] = "local",
    max_failures: Annotated[int, typer.Option("--max-failures", help="Failures the gate tolerates.")] = 0,
    approve_as: Annotated[
        str | None, typer.Option("--approve-as", help="Record the plan approval under this name and proceed.")
    ] = None,
    override_gate: Annotated[
        bool, typer.Option("--override-gate", help="Production: proceed without a passing soak (needs --by, --reason).")
    ] = False,
    by: Annotated[str | None, typer.Option("--by", help="Who overrides the gate.")] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Why the gate is overridden.")] = None,
    throttle_file: Annotated[
        Path | None, typer.Option("--throttle-file", help="Stop (no batch starts) while this file exists.")
    ] = None,
    throttle_query: Annotated[
        str | None,
        typer.Option("--throttle-query", help="Stop while this read-only SQL returns a true first column."),
    ] = None,
    throttle_interval: Annotated[
        float,
        typer.Option("--throttle-interval", help="Seconds between looks at the health indicators, and while stopped."),
    ] = DEFAULT_THROTTLE_INTERVAL,
    job_name: JobOption = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            metavar="N",
            help="Postgres: commit the batches in N local worker processes (procrastinate); "
            "`gatefill worker` joins from other machines.",
        ),
    ] = None,
    metrics_file: MetricsFileOption = None,
    pushgateway: PushgatewayOption = None,
) -> None:
    """Apply an approved plan: throttled batches, each committed with its ledger rows; resumable.

    Before each batch the indicators are read: Hold halves the rate and batch size, Stop pauses until every one
    has read Normal for --cool-down. The plan names its job; --job, when given, must be that job."""
    options = ApplyOptions(
        rate=rate,
        batch_size=batch_size,
        executor=executor,
        max_failures=max_failures,
        approve_as=approve_as,
        throttle_file=throttle_file,
        throttle_query=throttle_query,
        throttle_interval=throttle_interval,
        health=health,
        target_batch_time=target_batch_time,
        cool_down=cool_down,
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
    )
    override = Override(by or "", reason or "") if override_gate else None
    with apply_progress(out) as progress:
        applied = commands.apply(
            _settings(),
            target,
            env_name=env,
            options=options,
            override=override,
            job_name=job_name,
            progress=progress,
            workers=workers,
            metrics_file=metrics_file,
            pushgateway=pushgateway,
        )
    out.print(_apply_line(applied.result), markup=False)
    for name, artifact in applied.gate.paths.items():
        out.print(f"  {name}: {artifact}")
    out.print(f"backfill gate: [bold]{applied.gate.verdict}[/]")
    raise typer.Exit(applied.exit_code)


def _apply_line(result: ApplyResult) -> str:
    """What one apply invocation did, in one line (a run with nothing left to do says so instead of empty counts)."""
    head = f"run {result.run_id}: {result.status.value}; "
    if not result.counts:
        if not result.sessions_total:
            return head + "the plan has no session to process"
        return head + f"nothing left to do: all {result.sessions_total} planned sessions already had a result"
    return (
        head
        + counts_text(dict(sorted(result.counts.items())))
        + f"; {result.elapsed_seconds:.1f} s, measured {result.measured_rate_per_minute:.1f} sessions/min"
    )


@app.command("worker")
def worker_command(
    env: EnvOption,
    until_pid: Annotated[int | None, typer.Option("--until-pid", hidden=True)] = None,
) -> None:
    """Join the applies running with --workers in an environment (Postgres): commit their queued batches until
    Ctrl-C or SIGTERM, which let the current batch finish."""

    def said(task: BatchTask, outcome: str) -> None:
        out.print(f"run {task.run_id} batch {task.batch_no}: {outcome} ({len(task.candidates)} sessions)", markup=False)

    out.print(f"worker {os.getpid()} serving gatefill batches in {env} (Ctrl-C stops it)", markup=False)
    commands.worker(_settings(), env, on_batch=said, until_pid=until_pid)
    out.print(f"worker {os.getpid()} stopped", markup=False)


@app.command("gates")
def gates_command(env: Annotated[str | None, typer.Option("--env", help="Environment (default: all).")] = None) -> None:
    """List every gate record (approvals and overrides) with who, when and why."""
    records = commands.gates(_settings(), env)
    if not records:
        out.print("no approvals or overrides recorded" + (f" in {env}" if env else ""), markup=False)
        return

    def kind(a: Any) -> Text:
        return Text("OVERRIDE", style="bold red") if a.kind == "override" else Text(a.kind)

    rows = [
        (
            _when(r.approval.at),
            r.environment,
            r.approval.run_id,
            r.approval.gate,
            kind(r.approval),
            r.approval.approved_by,
            r.approval.note or "-",
        )
        for r in records
    ]

    def blocks() -> None:  # a narrow terminal: one block per record, nothing cut
        for r in records:
            a = r.approval
            out.print(Text.assemble(f"{_when(a.at)}  {a.gate} gate, ", kind(a), f" by {a.approved_by}"))
            out.print(f"    run {a.run_id} ({r.environment})", markup=False)
            if a.note:
                out.print(_wrapped("    note: ", a.note), markup=False)

    _table_or_blocks(("at", "environment", "run", "gate", "kind", "by", "note"), rows, {"at", "run"}, blocks)


def _when(at: datetime) -> str:
    """A time stamp for tables: UTC to the second (the artifacts keep the full precision)."""
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table_or_blocks(
    headers: Sequence[str], rows: Sequence[Sequence[str | Text]], unbroken: set[str], blocks: Callable[[], None]
) -> None:
    """A table when every value of the ``unbroken`` columns (ids, dates) fits whole in the terminal, the other
    columns wrapping at spaces; otherwise ``blocks``, the narrow layout. Values are text, never markup."""
    cells = [[c if isinstance(c, Text) else Text(c) for c in row] for row in rows]
    widths = []
    for i, header in enumerate(headers):
        values = [header, *(row[i].plain for row in cells)]
        if header not in unbroken:
            values = [word for value in values for word in value.split()]
        widths.append(max((cell_len(v) for v in values), default=1))
    # Each column adds a padding cell on either side and a rule; the table one more rule.
    if sum(widths) + 3 * len(headers) + 1 > out.width:
        blocks()
        return
    table = Table(*headers)
    for column, width in zip(table.columns, widths, strict=True):
        if column.header in unbroken:
            column.no_wrap, column.min_width = True, width
        else:
            column.overflow = "fold"
    for row in cells:
        table.add_row(*row)
    out.print(table)


def _wrapped(head: str, text: str) -> str:
    """``text`` after ``head``, wrapped to the terminal at spaces (a long word, e.g. an id, is never split)."""
    return textwrap.fill(
        text, width=max(40, out.width), initial_indent=head, subsequent_indent=" " * len(head), break_long_words=False
    )


@app.command("jobs")
def jobs_command() -> None:
    """List the jobs --job can name: built-ins, job.NAME tables of gatefill.toml, installed plugins."""
    table = Table("job", "kind", "from")
    for entry in commands.jobs(_settings()):
        table.add_row(entry.name, entry.kind, entry.source)
    out.print(table, markup=False)


@app.command("status")
def status_command(
    run_id: Annotated[str | None, typer.Argument(metavar="[RUN]", help="A run id (default: recent runs).")] = None,
    env: Annotated[str | None, typer.Option("--env", help="Environment (default: all).")] = None,
) -> None:
    """Show a run's progress and results, or the recent runs of each environment."""
    if run_id is None:
        _recent_runs_view(commands.recent(_settings(), env), env)
        return
    p = commands.status(_settings(), run_id, env)
    out.print(f"run {p.run.id} ({p.run.phase}) on {p.environment.name}: [bold]{p.run.status.value}[/]")
    if p.lease is not None or p.run.status.value == "running":
        out.print(f"  lease: {describe_lease(p.lease, p.run.status.value)}", markup=False)
    if p.run.phase == "pipeline":
        summary = p.run.summary or {}
        for step, detail in summary.get("steps", {}).items():
            out.print(f"  {step}: {_step_text(detail)}", markup=False)
        out.print(f"  waiting for: {summary.get('waiting_for') or 'nothing'}", markup=False)
        for why in (summary.get("steps", {}).get("final_gate") or {}).get("outdated_by") or []:
            out.print(f"  outdated: {why}; the final gate was rewritten from the ledgers", markup=False)
        return
    if p.soak is not None:
        out.print("\n".join(f"  {line}" for line in p.soak.describe()), markup=False)
    else:
        out.print(
            f"  sessions with a result: {p.done} of {p.total}" + (f" ({counts_text(p.results)})" if p.results else "")
        )
        out.print(
            f"  batches committed: {p.batches}; last at {p.last_batch_at.isoformat() if p.last_batch_at else '-'}"
        )
        if p.holds:
            out.print(f"  {_holds_text(p.holds)}", markup=False)
        for line in _decisions_text(p.decisions):
            out.print(f"  {line}", markup=False)
    for a in p.approvals:
        out.print(
            f"  {a.kind}: gate {a.gate} by {a.approved_by} at {a.at.isoformat()}" + (f" ({a.note})" if a.note else "")
        )


def _holds_text(holds: Sequence[Hold]) -> str:
    """The holds of a run in one line: how many, their total time, and the last decision."""
    total = sum(h.seconds or 0.0 for h in holds)
    last = holds[-1]
    if last.ended_at is None:
        state = f"holding since {last.began_at.isoformat()}"
    else:
        state = f"{last.seconds or 0.0:.1f} s, ended ({last.ended_by}) at {last.ended_at.isoformat()}"
    return (
        f"holds: {len(holds)}, {total:.1f} s in all; last: {last.indicator} = {last.value} "
        f"before batch {last.batch_no} ({last.reason}), {state}"
    )


#: How many of a run's latest pacing decisions ``status`` lists.
_DECISIONS_SHOWN = 8


def _decisions_text(decisions: Sequence[PaceDecision]) -> list[str]:
    """The indicators of the run's last invocation (level and thresholds at its first look) and its latest
    pacing decisions."""
    if not decisions:
        return []
    starts = [
        i for i, d in enumerate(decisions) if d.action == "watch" and (i == 0 or decisions[i - 1].action != "watch")
    ]
    watched = [d for d in decisions[starts[-1] if starts else 0 :] if d.action == "watch"]
    changes = [d for d in decisions if d.action != "watch"]
    last = decisions[-1]
    lines = [f"pacing: {len(changes)} decisions; now {last.rate}, batch size {last.batch_size}"]
    lines += [f"  {d.indicator}: {d.level} ({d.reason}); {d.threshold or 'no threshold'}" for d in watched]
    for d in changes[-_DECISIONS_SHOWN:]:
        held = f", held {d.held_seconds:.1f} s" if d.held_seconds is not None else ""
        lines.append(
            f"  {d.at.isoformat()} before batch {d.batch_no}: {d.action} on {d.indicator} = {d.value} "
            f"[{d.threshold}]{held} -> rate {d.rate}, batch size {d.batch_size}"
        )
    return lines


def _recent_runs_view(runs: Sequence[tuple[str, Any]], env: str | None) -> None:
    if not runs:
        out.print("no runs recorded" + (f" in {env}" if env else ""), markup=False)
        return
    rows = [(run.id, run.phase, name, run.status.value, _when(run.created_at)) for name, run in runs]

    def blocks() -> None:  # a narrow terminal: one block per run, nothing cut
        for run_id, phase, name, status, created in rows:
            out.print(f"{run_id}\n    {phase} on {name}: {status}, created {created}", markup=False)

    _table_or_blocks(("run", "phase", "environment", "status", "created"), rows, {"run", "status", "created"}, blocks)


def _step_text(detail: dict[str, Any]) -> str:
    """A pipeline step's record as words: its run, candidates, status, verdict, health and report."""
    parts = [f"run {detail['run_id']}"] if detail.get("run_id") else []
    if "candidates" in detail:
        parts.append(f"{detail['candidates']} candidates")
    if detail.get("status"):
        parts.append(str(detail["status"]))
    if detail.get("verdict"):
        parts.append(f"verdict {detail['verdict']}")
    if "healthy" in detail:
        parts.append("healthy" if detail["healthy"] else "not healthy")
    if detail.get("artifact"):
        parts.append(str(detail["artifact"]))
    return ", ".join(parts) or "recorded"


# The soak's options, named here so that its command reads as a list.
_SoakEnv = Annotated[str | None, typer.Option("--env", help="Environment (default with --resume: the run's).")]
_After = Annotated[str | None, typer.Option("--after", help="Start the window when this apply run finished.")]
_From = Annotated[
    str | None, typer.Option("--from", help="Window start (ISO-8601): a past or ongoing window, judged in retrospect.")
]
_Duration = Annotated[str, typer.Option(help="Window length, e.g. 6h.")]
_Interval = Annotated[str, typer.Option(help="Time between measurements, e.g. 5m.")]
_BaselineDays = Annotated[float, typer.Option("--baseline-days", help="Baseline window before the soak.")]
_Margin = Annotated[str, typer.Option(help="Non-inferiority margin, e.g. 5pp.")]
_BaselineRate = Annotated[
    float | None,
    typer.Option("--baseline-rate", help="A known started→completed rate (e.g. 0.892) instead of measuring it."),
]
_MinConversion = Annotated[
    str | None,
    typer.Option(
        "--min-conversion",
        help="Floor the completed → profile rate must be shown to reach (exact one-sided test), e.g. 80%; "
        "default: seed 001's 85%.",
    ),
]
_SoakClock = Annotated[str, typer.Option(help="real, or simulated (looks back to back, no waiting).")]
_Resume = Annotated[str | None, typer.Option("--resume", help="Continue this soak run (same window).")]
_Observe = Annotated[
    list[str] | None, typer.Option("--observe", help="Report this check but never gate on it (repeatable).")
]
_FailFast = Annotated[bool, typer.Option("--fail-fast", help="End at the first gating FAIL.")]
_LatencyP95 = Annotated[
    str, typer.Option("--latency-p95", help="p95 threshold of the results endpoint, e.g. 1s or 800ms.")
]
_NoChart = Annotated[bool, typer.Option("--no-chart", help="Do not draw the PNG chart.")]
_AllowProduction = Annotated[
    bool,
    typer.Option(
        "--allow-production",
        help="Soak an environment of kind production (the soak writes its ledger tables into that database).",
    ),
]


@app.command("soak")
def soak_command(
    env: _SoakEnv = None,
    after: _After = None,
    from_: _From = None,
    duration: _Duration = DEFAULT_SOAK_DURATION,
    interval: _Interval = DEFAULT_SOAK_INTERVAL,
    baseline_days: _BaselineDays = 30.0,
    margin: _Margin = "5pp",
    baseline_rate: _BaselineRate = None,
    min_conversion: _MinConversion = None,
    clock: _SoakClock = "real",
    resume: _Resume = None,
    observe: _Observe = None,
    fail_fast: _FailFast = False,
    latency_p95: _LatencyP95 = "1s",
    no_chart: _NoChart = False,
    allow_production: _AllowProduction = False,
    job_name: JobOption = None,
    metrics_file: MetricsFileOption = None,
    pushgateway: PushgatewayOption = None,
) -> None:
    """Watch an environment for a window, measuring every check at every interval: PASS (0), FAIL (1), INCONCLUSIVE (3).

    Staging; an environment of kind production only with --allow-production."""
    options = SoakOptions(
        duration=_seconds(duration),
        interval=_seconds(interval),
        start=_parse_when(from_),
        after=after,
        resume=resume,
        baseline_days=baseline_days,
        margin=parse_margin(margin),
        baseline_rate=baseline_rate,
        min_conversion=DEFAULT_MIN_CONVERSION if min_conversion is None else parse_min_conversion(min_conversion),
        observe=tuple(observe or ()),
        fail_fast=fail_fast,
        chart=not no_chart,
        allow_production=allow_production,
    )
    result = commands.soak(
        _settings(),
        options,
        env_name=env,
        clock=clock,
        latency_p95_ms=_seconds(latency_p95) * 1000.0,
        job_name=job_name,
        on_look=_look_line,
        on_baseline=_baseline_line,
        metrics_file=metrics_file,
        pushgateway=pushgateway,
    )
    table = Table("check", "verdict", "evidence")
    for c in result.checks:
        table.add_row(c.name + ("" if c.gating else " (observe)"), c.verdict, c.summary)
    out.print(table, markup=False)
    for name, artifact in result.paths.items():
        out.print(f"{name}: {artifact}")
    out.print(f"soak {result.run_id}: {result.looks_taken}/{result.max_looks} looks; verdict [bold]{result.verdict}[/]")
    out.print(result.reason, markup=False)
    raise typer.Exit(result.exit_code)


def _seconds(text: str) -> float:
    """A duration option (``6h``, ``5m``, ``800ms``) in seconds; a usage error when it is none."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _look_line(m: Measurement) -> None:
    # One line per look: a real 6-hour soak is otherwise silent for hours.
    open_checks = ", ".join(f"{c.name} {c.verdict}" for c in m.checks if c.verdict != "PASS") or "all PASS"
    out.print(f"look {m.seq} (cutoff {m.window_end.isoformat()}): {m.verdict}; {open_checks}", markup=False)


def _baseline_line(b: Baseline) -> None:
    took = f"{b.seconds * 1000:.0f} ms" if b.seconds is not None else "?"
    out.print(
        f"baseline {b.start.isoformat()} → {b.end.isoformat()} (measured once, {took}): {b.summary}", markup=False
    )


@app.command("health")
def health_command(
    env: EnvOption,
    since: SinceOption = DEFAULT_SINCE,
    at: Annotated[str | None, typer.Option("--at", help="Judge as of this time (ISO-8601; default now).")] = None,
    job_name: JobOption = None,
) -> None:
    """Read-only production health checks with evidence; writes a mini backfill plan when anything needs work."""
    result = commands.health(_settings(), env, since=_since(since), at=_parse_when(at), job_name=job_name)
    table = Table("check", "verdict", "evidence")
    for c in result.checks:
        table.add_row(c.name, c.verdict, c.summary)
    out.print(table)
    for name, artifact in result.paths.items():
        out.print(f"{name}: {artifact}")
    out.print(f"{result.env.name}: [bold]{'HEALTHY' if result.healthy else 'NOT HEALTHY'}[/]")
    raise typer.Exit(result.exit_code)


@app.command("pipeline")
def pipeline_command(
    staging: Annotated[str, typer.Option("--staging", help="The staging environment.")],
    production: Annotated[str, typer.Option("--production", help="The production environment.")],
    since: SinceOption = DEFAULT_SINCE,
    priority: Annotated[list[str] | None, typer.Option("--priority", help="Sessions to process first.")] = None,
    rate: Annotated[str, typer.Option(help="Apply throttle.")] = DEFAULT_RATE,
    soak_duration: Annotated[str, typer.Option("--soak-duration", help="Soak window.")] = DEFAULT_SOAK_DURATION,
    soak_interval: Annotated[
        str, typer.Option("--soak-interval", help="Soak measurement interval.")
    ] = DEFAULT_SOAK_INTERVAL,
    job_name: JobOption = None,
) -> None:
    """Advance the whole pipeline as far as its gates allow; each run continues where the last one stopped."""
    duration_s, interval_s = _seconds(soak_duration), _seconds(soak_interval)
    options = PipelineOptions(
        staging=staging, production=production, since=_since(since), priority=tuple(priority or ()), rate=rate
    )
    state = commands.pipeline(
        _settings(), options, soak_duration=duration_s, soak_interval=interval_s, job_name=job_name
    )
    out.print(f"pipeline {state.run_id}", markup=False)
    for line in state.log:
        out.print(f"  {line}", markup=False)
    if state.done:
        final = state.steps.get("final_gate", {})
        out.print(f"final gate: [bold]{final.get('verdict')}[/] {final.get('artifact')}")
    else:
        out.print(f"waiting for: {state.waiting_for}", markup=False)
    raise typer.Exit(state.exit_code)


@app.command("rollback")
def rollback_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="The apply run to undo.")],
    env: Annotated[str | None, typer.Option("--env", help="Environment of the run (default: search all).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Execute, verify and roll back: change nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Restore even rows changed since the run wrote them.")] = False,
) -> None:
    """Restore exactly what an apply run changed (before-images by primary key), verify it, write its report.

    The report is rollback_report.md; a dry run writes rollback_dry_run.md."""
    done = commands.rollback(_settings(), run_id, env_name=env, dry_run=dry_run, force=force)
    out.print("\n".join(render_rollback(done.result)), markup=False)
    for state in done.pipelines:
        for line in state.log:
            out.print(f"pipeline {state.run_id}: {line}", markup=False)
    raise typer.Exit(done.exit_code)


serve_app = typer.Typer(help="Run gatefill's stand-ins for the platform's services.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")


@serve_app.command("functions")
def serve_functions_command(
    env: EnvOption,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 54321,
    allow_fault_injection: Annotated[
        bool,
        typer.Option(
            "--allow-fault-injection",
            help="Honour X-Gatefill-Fault and X-Gatefill-Now headers from service-role callers (never on production).",
        ),
    ] = False,
    workers: Annotated[
        int, typer.Option(min=1, help="Server processes sharing the port and one rate limiter (one per core).")
    ] = 1,
    call_timeout: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds a call may take (its wait for a turn included) before it answers 504 CALL_TIMEOUT; "
            "on Postgres the server's statements are bounded a second later.",
        ),
    ] = 25.0,
) -> None:
    """Serve the PRISM edge functions (/functions/v1/...) and /results/{id}?t=TOKEN over HTTP."""
    commands.serve_functions(
        _settings(),
        env,
        host=host,
        port=port,
        allow_fault_injection=allow_fault_injection,
        on_ready=lambda url: out.print(f"serving PRISM functions at {url}"),
        workers=workers,
        call_timeout=call_timeout,
    )


@app.command("ui")
def ui_command(
    env: Annotated[list[str], typer.Option("--env", metavar="NAME", help="An environment to show (repeatable).")],
    host: Annotated[
        str, typer.Option(metavar="HOST", help="Interface to listen on (not loopback: needs --auth-token-env).")
    ] = ("127.0.0.1"),
    port: Annotated[
        int, typer.Option(min=0, max=65535, metavar="PORT", help="Port to listen on (0: any free port).")
    ] = 8765,
    auth_token_env: Annotated[
        str | None,
        typer.Option(
            "--auth-token-env",
            metavar="VAR",
            help="Variable holding the operator token: signed-in operators may approve and pause. Without it the "
            "console is read-only.",
        ),
    ] = None,
) -> None:
    """Serve the operator console: runs, plans, soaks, the pipeline and gates, live; approve and pause."""
    commands.ui(
        _settings(),
        env,
        host=host,
        port=port,
        token_env=auth_token_env,
        on_ready=lambda url: out.print(f"gatefill console at {url}", markup=False),
    )


@app.command("watch")
def watch_command(
    env: EnvOption,
    once: Annotated[bool, typer.Option("--once", help="Run the sets due now, then exit (cron, a timer).")] = False,
    set_name: Annotated[
        str | None,
        typer.Option("--set", metavar="SET", help="Only this set: daily, weekly or monthly (when it is due)."),
    ] = None,
    job_name: JobOption = None,
) -> None:
    """Ongoing monitoring: the job's health and soak checks over the latest day, week or month of new data, as the
    [watch] sets of gatefill.toml say, each result recorded in the environment's ledger and shown by `gatefill ui`.

    A set runs when it never ran or its period has passed since its last result; a check whose verdict changed is
    announced ([notify]). Without --once it stays in the foreground, sleeping until the next set is due, until
    Ctrl-C or SIGTERM (exit 0). Exit codes with --once: 0 every check PASS, INCONCLUSIVE or N/A (or nothing due),
    1 a check FAILed, 2 a bad option or configuration (unknown set or check: nothing recorded)."""
    watched = commands.watch(_settings(), env, once=once, only=set_name, job_name=job_name, on_result=_watch_lines)
    if watched.stopped_by is not None:
        out.print(f"watch stopped ({watched.stopped_by})", markup=False)
    raise typer.Exit(watched.exit_code)


def _watch_lines(result: WatchResult) -> None:
    when = result.taken_at.strftime("%Y-%m-%d %H:%M:%SZ")
    if result.ran:
        # Short: the evidence of each check is on the console's watch page (`gatefill ui`).
        table = Table("set", "window", "check", "verdict")
        for run in result.ran:
            window = f"{run.window_start.strftime('%Y-%m-%d %H:%M')} → {run.window_end.strftime('%Y-%m-%d %H:%M')}"
            for c in run.checks:
                table.add_row(run.set_name, window, c.name, c.verdict)
        out.print(table, markup=False)
    else:
        out.print(f"{result.env} at {when}: no set due", markup=False)
    for change in result.changes:
        out.print(f"changed: {change.check} ({change.set_name}) {change.before} → {change.after}", markup=False)
    due = ", ".join(f"{n} {t.strftime('%Y-%m-%d %H:%M:%SZ')}" for n, t in result.next_due.items())
    out.print(f"next due: {due or 'no set has checks'}", markup=False)


@app.command("simulate")
def simulate_command(
    env: EnvOption,
    functions_url: Annotated[
        str | None, typer.Option("--functions-url", help="Base URL of the functions (default: from config).")
    ] = None,
    sessions: Annotated[int | None, typer.Option(help="Number of respondents to simulate.")] = None,
    rate: Annotated[str | None, typer.Option(help="Arrival rate instead of a count, e.g. 12/h.")] = None,
    duration: Annotated[str | None, typer.Option(help="How long traffic runs, e.g. 6h.")] = None,
    clock: Annotated[str, typer.Option(help="real, or simulated (6 hours in seconds).")] = "real",
    start: Annotated[str | None, typer.Option(help="Simulated start time (ISO-8601; default now).")] = None,
    inject: Annotated[
        str | None, typer.Option(help="Faults with probabilities, e.g. legacy_fc=0.1,profile_write_fail=0.05.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the full report (every respondent) as JSON.")
    ] = None,
) -> None:
    """Simulate live respondents: answers, abandonment, finalize over HTTP, results fetches; with injected faults."""
    simulated = commands.simulate(
        _settings(),
        env,
        functions_url=functions_url,
        sessions=sessions,
        rate=rate,
        duration=duration,
        clock=clock,
        start=_parse_when(start),
        inject=inject,
        seed=seed,
        json_path=json_path,
    )
    out.print(simulated.report.render(), markup=False)
    raise typer.Exit(simulated.exit_code)


def _usage_error(exc: typer.exceptions.TyperException) -> int:
    """Click's usage errors (bad value, missing argument, unknown command) as one line ``error: ...``, exit 2.

    A bare group (``gatefill``, ``gatefill db``) has no message: it shows its help, as a newcomer expects.
    """
    message = " ".join(exc.format_message().split())
    if not message:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        return int(getattr(exc, "exit_code", 2))
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None and ctx.command_path else ""
    print(f"error: {message}{where}", file=sys.stderr)
    return int(getattr(exc, "exit_code", 2))


def _without_flag_types(command: Any) -> Any:
    """Drops the ``<bool>`` type column of on/off flags (``--force``, ``--help``) from every ``--help`` screen."""
    params = list(command.params)
    help_option = command.get_help_option(typer.Context(command, **(command.context_settings or {})))
    for param in [*params, help_option]:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _without_flag_types(sub)
    return command


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns its exit code (the console script exits with it)."""
    command = _without_flag_types(typer.main.get_command(app))
    try:
        result = command.main(
            args=list(argv) if argv is not None else None, prog_name="gatefill", standalone_mode=False
        )
    except GatefillError as exc:
        if _STATE.traceback:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except typer.exceptions.TyperException as exc:
        return _usage_error(exc)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        _STATE.config = None
        _STATE.traceback = False
    return result if isinstance(result, int) else 0


def entrypoint() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
