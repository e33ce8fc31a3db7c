"""Ongoing monitoring: the job's health checks and soak checks over the latest period of new data, set by set on a
schedule (``[watch]``: daily over the last 24 h, weekly over 7 days, monthly over 30), each result kept in the ledger.

A set is due when it never ran in the environment or its period has passed since its last result. Its checks are the
job's own, asked through the ``Job`` protocol: ``health`` names every health check, ``soak`` every soak check (judged
as one final look over the period against the 30 days before it), any other name one check of either kind. A check
whose verdict differs from the one recorded before it is announced (``gatefill.notify``). ``watch_once`` runs what is
due and returns; ``watch_forever`` does so again whenever the next set falls due, until SIGINT or SIGTERM.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from gatefill import ledger, notify, stats
from gatefill.clock import Clock, sleep_unless
from gatefill.config import WATCH_CHECK_GROUPS, WATCH_PERIODS, Environment, WatchSettings
from gatefill.db import Database
from gatefill.errors import ConfigError, GatefillError, UsageError
from gatefill.interrupt import stop_on_signals
from gatefill.job import Baseline, Check, Job, Look, SoakChecks, SoakSettings
from gatefill.soak import SoakOptions

__all__ = ["WatchChange", "WatchResult", "WatchRun", "due_sets", "watch_forever", "watch_once"]

#: The soak's statistical settings (margin, alpha, minimum sample, conversion floor, 30-day baseline) for the
#: soak checks a watch runs: the same judgment as a staging soak's final look.
_SOAK = SoakOptions()


@dataclass(frozen=True)
class WatchRun:
    """One set as it ran: the window of new data it judged and its checks."""

    set_name: str
    window_start: datetime
    window_end: datetime
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class WatchChange:
    """A check whose verdict differs from the one recorded before it in the same set."""

    set_name: str
    check: str
    before: str
    after: str


@dataclass(frozen=True)
class WatchResult:
    """What one pass of the watch did: the sets it ran, the verdicts that changed, and when each set is due next."""

    env: str
    taken_at: datetime
    ran: tuple[WatchRun, ...]
    changes: tuple[WatchChange, ...]
    next_due: Mapping[str, datetime] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """1 when a gating check of a set that ran FAILed; 0 otherwise (PASS, INCONCLUSIVE, N/A, or nothing due)."""
        return 1 if any(c.verdict == "FAIL" and c.gating for r in self.ran for c in r.checks) else 0


def _enabled(settings: WatchSettings) -> list[str]:
    return [name for name, checks in settings.sets if checks]


def due_sets(
    last_taken: Mapping[str, datetime], settings: WatchSettings, now: datetime, only: str | None = None
) -> list[str]:
    """The sets due at ``now``: never run, or their period has passed since their last result (``only``: that set)."""
    if only is not None and only not in WATCH_PERIODS:
        raise UsageError(f"--set {only}: unknown set (use {', '.join(WATCH_PERIODS)})")
    names = [n for n in _enabled(settings) if only is None or n == only]
    return [n for n in names if n not in last_taken or now >= last_taken[n] + timedelta(seconds=WATCH_PERIODS[n])]


def _next_due(last_taken: Mapping[str, datetime], settings: WatchSettings, now: datetime) -> dict[str, datetime]:
    return {n: last_taken.get(n, now) + timedelta(seconds=WATCH_PERIODS[n]) for n in _enabled(settings)}


def watch_once(db: Database, env: Environment, job: Job, *, clock: Clock, only: str | None = None) -> WatchResult:
    """Runs every set of ``env.watch`` due now (or set ``only``, when due), records each check, announces changed
    verdicts; a check name the job does not have is a ``ConfigError`` before anything is recorded."""
    now = clock.now()
    ledger.init_ledger(db)
    with db.connect() as conn:
        last = ledger.watch_last_taken(conn, env.name)
    due = due_sets(last, env.watch, now, only)
    runs = _measure_sets(db, env, job, due, now) if due else []
    records = [
        ledger.WatchRecord(env.name, r.set_name, c.name, c.verdict, c.summary, c.evidence, r.window_start,
                           r.window_end, now)
        for r in runs
        for c in r.checks
    ]  # fmt: skip
    changes: list[WatchChange] = []
    with db.begin() as conn:
        for r in runs:
            before = ledger.watch_last_verdicts(conn, env.name, r.set_name)
            changes += [
                WatchChange(r.set_name, c.name, before[c.name], c.verdict)
                for c in r.checks
                if c.name in before and before[c.name] != c.verdict
            ]
        ledger.record_watch_results(conn, records)
    summaries = {(r.set_name, c.name): c.summary for r in runs for c in r.checks}
    for ch in changes:
        summary = summaries[(ch.set_name, ch.check)]
        notify.send(notify.watch_verdict_changed(env.name, ch.set_name, ch.check, ch.before, ch.after, summary))
    taken = {**last, **{r.set_name: now for r in runs}}
    return WatchResult(env.name, now, tuple(runs), tuple(changes), _next_due(taken, env.watch, now))


def _measure_sets(db: Database, env: Environment, job: Job, due: Sequence[str], now: datetime) -> list[WatchRun]:
    """Measures each due set over its period; the job's check names are learnt from the checks themselves."""
    with job.soak_checks(env, SoakSettings()) as soak_checks:
        soak_names = set(soak_checks.check_names)
        runs = []
        for name in due:
            wanted = env.watch.checks(name)
            start = now - timedelta(seconds=WATCH_PERIODS[name])
            health_side = "health" in wanted or any(n not in soak_names and n not in WATCH_CHECK_GROUPS for n in wanted)
            measured: list[Check] = []
            if health_side:
                with db.connect() as conn:
                    rls = db.caps.row_level_security
                    measured += job.health_checks(conn, since=start, now=now, row_level_security=rls)
                _check_names(env, {c.name for c in measured} | soak_names)
            if "soak" in wanted or soak_names & set(wanted):
                measured += _soak_look(db, env, soak_checks, start, now)
            chosen = _chosen(wanted, measured, soak_names)
            runs.append(WatchRun(name, start, now, tuple(chosen)))
    return runs


