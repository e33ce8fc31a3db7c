"""Writes a production health check: ``prod_health_check.md``, ``prod_health_checks.json`` and, when discovery found
sessions to backfill, the mini plan ``prod_mini_backfill_plan.json`` (+ ``.md``) that ``gatefill apply`` accepts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gatefill.artifacts import render, write_json, write_text
from gatefill.db import format_utc
from gatefill.health import HealthResult
from gatefill.plan import write_plan_files

__all__ = ["write_health_check"]


def write_health_check(result: HealthResult, artifacts_dir: Path) -> HealthResult:
    """Writes the health check's files into ``artifacts_dir/<run>/`` and returns the result with their paths."""
    out = artifacts_dir / result.run_id
    paths: dict[str, Path] = {}
    if result.plan is not None:
        paths["mini_plan"] = write_plan_files(result.plan, out, "prod_mini_backfill_plan").json_path
    paths["checks_json"] = write_json(
        out / "prod_health_checks.json",
        {
            "run_id": result.run_id,
            "environment": result.env.name,
            "database": result.env.display_url,
            "since": format_utc(result.since),
            "measured_at": format_utc(result.measured_at),
            "judged_as_of": format_utc(result.judged_at),
            "healthy": result.healthy,
            "checks": [c.to_json() for c in result.checks],
            "seconds": {name: round(t, 4) for name, t in result.seconds.items()},
            "mini_plan": result.plan.run_id if result.plan is not None else None,
        },
    )
    paths["report"] = write_text(out / "prod_health_check.md", _report(result))
    return replace(result, paths=paths)


def _report(result: HealthResult) -> str:
    measured_at, judged_at = result.measured_at, result.judged_at
    return render(
        "prod_health_check.md.j2",
        run_id=result.run_id,
        env=result.env,
        since=format_utc(result.since),
        now=format_utc(measured_at),
        # Shown when it differs noticeably from the report's time (a past --at; not the measurement's length).
        judged_as_of=format_utc(judged_at) if abs((measured_at - judged_at).total_seconds()) >= 1.0 else None,
        healthy=result.healthy,
        checks=result.checks,
        plan=result.plan.to_json() if result.plan is not None else None,
        discovered="discovery" in result.seconds,
    )
