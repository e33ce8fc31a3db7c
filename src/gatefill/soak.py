"""Phase 2, the staging soak: watch a window of live traffic look by look, record every measurement in the ledger, and
reach a verdict that holds up statistically.

The window ``[start, start + duration)`` is cut into ``K = ceil(duration / interval)`` looks. Look ``j`` measures every
check over ``[start, start + j·interval)`` and sees only rows whose timestamps are before that cutoff, so a look taken
late (a resumed soak, ``--from`` in the past: Kayenta's retrospective mode) measures exactly what a look taken on time
would have seen. Counts are recomputed from the window's start at every look instead of being summed across looks,
which is why a restarted soak cannot double count: it simply continues with the first look the ledger does not hold.
Checks that carry state between looks (the sequential conversion test, cumulative probe results) keep it in their
stored evidence, so it survives restarts too.

The baseline (the comparison window of ``--baseline-days`` before the window) is frozen: it ends where the window
starts, so it is measured once, as soon as the window has started and before the first look, and stored in the ledger
with its own timing. Every look, and a resumed or restarted soak, reuses the stored one: it is never measured twice,
and a look costs only the window's queries (a 30-day baseline over a large table is the one expensive count).

The soak is a ledger run with phase ``soak``: ``running`` while measuring; ``succeeded`` when the window was watched to
its end (or ended early on a final FAIL with ``fail_fast``), whatever the verdict, which is recorded in the run's
summary; ``paused`` on Ctrl-C or a lost database. A paused or crashed soak is continued by naming it
(``--resume RUN``) or by starting the same soak again: an unfinished soak run of the environment with the same window
and statistical plan is continued automatically, and one with the same window but another plan is refused, because
two plans peeking at one window would spend the error budget twice.

The verdict: FAIL if a gating check fails; otherwise INCONCLUSIVE if one lacks data or the window was not watched to
its end; PASS only if every gating check that applies passed at the last look (an N/A check, one that does not
apply here, counts neither way; N/A alone concludes nothing). Checks named in ``observe`` are measured and
reported but never gate (Argo's ``dryRun``, Kayenta's ``muted``). What the checks measure is the job's business
(``SoakChecks``; PRISM's live in ``gatefill.prism.checks.soak``); this module only knows their names and verdicts.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from gatefill import ledger, notify, stats
from gatefill.clock import Clock, RealClock, SimulatedClock, parse_duration, utc
from gatefill.config import DEFAULT_SOAK_DURATION, DEFAULT_SOAK_INTERVAL, Environment
from gatefill.db import Database, format_utc, parse_utc
from gatefill.errors import GatefillError, UsageError
from gatefill.interrupt import stop_on_signals
from gatefill.job import (
    NOT_APPLICABLE,
    Baseline,
    ChartGuides,
    Check,
    Job,
    Look,
    Measurement,
    ReportTable,
    SeriesBucket,
    SoakChecks,
    SoakSettings,
    overall_verdict,
)
from gatefill.lease import RunLease
from gatefill.ledger import RunStatus

__all__ = [
    "DEFAULT_MIN_CONVERSION",
    "SOAK_PHASE",
    "SoakObservations",
    "SoakOptions",
    "SoakResult",
    "SoakState",
    "baseline_text",
    "duration_text",
    "exit_code_for",
    "parse_margin",
    "parse_min_conversion",
    "run_soak",
    "soak_job",
    "soak_state",
    "soak_verdict",
]

SOAK_PHASE = "soak"
#: Evidence keys starting with this are state carried from look to look (e.g. latency samples): stored in the
#: ledger and in soak_measurements.json, left out of the Markdown reports.
STATE_PREFIX = "_"
_UNFINISHED = (RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.PLANNED)
# The options that define a soak's window and statistical plan: a soak is continued only under the same ones.
_PLAN_KEYS = (
    "window_start",
    "duration_s",
    "interval_s",
    "baseline_days",
    "margin",
    "baseline_rate",
    "min_conversion",
    "alpha",
    "min_n",
    "observe",
    "after",
)
#: Seed 001's success criterion: "Conversion rate maintains baseline (≥ 85%)", completed sessions → profiles.
DEFAULT_MIN_CONVERSION = 0.85


# ====================================================================================================================
# Options and results


@dataclass(frozen=True)
class SoakOptions:
    """How to soak: the window, the look schedule, the statistical plan, and which checks only observe."""

    duration: float = parse_duration(DEFAULT_SOAK_DURATION)
    interval: float = parse_duration(DEFAULT_SOAK_INTERVAL)
    start: datetime | None = None  # --from: a past or ongoing window, judged retrospectively
    after: str | None = None  # --after RUN: the window starts when that apply run finished
    resume: str | None = None  # --resume RUN: continue that soak run with its stored options
    baseline_days: float = 30.0
    margin: float = 0.05
    baseline_rate: float | None = None  # a known baseline rate (exact test) instead of the measured baseline
    #: --min-conversion: the conversion rate must be shown (exact one-sided test) to be at least this.
    min_conversion: float | None = DEFAULT_MIN_CONVERSION
    alpha: float = 0.05
    min_n: int = stats.DEFAULT_MIN_N
    observe: tuple[str, ...] = ()
    fail_fast: bool = False
    #: Real clock only: wait this long after a cutoff before measuring, so transactions stamped just before the
    #: cutoff have committed (a look is never repeated, so a row committed after it would be missed until the next).
    settle_seconds: float = 5.0
    #: Draw the PNG chart in staging_observability.md (needs matplotlib; about half a second per soak).
    chart: bool = True
    #: A soak writes its ledger (gatefill_* tables, measurements) into the database it watches: on an environment
    #: of kind ``production`` only when asked for explicitly.
    allow_production: bool = False

    @property
    def max_looks(self) -> int:
        # The tolerance stops 6h/5m from becoming 73 looks through float rounding.
        return max(1, math.ceil(self.duration / self.interval - 1e-9))

    def validate(self) -> None:
        """Raises ``UsageError`` on options no soak can run with."""
        if not self.duration > 0 or not self.interval > 0:
            raise UsageError("--duration and --interval must be positive")
        if self.interval > self.duration:
            raise UsageError("--interval must not be longer than --duration")
        if self.max_looks > 10_000:
            raise UsageError(f"{self.max_looks} looks is too many; use a longer --interval")
        if self.after and self.start is not None:
            raise UsageError("give --after RUN or --from TIME, not both")
        if self.resume and (self.after or self.start is not None):
            raise UsageError("--resume continues a soak with its own window; do not combine it with --after/--from")
        if not self.baseline_days > 0:
            raise UsageError("--baseline-days must be positive")
        if not 0.0 <= self.margin < 1.0:
            raise UsageError("--margin must be within 0..100 pp")
        if self.baseline_rate is not None and not (
            0.0 < self.baseline_rate <= 1.0 and self.margin <= self.baseline_rate
        ):
            raise UsageError("--baseline-rate must be within (0, 1] and at least the margin")
        if self.min_conversion is not None and not 0.0 < self.min_conversion < 1.0:
            raise UsageError("--min-conversion must be within (0, 100) %")
        if not 0.0 < self.alpha < 0.5:
            raise UsageError("alpha must be within (0, 0.5)")
        if self.min_n < 1:
            raise UsageError("the minimum sample size must be at least 1")

    def check_environment(self, env: Environment) -> None:
        """Raises ``UsageError`` on an environment of kind production unless ``allow_production``: a soak creates
        and writes the ledger tables in the database it watches, which nobody should do to production unasked."""
        if env.kind == "production" and not self.allow_production:
            raise UsageError(
                f"environment '{env.name}' is production: a soak writes its ledger (gatefill_* tables) into the "
                "database it watches; soak staging, or pass --allow-production to soak production on purpose"
            )


@dataclass(frozen=True)
class SoakObservations:
    """What a soak's reports lay out besides its verdict, read from the ledger and the job's checks when it stopped:
    the run as stored, its approvals, the timeline of rates and events, the chart's guides and the suite's tables."""

    run: ledger.Run
    env: Environment
    approvals: list[ledger.Approval]
    check_names: tuple[str, ...]
    buckets: list[SeriesBucket]
    guides: ChartGuides
    tables: list[ReportTable]
    #: Whether the report draws the PNG chart (``SoakOptions.chart``).
    chart: bool
    read_at: datetime


@dataclass
class SoakResult:
    """What a soak established, read back from the ledger: verdict, reason, looks, checks, what its reports show
    (``observations``) and, once ``gatefill.reports.soak`` wrote them, the artifacts' paths."""

    run_id: str
    environment: str
    status: RunStatus
    verdict: str
    reason: str
    window_start: datetime
    window_end: datetime
    looks_taken: int
    max_looks: int
    complete: bool
    interrupted: bool
    resumed_at_look: int | None
    checks: list[Check]
    measurements: list[Measurement]
    baseline: Baseline | None = None
    observations: SoakObservations | None = None
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.verdict)

    def step_record(self) -> dict[str, Any]:
        """The pipeline's record of this soak step (what its state keeps and the final gate reads)."""
        return {
            "run_id": self.run_id,
            "verdict": self.verdict,
            "summary": self.reason,
            "checks": {c.name: c.verdict for c in self.checks},
            "notes": {c.name: c.summary for c in self.checks if c.verdict == NOT_APPLICABLE},
            "observed": [c.name for c in self.checks if not c.gating],
            "artifacts": {k: str(v) for k, v in self.paths.items()},
        }