def _check_names(env: Environment, known: set[str]) -> None:
    """Every name of every set must be a group or a check the job has (one line, exit 2 otherwise)."""
    for set_name, names in env.watch.sets:
        unknown = [n for n in names if n not in known and n not in WATCH_CHECK_GROUPS]
        if unknown:
            raise ConfigError(
                f"environment '{env.name}': watch.{set_name}: unknown check(s) {', '.join(unknown)} "
                f"(known: {', '.join(WATCH_CHECK_GROUPS)}, {', '.join(sorted(known))})"
            )


def _chosen(wanted: Sequence[str], measured: Sequence[Check], soak_names: set[str]) -> list[Check]:
    """The checks a set asked for, in the order measured; a group takes every check of its kind."""
    keep = []
    for c in measured:
        group = "soak" if c.name in soak_names else "health"
        if c.name in wanted or group in wanted:
            keep.append(c)
    return list({c.name: c for c in keep}.values())


def _soak_look(db: Database, env: Environment, checks: SoakChecks, start: datetime, end: datetime) -> list[Check]:
    """The soak's checks over ``[start, end)`` as one final look, against the baseline of the 30 days before; a
    job whose soak checks cannot judge outside a soak run says so, INCONCLUSIVE, check by check."""
    baseline_start = start - timedelta(days=_SOAK.baseline_days)
    try:
        measured = checks.measure_baseline(db, baseline_start, start)
        baseline = Baseline(baseline_start, start, measured.summary, measured.evidence, measured.query, end)
        look = Look(
            run_id=f"watch-{env.name}",
            number=1,
            max_looks=1,
            window_start=start,
            end=end,
            window_end=end,
            taken_at=end,
            plan=stats.SequentialPlan(max_looks=1, alpha=_SOAK.alpha),
            margin=_SOAK.margin,
            baseline_days=_SOAK.baseline_days,
            baseline_rate=_SOAK.baseline_rate,
            min_n=_SOAK.min_n,
            min_conversion=_SOAK.min_conversion,
            simulated_time=False,
            baseline=baseline,
        )
        return checks.measure(db, look)
    except GatefillError as exc:
        why = f"not measurable outside a soak run: {exc}"
        return [Check(name, "INCONCLUSIVE", why, {}) for name in checks.check_names]


def watch_forever(
    db: Database,
    env: Environment,
    job: Job,
    *,
    clock: Clock,
    only: str | None = None,
    stop: threading.Event | None = None,
    on_result: Callable[[WatchResult], None] | None = None,
) -> str:
    """Runs what is due, sleeps until the next set falls due, and again, until SIGINT or SIGTERM (or ``stop``);
    returns what stopped it."""
    stop = stop or threading.Event()
    with stop_on_signals(stop) as interruption:
        while not stop.is_set():
            result = watch_once(db, env, job, clock=clock, only=only)
            if on_result is not None:
                on_result(result)
            due = [t for n, t in result.next_due.items() if only is None or n == only]
            if not due:
                raise UsageError(f"environment '{env.name}': no watch set has checks: nothing to watch")
            wait = max(0.0, (min(due) - clock.now()).total_seconds())
            if not sleep_unless(clock, wait, stop):
                break
    return interruption.description
