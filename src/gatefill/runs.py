"""Finding runs across the configured environments, recording approvals, and reading a run's progress.

A run id is unique per ledger, and each environment has its own ledger (in its own database); commands that take a
run id without ``--env`` look through every configured environment whose database exists and answers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from gatefill import ledger
from gatefill.clock import Clock, RealClock
from gatefill.config import Environment, Settings
from gatefill.db import Database
from gatefill.errors import DatabaseUnreachable, GatefillError, UsageError
from gatefill.lease import lease_name
from gatefill.soak import SOAK_PHASE, SoakState, soak_state

__all__ = [
    "GATES",
    "GATE_PHASES",
    "ApprovalOutcome",
    "RunProgress",
    "approve",
    "find_run",
    "planned_total",
    "run_progress",
]

#: Each gate and the phase of the run it is approved on. plan: the plan may be applied; review: the applied backfill
#: was reviewed (the pipeline waits for it); soak: the staging soak is accepted; production: the production go/no-go
#: of a pipeline.
GATE_PHASES = {"plan": ledger.APPLY_PHASE, "review": ledger.APPLY_PHASE, "soak": SOAK_PHASE, "production": "pipeline"}
GATES = tuple(GATE_PHASES)


def find_run(settings: Settings, run_id: str, env_name: str | None = None) -> tuple[Environment, ledger.Run]:
    """The environment holding ``run_id`` and the run; ``RunNotFound`` (exit 2) if no reachable ledger has it."""
    names = [env_name] if env_name else list(settings.environments)
    searched: list[str] = []
    for name in names:
        env = settings.env(name)
        try:
            with Database(env) as db, db.connect() as conn:
                if ledger.runs.name not in sa.inspect(conn).get_table_names():
                    searched.append(name)
                    continue
                return env, ledger.get_run(conn, run_id, where=name)
        except ledger.RunNotFound:
            searched.append(name)
        except DatabaseUnreachable:
            if env_name:
                raise
            searched.append(f"{name} (unreachable)")
    raise ledger.RunNotFound(run_id, "environment(s) " + (", ".join(searched) or "none configured"))


@dataclass(frozen=True)
class ApprovalOutcome:
    """An approval, and whether this call recorded it (False: the gate was approved before, by ``approval``)."""

    approval: ledger.Approval
    recorded: bool


def approve(
    settings: Settings,
    run_id: str,
    *,
    gate: str,
    by: str,
    note: str | None = None,
    env_name: str | None = None,
    clock: Clock | None = None,
) -> ApprovalOutcome:
    """Records an approval of ``gate`` for a run of the gate's phase; a plan approval is bound to the plan's hash.

    A gate that does not fit the run (``--gate soak`` on an apply run) is a ``UsageError``; a gate approved before
    is not approved twice: the outcome names the earlier approval and nothing is written."""
    if gate not in GATES:
        raise UsageError(f"unknown gate '{gate}' (use {', '.join(GATES)})")
    if not by.strip():
        raise UsageError("an approval needs a name (--by NAME)")
    env, run = find_run(settings, run_id, env_name)
    phase = GATE_PHASES[gate]
    if run.phase != phase:
        fitting = [g for g, p in GATE_PHASES.items() if p == run.phase]
        raise UsageError(
            f"gate '{gate}' is approved on {phase} runs; {run.id} is {'an' if run.phase[:1] in 'aeiou' else 'a'} "
            f"{run.phase} run"
            + (f" (its gates: {', '.join(fitting)})" if fitting else ", which has no gate to approve")
        )
    now = (clock or RealClock()).now()
    with Database(env) as db, db.begin() as conn:
        approval, recorded = ledger.record_approval_once(
            conn, run_id=run.id, gate=gate, approved_by=by, now=now, note=note, plan_hash=run.plan_hash
        )
    return ApprovalOutcome(approval, recorded)


@dataclass(frozen=True)
class RunProgress:
    """How far a run got, read from its ledger."""

    environment: Environment
    run: ledger.Run
    total: int
    results: Counter[str]
    batches: int
    last_batch_at: datetime | None
    approvals: list[ledger.Approval]
    #: A soak run's window, looks, latest verdicts and artifacts; None for other phases.
    soak: SoakState | None = None
    #: Who holds the run's lease (expired included: a holder that stopped renewing it); None when nobody does.
    lease: ledger.Lease | None = None
    #: The apply's holds (``gatefill.holds``), oldest first.
    holds: list[ledger.Hold] = field(default_factory=list)
    #: The apply's pacing decisions (``gatefill.pacing``), oldest first.
    decisions: list[ledger.PaceDecision] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(self.results.values())


def planned_total(run: ledger.Run) -> int:
    """The sessions a run's plan gives work to (0 without a plan). The run's row keeps the plan's header (its
    totals); a run recorded before that kept the whole plan."""
    if run.plan is None:
        return 0
    totals = run.plan.get("totals") or {}
    return int(totals.get("candidates", sum(1 for c in run.plan.get("candidates", []) if c.get("operations"))))


def run_progress(settings: Settings, run_id: str, env_name: str | None = None) -> RunProgress:
    """Progress of one run: sessions with a result, committed batches, approvals; a soak's state for a soak run."""
    env, run = find_run(settings, run_id, env_name)
    total = planned_total(run)
    with Database(env) as db, db.connect() as conn:
        results = ledger.result_counts(conn, run.id)
        batch_row = conn.execute(
            sa.select(sa.func.count(), sa.func.max(ledger.batches.c.finished_at)).where(
                ledger.batches.c.run_id == run.id
            )
        ).one()
        approvals = ledger.approvals_for(conn, run.id)
        soak = soak_state(conn, run, settings.artifacts_dir) if run.phase == SOAK_PHASE else None
        # A ledger written before leases existed has no lease table (status reads, it never creates tables).
        has_leases = sa.inspect(conn).has_table(ledger.leases.name)
        lease = ledger.get_lease(conn, lease_name(run.id)) if has_leases else None
        holds = ledger.holds_for(conn, run.id)
        decisions = ledger.decisions_for(conn, run.id)
    batches, last_at = int(batch_row[0]), batch_row[1]
    return RunProgress(env, run, total, results, batches, last_at, approvals, soak, lease, holds, decisions)


def recent_runs(settings: Settings, env_name: str | None = None, limit: int = 20) -> list[tuple[str, ledger.Run]]:
    """The most recent runs of each reachable environment."""
    found: list[tuple[str, ledger.Run]] = []
    for name in [env_name] if env_name else list(settings.environments):
        env = settings.env(name)
        try:
            with Database(env) as db, db.connect() as conn:
                if ledger.runs.name not in sa.inspect(conn).get_table_names():
                    continue
                found.extend((name, r) for r in ledger.list_runs(conn, limit=limit))
        except (DatabaseUnreachable, GatefillError):
            if env_name:
                raise
    return sorted(found, key=lambda item: item[1].created_at, reverse=True)[:limit]


def summary_line(run: ledger.Run) -> dict[str, Any]:
    """A run as a flat row for tables."""
    return {
        "run": run.id,
        "phase": run.phase,
        "environment": run.environment,
        "status": run.status.value,
        "created": run.created_at.isoformat(),
    }
