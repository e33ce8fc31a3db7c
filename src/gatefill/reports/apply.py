"""Writes an apply run's files from its measured ``BackfillGate``: ``backfill_logs/execution_results.json``, the
rollback script ``backfill_logs/rollback_<date>.sql``, ``rollback_dry_run.md``, ``backfill_summary.md`` and
``backfill_gate.md``. (The batch logs, ``backfill_logs/batch_*.json``, are written by apply as each batch commits.)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from gatefill.apply import BackfillGate
from gatefill.artifacts import render, write_json, write_text
from gatefill.db import Database
from gatefill.job import Job
from gatefill.ledger import PaceDecision
from gatefill.reports.rollback import write_rollback_report
from gatefill.reports.rollback_sql import write_rollback_sql

__all__ = ["write_apply_artifacts"]


def write_apply_artifacts(db: Database, job: Job, gate: BackfillGate, artifacts_dir: Path) -> BackfillGate:
    """Writes the run's files into ``artifacts_dir/<run>/`` and returns the gate with their paths; the rollback script
    is written from the ledger as it is read (``db``), with the tables ``job`` declares."""
    out = artifacts_dir / gate.run.id
    logs = out / "backfill_logs"
    paths: dict[str, Path] = {}
    paths["rollback_sql"] = write_rollback_sql(
        db, gate.run.id, job.written_tables(), logs / _rollback_file(gate), now=gate.measured_at
    )
    paths["execution_results"] = write_json(logs / "execution_results.json", _execution_results(gate))
    dry = write_rollback_report(gate.dry_run, artifacts_dir)
    if dry.report_path is not None:
        paths["rollback_dry_run"] = dry.report_path
    paths["summary"] = write_text(out / "backfill_summary.md", _summary(gate))
    paths["gate"] = write_text(out / "backfill_gate.md", _gate(gate))
    return replace(gate, dry_run=dry, paths=paths)


def _rollback_file(gate: BackfillGate) -> str:
    return f"rollback_{(gate.run.started_at or gate.measured_at).date().isoformat()}.sql"


def _started(gate: BackfillGate) -> str:
    return gate.run.started_at.isoformat() if gate.run.started_at else "not started"


def _finished(gate: BackfillGate) -> str:
    return gate.run.finished_at.isoformat() if gate.run.finished_at else "not finished"


def _execution_results(gate: BackfillGate) -> dict[str, Any]:
    rate = gate.rate_per_minute
    return {
        "run_id": gate.run.id,
        "plan_hash": gate.run.plan_hash,
        "environment": gate.env.name,
        "database": gate.env.display_url,
        "status": gate.run.status.value,
        "execution_start": _started(gate),
        "execution_end": _finished(gate),
        "runtime_seconds": round(gate.runtime_seconds, 3),
        "rate_requested": (gate.run.summary or {}).get("rate"),
        "measured_rate_per_minute": None if rate is None else round(rate, 3),
        "invocations": [i.to_json() for i in gate.invocations],
        "holds": {"count": len(gate.holds), "held_seconds": round(gate.held_seconds, 3)},
        "pacing": _pacing(gate),
        "total_sessions": gate.planned,
        "results": dict(gate.results),
        "failed_sessions": len(gate.failures),
        "batch_results": [b.to_json() for b in gate.batches],
        "errors": [f.to_json() for f in gate.failures],
        "measured_at": gate.measured_at.isoformat(),
    }


def _pacing(gate: BackfillGate) -> dict[str, Any]:
    """The run's pacing decisions from the ledger: the indicators each invocation watched (level and thresholds at
    its first look) and every decision that changed the rate, the batch size or whether batches started."""
    return {
        "indicators": [_decision_json(d) for d in _watched(gate.decisions)],
        "decisions": [_decision_json(d) for d in gate.decisions if d.action != "watch"],
    }


def _watched(decisions: Sequence[PaceDecision]) -> list[PaceDecision]:
    """The indicators as the last invocation's first look found them."""
    last_start = max((i for i, d in enumerate(decisions) if d.action == "watch"
                      and (i == 0 or decisions[i - 1].action != "watch")), default=None)  # fmt: skip
    if last_start is None:
        return []
    found = []
    for d in decisions[last_start:]:
        if d.action != "watch":
            break
        found.append(d)
    return found


def _decision_json(d: PaceDecision) -> dict[str, Any]:
    data = asdict(d)
    data["at"] = d.at.isoformat()
    return data


def _summary(gate: BackfillGate) -> str:
    return render(
        "backfill_summary.md.j2",
        run=gate.run,
        database=gate.env.display_url,
        started=_started(gate),
        finished=_finished(gate),
        elapsed=gate.runtime_seconds,
        waited=gate.throttle_wait_seconds,
        holds=len(gate.holds),
        held=gate.held_seconds,
        rate=(gate.run.summary or {}).get("rate", "n/a"),
        measured_rate=gate.rate_per_minute,
        processed=gate.processed,
        invocations=gate.invocations,
        batches=len(gate.batches),
        results=dict(gate.results),
        planned=gate.planned,
        by_category=gate.by_category,
        tables=gate.tables,
        measured_at=gate.measured_at.isoformat(),
        failures=gate.failures,
        rollback_file=_rollback_file(gate),
        watched=_watched(gate.decisions),
        decisions=[d for d in gate.decisions if d.action != "watch"],
    )


def _gate(gate: BackfillGate) -> str:
    env, run_id = gate.env, gate.run.id
    return render(
        "gate.md.j2",
        title=f"Backfill gate {run_id}",
        verdict=gate.verdict,
        facts={
            "environment": f"`{env.name}` ({env.kind}) on `{env.display_url}`",
            "run status": gate.run.status.value,
            "plan hash": f"`{gate.run.plan_hash}`",
            "measured at": gate.measured_at.isoformat(),
        },
        checks=gate.checks,
        approvals=gate.approvals,
        next_step=(
            "Next: review `backfill_summary.md`, then run the staging soak: "
            f"`gatefill soak --env {env.name} --after {run_id}`."
            if gate.verdict == "PASS"
            else f"Next: inspect the failures; undo with `gatefill rollback {run_id}` if needed."
        ),
    )
