"""The final gate: ``pipeline_final_gate.md``, the go/no-go of a whole pipeline, every number re-read from the ledgers.

Sessions are counted once per environment they were processed in, from the ledgers' per-session results (unlike the
original's "39 + 11 + 157 = 207", which added backfilled sessions, soak traffic and sessions merely inspected). Each
checklist item cites the check that measured it; an item nothing measured says so and cannot pass.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatefill import ledger
from gatefill.config import Settings
from gatefill.db import Database
from gatefill.job import Check
from gatefill.reports import counts_text, render, write_text

if TYPE_CHECKING:
    from gatefill.pipeline import PipelineOptions

__all__ = ["write_final_gate"]


def _sessions(db: Database, run_id: str | None) -> Counter[str]:
    if not run_id:
        return Counter()
    with db.connect() as conn:
        return Counter(ledger.session_results_for(conn, run_id).values())


def _approvals(db: Database, run_ids: list[str]) -> list[ledger.Approval]:
    found: list[ledger.Approval] = []
    with db.connect() as conn:
        for run_id in run_ids:
            try:
                ledger.get_run(conn, run_id)
            except ledger.RunNotFound:
                continue
            found.extend(ledger.approvals_for(conn, run_id))
    return found


def _item(name: str, verdict: str | None, summary: str, source: str) -> Check:
    return Check(
        name, verdict or "INCONCLUSIVE", summary if verdict else f"not measured: {summary}", {"source": source}
    )


def write_final_gate(
    settings: Settings,
    options: PipelineOptions,
    pipeline_run_id: str,
    steps: Mapping[str, Any],
    *,
    now: datetime,
) -> dict[str, Any]:
    """Writes ``artifacts/<pipeline>/pipeline_final_gate.md`` and returns its verdict and path."""
    staging_env = settings.env(options.staging)
    production_env = settings.env(options.production)
    apply_step = steps.get("apply", {})
    soak_step = steps.get("soak", {})
    health_step = steps.get("health", {})
    prod_step = steps.get("production_apply", {})
    with Database(staging_env) as staging, Database(production_env) as production:
        staging_results = _sessions(staging, apply_step.get("run_id"))
        production_results = _sessions(production, prod_step.get("run_id"))
        approvals = _approvals(
            staging, [r for r in (apply_step.get("run_id"), soak_step.get("run_id"), pipeline_run_id) if r]
        )
        approvals += _approvals(production, [prod_step["run_id"]] if prod_step else [])
    soak_checks: Mapping[str, str] = soak_step.get("checks", {})
    health_checks: Mapping[str, str] = health_step.get("checks", {})
    overrides = [a for a in approvals if a.kind == "override"]
    production_ok = prod_step.get("healthy_after") if prod_step else health_step.get("healthy")
    items = [
        _item(
            "staging backfill gate",
            apply_step.get("verdict"),
            f"backfill_gate.md verdict {apply_step.get('verdict')}: sessions {counts_text(staging_results)}",
            "staging apply",
        ),
        _item(
            "versions stamped (staging rows written)",
            soak_checks.get("version_stamps"),
            f"soak check version_stamps {soak_checks.get('version_stamps')}",
            "soak",
        ),
        _item(
            "no engine_version_override",
            soak_checks.get("engine_version_override"),
            f"soak check engine_version_override {soak_checks.get('engine_version_override')}",
            "soak",
        ),
        _item(
            "no legacy FC", soak_checks.get("legacy_fc"), f"soak check legacy_fc {soak_checks.get('legacy_fc')}", "soak"
        ),
        _item(
            "tokenized results only",
            soak_checks.get("token_gating"),
            f"soak check token_gating {soak_checks.get('token_gating')}",
            "soak",
        ),
        _item(
            "conversion not worse than baseline",
            soak_checks.get("conversion"),
            f"soak check conversion {soak_checks.get('conversion')}",
            "soak",
        ),
        _item(
            "staging soak verdict",
            soak_step.get("verdict"),
            f"soak {soak_step.get('run_id')}: {soak_step.get('verdict')}",
            "soak",
        ),
        _item(
            "production versions",
            health_checks.get("version_distribution"),
            f"health check version_distribution {health_checks.get('version_distribution')}",
            "health",
        ),
        _item(
            "production RLS",
            health_checks.get("row_level_security"),
            f"health check row_level_security {health_checks.get('row_level_security')}",
            "health",
        ),
        _item(
            "production healthy",
            "PASS" if production_ok else ("FAIL" if production_ok is False else None),
            "production health after the pipeline: " + ("healthy" if production_ok else "not healthy"),
            "health",
        ),
    ]
    if prod_step:
        items.insert(
            8,
            _item(
                "production backfill gate",
                prod_step.get("verdict"),
                f"backfill_gate.md verdict {prod_step.get('verdict')}: sessions {counts_text(production_results)}",
                "production apply",
            ),
        )
    if any(i.verdict == "FAIL" for i in items):
        verdict = "NO-GO"
    elif any(i.verdict != "PASS" for i in items) or overrides:
        verdict = "INCONCLUSIVE"
    else:
        verdict = "GO"
    artifacts = []
    for step_name in ("plan", "apply", "soak", "health", "production_apply"):
        step = steps.get(step_name, {})
        if "artifact" in step:
            artifacts.append((step_name, step["artifact"]))
        for key, value in step.get("artifacts", {}).items():
            artifacts.append((f"{step_name} {key}", value))
    out = settings.artifacts_dir / pipeline_run_id / "pipeline_final_gate.md"
    text = render(
        "pipeline_final_gate.md.j2",
        verdict=verdict,
        pipeline=pipeline_run_id,
        now=now.isoformat(),
        options=options,
        staging=staging_env,
        production=production_env,
        steps=steps,
        staging_results=dict(staging_results),
        production_results=dict(production_results),
        items=items,
        approvals=approvals,
        overrides=overrides,
        artifacts=[(name, _relative(Path(path), out.parent)) for name, path in artifacts],
    )
    write_text(out, text)
    return {"verdict": verdict, "artifact": str(out)}


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base.parent))
    except ValueError:
        return str(path)
