"""The final gate: the go/no-go of a whole pipeline, every number re-read from the ledgers when it is judged.

Sessions are counted once per environment they were processed in, from the ledgers' per-session results (unlike the
original's "39 + 11 + 157 = 207", which added backfilled sessions, soak traffic and sessions merely inspected). Each
checklist item cites the check that measured it; an item nothing measured says so and cannot pass, and a check that
does not apply (RLS on SQLite) is N/A with its reason, counted neither way. Whether each backfill still stands is read
from its ledger when the gate is written, so a rollback after the fact turns the gate into a NO-GO.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gatefill import ledger
from gatefill.artifacts import counts_text
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.errors import DataError
from gatefill.job import Check, overall_verdict
from gatefill.ledger import RunStatus

__all__ = ["FinalGate", "exit_code_for", "measure_final_gate"]


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


def _check_item(name: str, step: Mapping[str, Any], check: str, source: str) -> Check:
    """An item that cites one check of a step's record; an N/A check brings its reason along."""
    verdict = (step.get("checks") or {}).get(check)
    reason = (step.get("notes") or {}).get(check)
    summary = f"{source} check {check} {verdict}" + (f": {reason}" if reason else "")
    return _item(name, verdict, summary, source)


def _phase_items(step: Mapping[str, Any], source: str) -> list[Check]:
    """The checklist rows a phase's step contributes: the checks its job named for the final gate (``gate_checks`` in
    the step record, with their labels), or else every gating check the phase recorded, under its own name."""
    named = step.get("gate_checks")
    if named:
        return [_check_item(str(label), step, str(check), source) for check, label in named]
    observed = set(step.get("observed") or ())
    return [
        _check_item(f"{source}: {check}", step, check, source)
        for check in (step.get("checks") or {})
        if check not in observed
    ]


def _in_place(name: str, run: ledger.Run | None, source: str) -> Check:
    """Whether an apply the pipeline relied on still stands: read from its ledger now, not from the step record."""
    if run is None:
        return _item(name, None, "the run is not in its ledger", source)
    if run.status is RunStatus.ROLLED_BACK:
        when = run.finished_at.isoformat() if run.finished_at else "an unknown time"
        why = f"run {run.id} was rolled back at {when}: the rows the gates above judged are gone"
        return _item(name, "FAIL", why, source)
    return _item(name, "PASS", f"run {run.id} has status {run.status.value}: its rows were not rolled back", source)


def _run(db: Database, run_id: str | None) -> ledger.Run | None:
    if not run_id:
        return None
    with db.connect() as conn:
        try:
            return ledger.get_run(conn, run_id, with_plan=False)
        except ledger.RunNotFound:
            return None


def _items(
    steps: Mapping[str, Any],
    runs: Mapping[str, ledger.Run | None],
    staging_results: Counter[str],
    production_results: Counter[str],
) -> list[Check]:
    apply_step, soak_step = steps.get("apply", {}), steps.get("soak", {})
    health_step, prod_step = steps.get("health", {}), steps.get("production_apply", {})
    production_ok = prod_step.get("healthy_after") if prod_step else health_step.get("healthy")
    items = [
        _item(
            "staging backfill gate",
            apply_step.get("verdict"),
            f"backfill_gate.md verdict {apply_step.get('verdict')}: sessions {counts_text(staging_results)}",
            "staging apply",
        ),
        _in_place("staging backfill still in place", runs["apply"], "staging ledger"),
        *_phase_items(soak_step, "soak"),
        _item(
            "staging soak verdict",
            soak_step.get("verdict"),
            f"soak {soak_step.get('run_id')}: {soak_step.get('verdict')}",
            "soak",
        ),
        *_phase_items(health_step, "health"),
        _item(
            "production healthy",
            "PASS" if production_ok else ("FAIL" if production_ok is False else None),
            "production health after the pipeline: " + ("healthy" if production_ok else "not healthy"),
            "health",
        ),
    ]
    if prod_step:
        at = len(items) - 3
        items[at:at] = [
            _item(
                "production backfill gate",
                prod_step.get("verdict"),
                f"backfill_gate.md verdict {prod_step.get('verdict')}: sessions {counts_text(production_results)}",
                "production apply",
            ),
            _in_place("production backfill still in place", runs["production_apply"], "production ledger"),
        ]
    return items


def _evidence_until(steps: Mapping[str, Any], runs: Mapping[str, ledger.Run | None]) -> datetime | None:
    """The latest instant the cited evidence comes from: when each cited run finished, or was measured."""
    times = [r.finished_at for r in runs.values() if r is not None and r.finished_at is not None]
    times += (
        [datetime.fromisoformat(str(steps["health"]["measured_at"]))]
        if steps.get("health", {}).get("measured_at")
        else []
    )
    return max(times, default=None)


