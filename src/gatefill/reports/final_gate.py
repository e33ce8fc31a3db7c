"""Writes a pipeline's final gate, ``artifacts/<pipeline>/pipeline_final_gate.md``, from the measured ``FinalGate``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gatefill.artifacts import render, write_text
from gatefill.final_gate import FinalGate

__all__ = ["FINAL_GATE_NAME", "write_final_gate"]

FINAL_GATE_NAME = "pipeline_final_gate.md"


def write_final_gate(gate: FinalGate, artifacts_dir: Path) -> FinalGate:
    """Writes ``artifacts_dir/<pipeline>/pipeline_final_gate.md`` and returns the gate with its path."""
    out = artifacts_dir / gate.pipeline_run_id / FINAL_GATE_NAME
    text = render(
        "pipeline_final_gate.md.j2",
        verdict=gate.verdict,
        pipeline=gate.pipeline_run_id,
        now=gate.now.isoformat(),
        evidence_until=gate.evidence_until.isoformat() if gate.evidence_until else None,
        since=gate.since,
        staging=gate.staging,
        production=gate.production,
        steps=gate.steps,
        statuses=gate.statuses,
        staging_results=dict(gate.staging_results),
        production_results=dict(gate.production_results),
        items=gate.items,
        approvals=gate.approvals,
        overrides=gate.overrides,
        artifacts=[(name, _relative(Path(path), out.parent)) for name, path in gate.artifacts],
    )
    write_text(out, text)
    return replace(gate, path=out)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base.parent))
    except ValueError:
        return str(path)