def parse_margin(text: str) -> float:
    """A margin as a fraction: ``5pp`` or ``5%`` (percentage points), or a fraction ``0.05``; else ``UsageError``."""
    raw = text.strip().lower()
    try:
        value = float(raw.rstrip("p%").strip()) / 100.0 if raw.endswith(("pp", "%")) else float(raw)
    except ValueError:
        raise UsageError(f"--margin: {text!r} is not a margin (use e.g. 5pp or 0.05)") from None
    if not 0.0 <= value < 1.0:
        raise UsageError(f"--margin: {text!r} must be within 0..100 pp")
    return value


def parse_min_conversion(text: str) -> float:
    """A conversion floor as a fraction: ``85%`` or ``0.85``; else ``UsageError``."""
    raw = text.strip().lower()
    try:
        value = float(raw.rstrip("%").strip()) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"--min-conversion: {text!r} is not a rate (use e.g. 85% or 0.85)") from None
    if not 0.0 < value < 1.0:
        raise UsageError(f"--min-conversion: {text!r} must be within (0, 100) %")
    return value


def exit_code_for(verdict: str) -> int:
    """PASS 0, FAIL 1, INCONCLUSIVE 3 (the CLI's contract)."""
    return {"PASS": 0, "FAIL": 1}.get(verdict, 3)