@dataclass(frozen=True)
class FinalGate:
    """The go/no-go of a whole pipeline as measured at ``now``: its checklist, the approvals and the runs it cites
    (``gatefill.reports.final_gate`` writes it as ``pipeline_final_gate.md``)."""

    pipeline_run_id: str
    verdict: str  # GO | NO-GO | INCONCLUSIVE
    items: tuple[Check, ...]
    approvals: tuple[ledger.Approval, ...]
    overrides: tuple[ledger.Approval, ...]
    #: Each cited run's status now (None: not in its ledger), by step.
    statuses: Mapping[str, str | None]
    staging_results: Mapping[str, int]
    production_results: Mapping[str, int]
    staging: Environment
    production: Environment
    since: datetime
    #: The pipeline's step records, as its run keeps them in the ledger.
    steps: Mapping[str, Any]
    now: datetime
    evidence_until: datetime | None
    #: The artifacts the steps wrote, as (name, path).
    artifacts: tuple[tuple[str, str], ...]
    #: Where ``pipeline_final_gate.md`` was written (None until it is).
    path: Path | None = None

    @property
    def exit_code(self) -> int:
        """GO 0, NO-GO 1, INCONCLUSIVE 3 (the CLI's contract)."""
        return _EXIT_CODES.get(self.verdict, 3)

    def step_record(self) -> dict[str, Any]:
        """The pipeline's record of its final gate step."""
        return {"verdict": self.verdict, "artifact": str(self.path), "written_at": self.now.isoformat()}


_EXIT_CODES = {"GO": 0, "NO-GO": 1}


def exit_code_for(verdict: str | None) -> int:
    """A final gate verdict's exit code: GO 0, NO-GO 1, anything else (INCONCLUSIVE, no gate yet) 3."""
    return _EXIT_CODES.get(str(verdict), 3)


def measure_final_gate(
    staging_env: Environment,
    production_env: Environment,
    since: datetime,
    pipeline_run_id: str,
    steps: Mapping[str, Any],
    *,
    now: datetime,
) -> FinalGate:
    """The final gate of a pipeline's ``steps``, every item re-read from the ledgers at ``now``.

    A backfill rolled back since its gate passed makes the final gate NO-GO. ``now`` may not precede the evidence it
    cites (a report is never dated before what it reports).
    """
    apply_id = steps.get("apply", {}).get("run_id")
    soak_id = steps.get("soak", {}).get("run_id")
    prod_id = steps.get("production_apply", {}).get("run_id")
    with Database(staging_env) as staging, Database(production_env) as production:
        staging_results = _sessions(staging, apply_id)
        production_results = _sessions(production, prod_id)
        approvals = _approvals(staging, [r for r in (apply_id, soak_id, pipeline_run_id) if r])
        approvals += _approvals(production, [prod_id] if prod_id else [])
        runs = {
            "apply": _run(staging, apply_id),
            "soak": _run(staging, soak_id),
            "production_apply": _run(production, prod_id),
        }
    latest = _evidence_until(steps, runs)
    if latest is not None and now < latest:
        raise DataError(
            f"the final gate would be dated {now.isoformat()}, before the evidence it cites ({latest.isoformat()}): "
            "the pipeline's clock is behind its phases' clocks"
        )
    items = _items(steps, runs, staging_results, production_results)
    overrides = [a for a in approvals if a.kind == "override"]
    overall = overall_verdict(i.verdict for i in items)
    verdict = "NO-GO" if overall == "FAIL" else ("GO" if overall == "PASS" and not overrides else "INCONCLUSIVE")
    return FinalGate(
        pipeline_run_id=pipeline_run_id,
        verdict=verdict,
        items=tuple(items),
        approvals=tuple(approvals),
        overrides=tuple(overrides),
        statuses={name: (run.status.value if run else None) for name, run in runs.items()},
        staging_results=dict(staging_results),
        production_results=dict(production_results),
        staging=staging_env,
        production=production_env,
        since=since,
        steps=steps,
        now=now,
        evidence_until=latest,
        artifacts=tuple(_step_artifacts(steps)),
    )


def _step_artifacts(steps: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The artifacts each step recorded, in step order: (name, path)."""
    artifacts = []
    for step_name in ("plan", "apply", "soak", "health", "production_apply"):
        step = steps.get(step_name, {})
        if "artifact" in step:
            artifacts.append((step_name, str(step["artifact"])))
        for key, value in step.get("artifacts", {}).items():
            artifacts.append((f"{step_name} {key}", str(value)))
    return artifacts
