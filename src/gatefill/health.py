"""Phase 3, production health: read-only checks with evidence, and a mini backfill plan when anything needs work.

Nothing is written to the database: the checks are SELECTs, and the mini plan is composed by the same
``compose_plan`` as ``gatefill plan`` (same discovery, same format, same hash). ``gatefill.reports.health`` writes the
result as files only: ``prod_health_check.md`` always, ``prod_mini_backfill_plan.json`` (+ ``.md``) when discovery
finds candidates. ``gatefill apply prod_mini_backfill_plan.json`` accepts that file unchanged and registers its run on
first use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.clock import Clock
from gatefill.config import DEFAULT_BATCH_SIZE, DEFAULT_RATE, Environment
from gatefill.db import Database
from gatefill.job import NOT_APPLICABLE, Check, Job, overall_verdict
from gatefill.plan import Plan, PlanParams, compose_plan

__all__ = ["HealthResult", "check_health"]


@dataclass(frozen=True)
class HealthResult:
    """The verdict of a health check, its checks and the mini plan (if any); ``paths`` once the reports are written
    (``gatefill.reports.health``)."""

    run_id: str
    env: Environment
    since: datetime
    #: The instant the checks judge (token expiry): ``--at``, or when the check started.
    judged_at: datetime
    #: The report's time: when the measurement finished (never before the newest session it counted).
    measured_at: datetime
    healthy: bool
    checks: list[Check]
    #: The mini backfill plan, when discovery found sessions that need work.
    plan: Plan | None
    #: Wall time in seconds of each check, and of ``discovery`` (the mini plan's discovery and composition).
    seconds: dict[str, float] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)

    def step_record(self) -> dict[str, Any]:
        """The pipeline's record of this health step (what its state keeps and the final gate reads)."""
        return {
            "run_id": self.run_id,
            "healthy": self.healthy,
            "checks": {c.name: c.verdict for c in self.checks},
            "notes": {c.name: c.summary for c in self.checks if c.verdict == NOT_APPLICABLE},
            "measured_at": self.measured_at.isoformat(),
            "mini_plan": str(self.paths["mini_plan"]) if "mini_plan" in self.paths else None,
            "artifact": str(self.paths["report"]),
        }

    @property
    def exit_code(self) -> int:
        return 0 if self.healthy else 1


def check_health(
    db: Database,
    env: Environment,
    *,
    since: datetime,
    now: datetime,
    job: Job,
    rate: str = DEFAULT_RATE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    clock: Clock | None = None,
) -> HealthResult:
    """Runs the health checks and, when sessions need backfill, composes the mini plan (read-only on the database).

    ``now`` is the instant the checks judge (token expiry); the report is dated when the measurement finished, on
    ``clock`` when given (else ``now``), and a ``measurement_time`` check says whether any session it counted is
    stamped later than that date.
    """
    run_id = ledger.new_run_id("health", now)
    seconds: dict[str, float] = {}
    with db.connect() as conn:
        checks = job.health_checks(
            conn, since=since, now=now, row_level_security=db.caps.row_level_security, timings=seconds
        )
        # When the checks found nothing to do, discovery cannot find any either: a healthy environment is not
        # scanned a second time.
        plan = None
        if job.needs_backfill(checks):
            started = time.perf_counter()
            plan = _mini_plan(conn, env, job, PlanParams(since=since, rate=rate, batch_size=batch_size), now)
            seconds["discovery"] = time.perf_counter() - started
        newest, newest_query = job.newest_activity(conn, since)
    measured_at = clock.now() if clock is not None else now
    checks.append(_measurement_time(newest, measured_at, newest_query))
    healthy = plan is None and overall_verdict(c.verdict for c in checks if c.gating) == "PASS"
    return HealthResult(run_id, env, since, now, measured_at, healthy, checks, plan, seconds)


def _mini_plan(conn: Connection, env: Environment, job: Job, params: PlanParams, now: datetime) -> Plan | None:
    """The mini plan of what discovery finds to backfill (composed as ``gatefill plan`` composes), or None when it
    finds nothing to process."""
    plan = compose_plan(conn, env, job, params, now=now, run_id=ledger.new_run_id("apply", now), source="health")
    return plan if plan.runnable else None


def _measurement_time(newest: datetime | None, measured_at: datetime, query: str) -> Check:
    """A report may not be dated before the evidence it counts: the newest session stamp against the report's time."""
    evidence = {"newest_session_stamp": newest.isoformat() if newest else None, "measured_at": measured_at.isoformat()}
    if newest is None:
        return Check(
            "measurement_time", NOT_APPLICABLE, "no session in the window: no stamp to compare", evidence, query
        )
    if newest > measured_at:
        summary = (
            f"a session counted is stamped {newest.isoformat()}, after this report's time {measured_at.isoformat()}: "
            "the data's clock and this check's disagree, so the counts cannot be said to describe the database then"
        )
        return Check("measurement_time", "INCONCLUSIVE", summary, evidence, query)
    summary = f"the newest session stamp counted ({newest.isoformat()}) precedes the report's time"
    return Check("measurement_time", "PASS", summary, evidence, query)