def soak_verdict(checks: Sequence[Check], *, complete: bool, looks: int, max_looks: int) -> tuple[str, str]:
    """The soak's verdict and one sentence saying why; FAIL is final, PASS needs the whole window and every check
    that applies (N/A checks count neither way)."""
    gating = [c for c in checks if c.gating and c.verdict != NOT_APPLICABLE]
    failed = [c.name for c in gating if c.verdict == "FAIL"]
    if failed:
        return "FAIL", "gating check(s) failed: " + ", ".join(failed)
    if not gating:
        return "INCONCLUSIVE", "no gating check that applies: every check only observes or is N/A"
    if not complete:
        return "INCONCLUSIVE", f"the window was not watched to its end (look {looks} of {max_looks})"
    lacking = [c.name for c in gating if c.verdict != "PASS"]
    if lacking:
        return "INCONCLUSIVE", "no conclusion from: " + ", ".join(lacking)
    not_applicable = [c.name for c in checks if c.gating and c.verdict == NOT_APPLICABLE]
    return "PASS", "every gating check passed over the whole window" + (
        f" ({', '.join(not_applicable)} N/A here)" if not_applicable else ""
    )


def _look_verdict(checks: Sequence[Check]) -> str:
    return overall_verdict(c.verdict for c in checks if c.gating)


# ====================================================================================================================
# Opening, continuing and locking the run


def _plan_params(options: SoakOptions, window_start: datetime, checks: SoakChecks, clock: Clock) -> dict[str, Any]:
    return {
        "window_start": format_utc(window_start),
        "duration_s": float(options.duration),
        "interval_s": float(options.interval),
        "max_looks": options.max_looks,
        "baseline_days": float(options.baseline_days),
        "margin": float(options.margin),
        "baseline_rate": options.baseline_rate,
        "min_conversion": options.min_conversion,
        "alpha": float(options.alpha),
        "min_n": int(options.min_n),
        "observe": sorted(options.observe),
        "fail_fast": options.fail_fast,
        "after": options.after,
        "clock": "simulated" if isinstance(clock, SimulatedClock) else "real",
        "checks": checks.params(),
    }


