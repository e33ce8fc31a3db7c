"""The final gate's checklist is job-neutral: it cites the checks a job named for it (with their labels), or, for a
job that named none, every gating check its phases recorded; observe-only checks never gate, N/A keeps its reason."""

from __future__ import annotations

from gatefill.final_gate import _phase_items
from gatefill.prism.job import PrismJob


def _soak_step(gate_checks: list[list[str]] | None) -> dict[str, object]:
    step: dict[str, object] = {
        "run_id": "soak-x",
        "verdict": "PASS",
        "checks": {"verify": "PASS", "rls": "N/A", "latency": "FAIL"},
        "notes": {"rls": "sqlite has no row-level security"},
        "observed": ["latency"],
    }
    if gate_checks is not None:
        step["gate_checks"] = gate_checks
    return step


def test_a_job_that_names_no_checks_gets_every_gating_check_the_phase_recorded() -> None:
    items = _phase_items(_soak_step(None), "soak")
    assert [(i.name, i.verdict) for i in items] == [("soak: verify", "PASS"), ("soak: rls", "N/A")]
    assert items[1].summary == "soak check rls N/A: sqlite has no row-level security"


def test_named_checks_keep_their_labels_and_a_missing_one_is_not_measured() -> None:
    items = _phase_items(_soak_step([["verify", "rows verified"], ["gone", "a check the soak never ran"]]), "soak")
    assert [(i.name, i.verdict) for i in items] == [
        ("rows verified", "PASS"),
        ("a check the soak never ran", "INCONCLUSIVE"),
    ]
    assert items[1].summary.startswith("not measured: ")


def test_prism_names_the_seed_checklist_for_both_phases() -> None:
    job = PrismJob()
    assert [g.check for g in job.gate_checks("soak")] == [
        "version_stamps",
        "engine_version_override",
        "legacy_fc",
        "token_gating",
        "conversion",
        "conversion_floor",
    ]
    assert [g.label for g in job.gate_checks("health")] == ["production versions", "production RLS"]
    assert job.gate_checks("apply") == ()
