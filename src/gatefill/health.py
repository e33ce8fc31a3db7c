"""Phase 3, production health: read-only checks with evidence, and a mini backfill plan when anything needs work.

Nothing is written to the database: the checks are SELECTs, and the mini plan is composed by the same
``compose_plan`` as ``gatefill plan`` (same discovery, same format, same hash), then written only as files:
``prod_health_check.md`` always, ``prod_mini_backfill_plan.json`` (+ ``.md``) when discovery finds candidates.
``gatefill apply prod_mini_backfill_plan.json`` accepts that file unchanged and registers its run on first use.
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
from gatefill.config import Environment
from gatefill.db import Database, format_utc
from gatefill.job import NOT_APPLICABLE, Check, Job, overall_verdict
from gatefill.plan import Plan, PlanParams, compose_plan, write_plan_files
from gatefill.reports import render, write_json, write_text

__all__ = ["HealthResult", "check_health"]

_CANDIDATE_CHECKS = ("missing_profiles", "missing_fc_scores")


@dataclass(frozen=True)
class HealthResult:
    """The verdict of a health check, its checks, the mini plan (if any) and where the files went."""

    run_id: str
    healthy: bool
    checks: list[Check]
    plan: Plan | None
    paths: dict[str, Path]
    #: Wall time in seconds of each check, and of ``discovery`` (the mini plan's discovery and composition).
    seconds: dict[str, float] = field(default_factory=dict)
    #: The report's time: when the measurement finished (never before the newest session it counted).
    measured_at: datetime | None = None

    def step_record(self) -> dict[str, Any]:
        """The pipeline's record of this health step (what its state keeps and the final gate reads)."""
        return {
            "run_id": self.run_id,
            "healthy": self.healthy,
            "checks": {c.name: c.verdict for c in self.checks},
            "notes": {c.name: c.summary for c in self.checks if c.verdict == NOT_APPLICABLE},
            "measured_at": self.measured_at.isoformat() if self.measured_at else None,
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
    artifacts_dir: Path,
    job: Job,
    rate: str = "20/min",
    batch_size: int = 5,
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
        # A candidate is a completed session of the window without a profile or without the current FC row: exactly
        # what missing_profiles and missing_fc_scores count. When both found none, discovery cannot find any either,
        # and a healthy production is not scanned a second time.
        missing = sum(int(c.evidence.get("missing", 0)) for c in checks if c.name in _CANDIDATE_CHECKS)
        plan = None
        if missing:
            started = time.perf_counter()
            plan = _mini_plan(conn, env, job, PlanParams(since=since, rate=rate, batch_size=batch_size), now)
            seconds["discovery"] = time.perf_counter() - started
        newest, newest_query = job.newest_activity(conn, since)
    measured_at = clock.now() if clock is not None else now
    checks.append(_measurement_time(newest, measured_at, newest_query))
    healthy = plan is None and overall_verdict(c.verdict for c in checks if c.gating) == "PASS"
    out = artifacts_dir / run_id
    paths: dict[str, Path] = {}
    if plan is not None:
        paths["mini_plan"] = write_plan_files(plan, out, "prod_mini_backfill_plan").json_path
    paths["checks_json"] = write_json(
        out / "prod_health_checks.json",
        {
            "run_id": run_id,
            "environment": env.name,
            "database": env.display_url,
            "since": format_utc(since),
            "measured_at": format_utc(measured_at),
            "judged_as_of": format_utc(now),
            "healthy": healthy,
            "checks": [c.to_json() for c in checks],
            "seconds": {name: round(t, 4) for name, t in seconds.items()},
            "mini_plan": plan.run_id if plan is not None else None,
        },
    )
    paths["report"] = write_text(
        out / "prod_health_check.md",
        render(
            "prod_health_check.md.j2",
            run_id=run_id,
            env=env,
            since=format_utc(since),
            now=format_utc(measured_at),
            # Shown when it differs noticeably from the report's time (a past --at; not the measurement's length).
            judged_as_of=format_utc(now) if abs((measured_at - now).total_seconds()) >= 1.0 else None,
            healthy=healthy,
            checks=checks,
            plan=plan.to_json() if plan is not None else None,
            discovered="discovery" in seconds,
        ),
    )
    return HealthResult(run_id, healthy, checks, plan, paths, seconds, measured_at)


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