def _options_from_params(params: Mapping[str, Any], base: SoakOptions) -> SoakOptions:
    """The stored plan of a soak run, so a resumed soak keeps exactly the schedule and tests it started with."""
    return replace(
        base,
        duration=float(params["duration_s"]),
        interval=float(params["interval_s"]),
        baseline_days=float(params["baseline_days"]),
        margin=float(params["margin"]),
        baseline_rate=params.get("baseline_rate"),
        # A soak stored before the floor existed was planned without one; it is not added to it afterwards.
        min_conversion=params.get("min_conversion"),
        alpha=float(params["alpha"]),
        min_n=int(params["min_n"]),
        observe=tuple(params.get("observe", ())),
        fail_fast=bool(params.get("fail_fast", False)),
        after=params.get("after"),
        chart=base.chart,
        start=None,
        resume=None,
    )


def _window_start(conn: sa.Connection, options: SoakOptions, clock: Clock) -> tuple[datetime, ledger.Run | None]:
    if options.after:
        parent = ledger.get_run(conn, options.after)
        if parent.phase != "apply":
            raise UsageError(f"--after needs an apply run; {parent.id} is a {parent.phase} run")
        if parent.status not in (RunStatus.SUCCEEDED, RunStatus.COMPLETED_WITH_ERRORS) or parent.finished_at is None:
            raise UsageError(f"apply run {parent.id} is {parent.status.value}; soak it once it has finished")
        return parent.finished_at, parent
    if options.start is not None:
        return utc(options.start), None
    # Whole milliseconds: the instant is stored as text on SQLite and must compare equal when read back.
    now = clock.now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000), None


def _open_run(
    db: Database,
    env: Environment,
    options: SoakOptions,
    checks: SoakChecks,
    versions: Mapping[str, str] | None,
    clock: Clock,
) -> tuple[ledger.Run, SoakOptions]:
    """The soak run to measure: the one named by ``resume``, an unfinished one of the same soak, or a new one."""
    with db.begin() as conn:
        if options.resume:
            run = ledger.get_run(conn, options.resume, where=env.name)
            if run.phase != SOAK_PHASE:
                raise UsageError(f"{run.id} is a {run.phase} run, not a soak")
            if run.status not in _UNFINISHED:
                raise UsageError(f"soak {run.id} is {run.status.value}; nothing to resume (see its artifacts)")
            return run, _options_from_params(run.params, options)
        start, parent = _window_start(conn, options, clock)
        params = _plan_params(options, start, checks, clock)
        for candidate in ledger.list_runs(conn, phase=SOAK_PHASE, limit=200):
            if candidate.environment != env.name or candidate.status not in _UNFINISHED:
                continue
            if candidate.params.get("window_start") != params["window_start"]:
                continue
            if all(candidate.params.get(k) == params[k] for k in _PLAN_KEYS):
                return candidate, _options_from_params(candidate.params, options)
            raise UsageError(
                f"unfinished soak {candidate.id} watches the same window with other options; "
                f"continue it with --resume {candidate.id}, or soak another window"
            )
        now = clock.now()
        chosen = dict(parent.versions) if parent is not None else dict(versions or {})
        run = ledger.create_run(
            conn,
            run_id=ledger.new_run_id(SOAK_PHASE, now),
            phase=SOAK_PHASE,
            environment=env.name,
            job=checks.job,
            versions=chosen,
            params=params,
            now=now,
            parent_run_id=parent.id if parent is not None else None,
        )
        return run, options


def _wait_until(clock: Clock, when: datetime, stop: threading.Event) -> bool:
    """Waits on ``clock`` until ``when`` in steps of at most a second; False if ``stop`` was set meanwhile."""
    while True:
        if stop.is_set():
            return False
        remaining = (when - clock.now()).total_seconds()
        if remaining <= 0:
            return True
        # Short steps keep Ctrl-C responsive on the real clock; a simulated clock just jumps ahead.
        clock.sleep(remaining if isinstance(clock, SimulatedClock) else min(remaining, 1.0))


# ====================================================================================================================
# Measurements in the ledger


# ====================================================================================================================
# The soak


LookCallback = Callable[[Measurement], None]
BaselineCallback = Callable[[Baseline], None]


def _take_baseline(
    db: Database, run_id: str, checks: SoakChecks, window_start: datetime, baseline_days: float, clock: Clock
) -> Baseline:
    """Measures the baseline window before ``window_start``, timed, and stores it with the run."""
    start = window_start - timedelta(days=baseline_days)
    started = time.perf_counter()
    measured = checks.measure_baseline(db, start, window_start)
    seconds = time.perf_counter() - started
    baseline = replace(measured, start=start, end=window_start, measured_at=clock.now(), seconds=seconds)
    with db.begin() as conn:
        ledger.record_baseline(conn, run_id, baseline)
    return baseline


