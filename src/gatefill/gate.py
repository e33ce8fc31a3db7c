"""Gates between phases: the production gate that apply enforces, overrides, and the list of gate records.

A production apply needs (1) an approved plan, checked by apply itself against the plan's hash, and (2) a staging
soak that passed, was approved at the ``soak`` gate, measured the same job versions, and finished within the last
7 days. Soak runs live in the ledgers of the environments of kind ``staging``, so the gate looks there. When (2) is
missing, the apply stops with exit 4 listing what is missing, unless an override names who and why; the override is
recorded on the production run and every later report prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from gatefill import ledger
from gatefill.config import Settings
from gatefill.db import Database
from gatefill.errors import DatabaseUnreachable, GateBlocked, UsageError

__all__ = [
    "SOAK_MAX_AGE",
    "GateRecord",
    "Override",
    "SoakEvidence",
    "check_production_gate",
    "find_passing_soak",
    "gate_records",
    "record_production_gate",
]

SOAK_MAX_AGE = timedelta(days=7)
#: The versions a soak must share with the production plan (what was written, not how it was scheduled).
_VERSION_KEYS = ("fc_version", "fc_kind", "engine_version")


@dataclass(frozen=True)
class Override:
    """An explicit decision to pass a gate without its evidence: who and why."""

    by: str
    reason: str

    def validate(self) -> None:
        if not self.by.strip() or not self.reason.strip():
            raise UsageError("--override-gate needs --by NAME and --reason TEXT")


@dataclass(frozen=True)
class SoakEvidence:
    """The staging soak a production apply relies on."""

    environment: str
    run_id: str
    verdict: str
    finished_at: datetime
    approved_by: str
    versions: Mapping[str, str]


def _same_versions(soaked: Mapping[str, Any], planned: Mapping[str, Any]) -> bool:
    """The soak measured every version the plan writes (PRISM's three, or another job's own, e.g. a definition
    hash): a key of the plan's missing from the soak's versions is a difference, not a match."""
    return all(soaked.get(k) == planned.get(k) for k in {*_VERSION_KEYS, *planned})


def find_passing_soak(
    settings: Settings, versions: Mapping[str, str], now: datetime
) -> tuple[SoakEvidence | None, list[str]]:
    """The most recent approved, PASS soak of these versions within 7 days, and why each other candidate fell short."""
    reasons: list[str] = []
    best: SoakEvidence | None = None
    for env in settings.environments.values():
        if env.kind != "staging":
            continue
        try:
            with Database(env) as db, db.connect() as conn:
                if not sa.inspect(conn).has_table(ledger.runs.name):
                    reasons.append(f"{env.name}: no soak has run there")
                    continue
                soaks = ledger.list_runs(conn, phase="soak", limit=200)
                if not soaks:
                    reasons.append(f"{env.name}: no soak has run there")
                for run in soaks:
                    why = _soak_shortfall(conn, run, versions, now)
                    if why:
                        reasons.append(f"{env.name}: soak {run.id} {why}")
                        continue
                    approval = [a for a in ledger.approvals_for(conn, run.id, "soak") if a.kind == "approval"][-1]
                    assert run.finished_at is not None
                    found = SoakEvidence(env.name, run.id, "PASS", run.finished_at, approval.approved_by, run.versions)
                    if best is None or found.finished_at > best.finished_at:
                        best = found
        except DatabaseUnreachable as exc:
            reasons.append(f"{env.name}: unreachable ({exc.reason})")
    return best, reasons


def _soak_shortfall(conn: sa.Connection, run: ledger.Run, versions: Mapping[str, str], now: datetime) -> str | None:
    verdict = (run.summary or {}).get("verdict")
    if verdict != "PASS":
        return f"has verdict {verdict or 'none yet'} (status {run.status.value})"
    if not _same_versions(run.versions, versions):
        return f"measured versions {dict(run.versions)}, the plan writes {dict(versions)}"
    if run.finished_at is None or now - run.finished_at > SOAK_MAX_AGE:
        return f"finished {run.finished_at.isoformat() if run.finished_at else 'never'}, more than 7 days ago"
    if not [a for a in ledger.approvals_for(conn, run.id, "soak") if a.kind == "approval"]:
        return f"passed but is not approved (run `gatefill approve {run.id} --gate soak --by NAME`)"
    return None


def check_production_gate(
    settings: Settings, versions: Mapping[str, str], *, now: datetime, override: Override | None = None
) -> SoakEvidence | None:
    """Read-only: the soak evidence for a production apply, None when an override stands in; GateBlocked otherwise."""
    evidence, reasons = find_passing_soak(settings, versions, now)
    if evidence is not None:
        return evidence
    if override is not None:
        override.validate()
        return None
    missing = ["an approved, PASS staging soak of the same versions within the last 7 days", *reasons[:6]]
    missing.append("or pass --override-gate --by NAME --reason TEXT")
    raise GateBlocked("production", missing)


def record_production_gate(
    db: Database, run_id: str, evidence: SoakEvidence | None, override: Override | None, *, now: datetime
) -> None:
    """Records on the production run what let it through: the soak it relies on, or the override (who, why)."""
    with db.begin() as conn:
        if evidence is not None:
            ledger.record_approval(
                conn,
                run_id=run_id,
                gate="soak",
                approved_by=evidence.approved_by,
                now=now,
                note=f"staging soak {evidence.run_id} on {evidence.environment}: PASS, finished "
                f"{evidence.finished_at.isoformat()}",
            )
        elif override is not None:
            ledger.record_approval(
                conn,
                run_id=run_id,
                gate="soak",
                approved_by=override.by,
                now=now,
                note=f"OVERRIDE without a passing soak: {override.reason}",
                kind="override",
            )


@dataclass(frozen=True)
class GateRecord:
    """One approval or override, with where it was recorded."""

    environment: str
    approval: ledger.Approval
    phase: str


def gate_records(settings: Settings, env_name: str | None = None) -> list[GateRecord]:
    """Every approval and override in the ledgers of the configured (reachable) environments, newest first."""
    found: list[GateRecord] = []
    for name in [env_name] if env_name else list(settings.environments):
        env = settings.env(name)
        try:
            with Database(env) as db, db.connect() as conn:
                if not sa.inspect(conn).has_table(ledger.approvals.name):
                    continue
                rows = conn.execute(
                    sa.select(ledger.approvals, ledger.runs.c.phase).join(
                        ledger.runs, ledger.runs.c.id == ledger.approvals.c.run_id
                    )
                )
                for r in rows:
                    approval = ledger.Approval(r.run_id, r.gate, r.kind, r.approved_by, r.note, r.plan_hash, r.at)
                    found.append(GateRecord(name, approval, r.phase))
        except DatabaseUnreachable:
            if env_name:
                raise
    return sorted(found, key=lambda g: g.approval.at, reverse=True)