def soak_job(
    env: Environment,
    job: Job,
    options: SoakOptions,
    *,
    clock: str = "real",
    settings: SoakSettings | None = None,
    stop: threading.Event | None = None,
    on_look: LookCallback | None = None,
    on_baseline: BaselineCallback | None = None,
    on_start: Callable[[str], None] | None = None,
) -> SoakResult:
    """What ``gatefill soak`` runs: ``job``'s soak checks on ``env`` with a real or simulated clock (the files are
    written by ``gatefill.reports.soak``).

    ``clock="simulated"`` (tests, demo) starts a ``SimulatedClock`` at the window's start and walks the looks back to
    back without waiting; the job's probes then tell the app each look's time. It is refused on production.
    """
    if clock not in ("real", "simulated"):
        raise UsageError("--clock must be 'real' or 'simulated'")
    options.validate()  # every bad input is refused before anything touches the database
    options.check_environment(env)
    if clock == "simulated" and env.kind == "production":
        raise UsageError(f"environment '{env.name}' is production: --clock simulated is refused there")
    chosen = replace(settings or SoakSettings(), simulated_clock=clock == "simulated")
    with Database(env, pool_size=2) as db:
        job.require_schema(db)
        soak_clock: Clock = (
            SimulatedClock(_window_start_for_clock(db, options)) if chosen.simulated_clock else RealClock()
        )
        with job.soak_checks(env, chosen) as checks:
            return run_soak(
                db,
                env,
                options=options,
                clock=soak_clock,
                checks=checks,
                versions=job.versions,
                stop=stop,
                on_look=on_look,
                on_baseline=on_baseline,
                on_start=on_start,
            )


def _window_start_for_clock(db: Database, options: SoakOptions) -> datetime | None:
    """Where a simulated clock must start so the soak walks its window: the stored, --after or --from start."""
    ledger.init_ledger(db)
    with db.connect() as conn:
        if options.resume:
            run = ledger.get_run(conn, options.resume)
            return parse_utc(str(run.params["window_start"]))
        if options.after:
            return ledger.get_run(conn, options.after).finished_at
    return utc(options.start) if options.start is not None else None


@dataclass
class _Watch:
    """A soak in progress: its schedule, and what the looks taken so far left for the next one."""

    window_start: datetime
    max_looks: int
    plan: stats.SequentialPlan
    settle: float
    #: The first look still to take, and the evidence of the look before it (empty before the first).
    first: int
    previous: dict[str, Mapping[str, Any]]
    resumed_at: int | None
    baseline: Baseline | None
    #: The verdict of the last look taken (None before the first): a look that changes it is announced.
    last_verdict: str | None = None
    ended_early: bool = False
    interrupted: bool = False


def run_soak(
    db: Database,
    env: Environment,
    *,
    options: SoakOptions,
    clock: Clock,
    checks: SoakChecks,
    versions: Mapping[str, str] | None = None,
    stop: threading.Event | None = None,
    on_look: LookCallback | None = None,
    on_baseline: BaselineCallback | None = None,
    on_start: Callable[[str], None] | None = None,
) -> SoakResult:
    """Runs (or continues) a soak of ``env`` and returns what it established; see the module docstring.
    ``gatefill.reports.soak`` writes the result's files.

    ``versions`` are recorded on a new run when there is no ``--after`` run to take them from (the job's versions),
    so a production gate can look for a passing soak of the same versions. ``on_look`` sees each stored measurement,
    ``on_baseline`` the baseline when this call measured it (not when it was stored by an earlier one), ``on_start``
    the run's id once it is running.
    """
    options.validate()
    options.check_environment(env)
    unknown = sorted(set(options.observe) - set(checks.check_names))
    if unknown:
        raise UsageError(f"--observe: unknown check(s) {', '.join(unknown)} (known: {', '.join(checks.check_names)})")
    ledger.init_ledger(db)
    run, options = _open_run(db, env, options, checks, versions, clock)
    stop = stop or threading.Event()
    # One process measures a soak at a time: the run's lease (see gatefill.lease), which each stored look fences with.
    with RunLease(db, run.id, "soak") as lease, stop_on_signals(stop) as interruption:
        watch = _start(db, run, options, clock)
        if on_start is not None:
            on_start(run.id)
        try:
            _watch(db, run.id, watch, options, checks, clock, lease, stop, on_look, on_baseline)
        except GatefillError as exc:
            # The measurements stored so far stand; the soak continues from the next look when started again. Only
            # while this process still holds the run (the fence): a soak that lost its lease leaves the run alone.
            with contextlib.suppress(GatefillError), db.begin() as conn:
                lease.fence(conn)
                ledger.transition(conn, run.id, RunStatus.PAUSED, now=clock.now(), reason=f"stopped: {exc}")
            raise
        result = _finish(db, env, run.id, watch, options, clock, interruption.description)
    result.observations = _observe(db, env, run.id, checks, clock, options)
    return result


def _start(db: Database, run: ledger.Run, options: SoakOptions, clock: Clock) -> _Watch:
    """Moves the run to ``running`` and reads where it stands: the looks and the baseline stored before."""
    with db.connect() as conn:
        done = ledger.measurements_for(conn, run.id)
        baseline = ledger.baseline_for(conn, run.id)
    max_looks = options.max_looks
    resumed_at = done[-1].seq + 1 if done else None
    reason = f"resumed at look {resumed_at} of {max_looks}" if resumed_at else f"soak started ({max_looks} looks)"
    with db.begin() as conn:
        ledger.transition(conn, run.id, RunStatus.RUNNING, now=clock.now(), reason=reason)
    first = (done[-1].seq + 1) if done else 1
    watch = _Watch(
        window_start=datetime.fromisoformat(str(run.params["window_start"]).replace("Z", "+00:00")),
        max_looks=max_looks,
        plan=stats.SequentialPlan(max_looks=max_looks, alpha=options.alpha),
        settle=0.0 if isinstance(clock, SimulatedClock) else options.settle_seconds,
        first=first,
        previous={c.name: c.evidence for c in done[-1].checks} if done else {},
        resumed_at=resumed_at,
        baseline=baseline,
        last_verdict=done[-1].verdict if done else None,
    )
    # A stored FAIL under fail_fast is final: a restarted soak takes no further looks.
    watch.ended_early = options.fail_fast and bool(done) and done[-1].verdict == "FAIL" and first <= max_looks
    return watch


def _watch(
    db: Database,
    run_id: str,
    watch: _Watch,
    options: SoakOptions,
    checks: SoakChecks,
    clock: Clock,
    lease: RunLease,
    stop: threading.Event,
    on_look: LookCallback | None,
    on_baseline: BaselineCallback | None,
) -> None:
    """Takes the baseline if it is not stored yet, then every look still to take, until the window's end, a final
    FAIL (``fail_fast``) or a stop."""
    if watch.baseline is None and not watch.ended_early and watch.first <= watch.max_looks:
        # The baseline ends where the window starts: once the window has started (and rows stamped just before it
        # have committed) it cannot change, so it is counted now, once, and never again.
        if _wait_until(clock, watch.window_start + timedelta(seconds=watch.settle), stop):
            watch.baseline = _take_baseline(db, run_id, checks, watch.window_start, options.baseline_days, clock)
            if on_baseline is not None:
                on_baseline(watch.baseline)
        else:
            watch.interrupted = True
    for number in range(watch.first, watch.max_looks + 1):
        if watch.ended_early or watch.interrupted:
            break
        end = watch.window_start + timedelta(seconds=min(number * options.interval, options.duration))
        if not _wait_until(clock, end + timedelta(seconds=watch.settle), stop):
            watch.interrupted = True
            break
        lease.check()
        measurement = _measure(db, run_id, watch, number, end, options, checks, clock)
        with db.begin() as conn:
            lease.fence(conn)
            ledger.record_measurement(conn, run_id, measurement)
        watch.previous = {c.name: c.evidence for c in measurement.checks}
        _announce_change(db.env.name, run_id, watch, measurement)
        if on_look is not None:
            on_look(measurement)
        if number < watch.max_looks and options.fail_fast and measurement.verdict == "FAIL":
            watch.ended_early = True
        elif number < watch.max_looks and stop.is_set():
            watch.interrupted = True
            break


def _announce_change(env: str, run_id: str, watch: _Watch, measurement: Measurement) -> None:
    """A look whose verdict differs from the look before is a notice (the first look sets the verdict: no notice)."""
    before, watch.last_verdict = watch.last_verdict, measurement.verdict
    if before is not None and before != measurement.verdict:
        moved = ", ".join(f"{c.name} {c.verdict}" for c in measurement.checks if c.verdict != "PASS") or "all PASS"
        notify.send(notify.soak_verdict_changed(env, run_id, measurement.seq, before, measurement.verdict, moved))


def _measure(
    db: Database,
    run_id: str,
    watch: _Watch,
    number: int,
    end: datetime,
    options: SoakOptions,
    checks: SoakChecks,
    clock: Clock,
) -> Measurement:
    """Look ``number``: every check over the window up to ``end``; observed checks never gate."""
    assert watch.baseline is not None  # measured before the first look, or stored by the soak that took earlier ones
    look = Look(
        run_id=run_id,
        number=number,
        max_looks=watch.max_looks,
        window_start=watch.window_start,
        end=end,
        window_end=watch.window_start + timedelta(seconds=options.duration),
        taken_at=clock.now(),
        plan=watch.plan,
        margin=options.margin,
        baseline_days=options.baseline_days,
        baseline_rate=options.baseline_rate,
        min_n=options.min_n,
        min_conversion=options.min_conversion,
        simulated_time=isinstance(clock, SimulatedClock),
        baseline=watch.baseline,
        previous=watch.previous,
    )
    observe = set(options.observe)
    measured = [replace(c, gating=False) if c.name in observe else c for c in checks.measure(db, look)]
    return Measurement(number, watch.window_start, end, look.taken_at, _look_verdict(measured), measured)


def _finish(
    db: Database, env: Environment, run_id: str, watch: _Watch, options: SoakOptions, clock: Clock, signal: str
) -> SoakResult:
    """Judges the looks stored, records the verdict in the run (``succeeded``, or ``paused`` when interrupted) and
    returns the result; ``signal`` says what interrupted the soak, if anything did."""
    with db.connect() as conn:
        stored = ledger.measurements_for(conn, run_id)
        baseline = ledger.baseline_for(conn, run_id)
    max_looks = watch.max_looks
    looks = stored[-1].seq if stored else 0
    complete = looks == max_looks
    final_checks = stored[-1].checks if stored else []
    verdict, why = soak_verdict(final_checks, complete=complete, looks=looks, max_looks=max_looks)
    if watch.ended_early:
        why += f"; ended early at look {looks} of {max_looks} (--fail-fast: a FAIL is final)"
    elif watch.interrupted:
        why += f"; interrupted ({signal}): continue with `gatefill soak --resume {run_id}`"
    summary = {
        "verdict": verdict,
        "reason": why,
        "looks": looks,
        "max_looks": max_looks,
        "complete": complete,
        "interrupted": watch.interrupted,
        "ended_early": watch.ended_early,
        "checks": {c.name: c.verdict for c in final_checks},
    }
    status = RunStatus.PAUSED if watch.interrupted else RunStatus.SUCCEEDED
    with db.begin() as conn:
        ledger.transition(conn, run_id, status, now=clock.now(), reason=why, summary=summary)
    return SoakResult(
        run_id=run_id,
        environment=env.name,
        status=status,
        verdict=verdict,
        reason=why,
        window_start=watch.window_start,
        window_end=watch.window_start + timedelta(seconds=options.duration),
        looks_taken=looks,
        max_looks=max_looks,
        complete=complete,
        interrupted=watch.interrupted,
        resumed_at_look=watch.resumed_at,
        checks=final_checks,
        measurements=stored,
        baseline=baseline,
    )


def _bucket_seconds(duration: float, interval: float) -> float:
    # Hourly, as the seeds' report claimed to be; a window under two hours gets one bucket per look instead.
    return 3600.0 if duration >= 7200.0 else interval


def _observe(
    db: Database, env: Environment, run_id: str, checks: SoakChecks, clock: Clock, options: SoakOptions
) -> SoakObservations:
    """What the reports lay out besides the verdict, read from the ledger and the checks once the soak has stopped."""
    read_at = clock.now()
    with db.connect() as conn:
        run = ledger.get_run(conn, run_id)
        measurements = ledger.measurements_for(conn, run_id)
        approvals = ledger.approvals_for(conn, run_id)
    window_start = datetime.fromisoformat(str(run.params["window_start"]).replace("Z", "+00:00"))
    observed_until = measurements[-1].window_end if measurements else window_start
    bucket = _bucket_seconds(float(run.params["duration_s"]), float(run.params["interval_s"]))
    return SoakObservations(
        run=run,
        env=env,
        approvals=approvals,
        check_names=tuple(checks.check_names),
        buckets=checks.series(db, window_start, observed_until, bucket),
        guides=checks.chart_guides(measurements, observed_until),
        tables=checks.report_tables(measurements),
        chart=options.chart,
        read_at=read_at,
    )


# ====================================================================================================================
# Where a soak stands (gatefill status)

#: The files ``gatefill.reports.soak`` writes into ``artifacts/<run-id>/`` (the chart aside).
ARTIFACT_NAMES = ("staging_observability.md", "staging_soak_gate.md", "soak_measurements.json")


@dataclass(frozen=True)
class SoakState:
    """Where a soak stands, read from its ledger: window, looks taken, the latest verdict of every check, the verdict
    so far, the stored baseline and where its artifacts are (``gatefill status RUN``)."""

    run_id: str
    status: RunStatus
    window_start: datetime
    window_end: datetime
    interval: float
    looks_taken: int
    max_looks: int
    last_cutoff: datetime | None
    checks: list[Check]
    verdict: str
    reason: str
    baseline: Baseline | None
    artifacts_dir: Path
    artifacts: list[Path]

    @property
    def complete(self) -> bool:
        return self.looks_taken == self.max_looks

    def describe(self) -> list[str]:
        """The state as plain lines for a terminal."""
        length = duration_text((self.window_end - self.window_start).total_seconds())
        lines = [
            f"window: {self.window_start.isoformat()} → {self.window_end.isoformat()} "
            f"({length}, a look every {duration_text(self.interval)})",
            f"looks: {self.looks_taken} of {self.max_looks}"
            + (f" (last cutoff {self.last_cutoff.isoformat()})" if self.last_cutoff else " (none taken yet)"),
            f"baseline: {baseline_text(self.baseline)}",
        ]
        if self.checks:
            lines.append(f"checks at look {self.looks_taken}:")
            width = max(len(c.name) for c in self.checks)
            for c in self.checks:
                mark = "" if c.gating else " (observe)"
                lines.append(f"  {c.name:<{width}}  {c.verdict}{mark}: {c.summary}")
        lines.append(f"verdict: {self.verdict} ({self.reason})")
        if self.artifacts:
            lines.append(f"artifacts: {', '.join(str(p) for p in self.artifacts)}")
        else:
            lines.append(
                f"artifacts: none yet in {self.artifacts_dir} (written when the soak ends, stops early or is paused)"
            )
        return lines


def soak_state(conn: sa.Connection, run: ledger.Run, artifacts_dir: Path) -> SoakState:
    """The state of a soak run (finished or not) from the ledger, judged by the same rule as its reports."""
    if run.phase != SOAK_PHASE:
        raise UsageError(f"{run.id} is a {run.phase} run, not a soak")
    params = run.params
    measurements = ledger.measurements_for(conn, run.id)
    window_start = datetime.fromisoformat(str(params["window_start"]).replace("Z", "+00:00"))
    max_looks = int(params["max_looks"])
    looks = measurements[-1].seq if measurements else 0
    final_checks = measurements[-1].checks if measurements else []
    verdict, why = soak_verdict(final_checks, complete=looks == max_looks, looks=looks, max_looks=max_looks)
    summary = run.summary or {}
    if summary.get("reason") and summary.get("verdict") == verdict:
        why = str(summary["reason"])
    out = artifacts_dir / run.id
    return SoakState(
        run_id=run.id,
        status=run.status,
        window_start=window_start,
        window_end=window_start + timedelta(seconds=float(params["duration_s"])),
        interval=float(params["interval_s"]),
        looks_taken=looks,
        max_looks=max_looks,
        last_cutoff=measurements[-1].window_end if measurements else None,
        checks=final_checks,
        verdict=verdict,
        reason=why,
        # A ledger created before baselines were stored has no such table until its next soak initialises it.
        baseline=ledger.baseline_for(conn, run.id)
        if ledger.soak_baselines.name in sa.inspect(conn).get_table_names()
        else None,
        artifacts_dir=out,
        artifacts=[out / name for name in ARTIFACT_NAMES if (out / name).is_file()],
    )


def baseline_text(baseline: Baseline | None) -> str:
    """The baseline in one line: its window, when it was measured and how long that took, and what it counted."""
    if baseline is None:
        return "not measured yet (it is measured once, when the window has started)"
    took = "" if baseline.seconds is None else f", took {baseline.seconds * 1000:.0f} ms"
    at = "" if baseline.measured_at is None else f"measured once at {baseline.measured_at.isoformat()}{took}: "
    return f"{baseline.start.isoformat()} → {baseline.end.isoformat()}, {at}{baseline.summary}"


def duration_text(seconds: float) -> str:
    """A duration as people write it: ``6 h``, ``5 min``, ``90 s``."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
