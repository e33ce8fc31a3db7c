"""The run ledger on SQLite and Postgres: state machine, approvals (leases: tests/test_lease.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gatefill import ledger
from gatefill.ledger import IllegalTransition, RunNotFound, RunStatus
from tests.conftest import Target

NOW = datetime(2025, 9, 17, 8, 0, tzinfo=UTC)


def make_run(target: Target, run_id: str = "apply-1") -> None:
    ledger.init_ledger(target.db)
    ledger.init_ledger(target.db)  # idempotent
    with target.db.begin() as conn:
        ledger.create_run(
            conn,
            run_id=run_id,
            phase="apply",
            environment="staging",
            job="prism",
            versions={"fc": "v1.2", "engine": "v1.2.1"},
            params={"rate": "20/min"},
            now=NOW,
        )


def test_every_edge_of_the_transition_table_has_a_reason_and_terminal_states_hold() -> None:
    assert set(ledger.TRANSITIONS) == set(RunStatus)
    assert ledger.TRANSITIONS[RunStatus.ROLLED_BACK] == frozenset()
    for status in ledger.TERMINAL:
        assert RunStatus.PAUSED not in ledger.TRANSITIONS[status]


def test_state_machine_enforced(target: Target) -> None:
    make_run(target)
    with target.db.begin() as conn:
        run = ledger.transition(conn, "apply-1", RunStatus.RUNNING, now=NOW + timedelta(seconds=1))
        assert run.status is RunStatus.RUNNING and run.started_at == NOW + timedelta(seconds=1)
        ledger.transition(conn, "apply-1", RunStatus.PAUSED, now=NOW + timedelta(seconds=2), reason="ctrl-c")
        run = ledger.transition(conn, "apply-1", RunStatus.RUNNING, now=NOW + timedelta(seconds=3))
        assert run.started_at == NOW + timedelta(seconds=1)  # a resume keeps the first start
        run = ledger.transition(conn, "apply-1", RunStatus.SUCCEEDED, now=NOW + timedelta(seconds=4), summary={"n": 3})
        assert run.summary == {"n": 3} and run.finished_at == NOW + timedelta(seconds=4)
    with pytest.raises(IllegalTransition, match="succeeded; it cannot become paused"), target.db.begin() as conn:
        ledger.transition(conn, "apply-1", RunStatus.PAUSED, now=NOW)
    with pytest.raises(RunNotFound), target.db.begin() as conn:
        ledger.transition(conn, "nope", RunStatus.RUNNING, now=NOW)


def test_approvals_recorded_with_who_when_and_plan_hash(target: Target) -> None:
    make_run(target)
    with target.db.begin() as conn:
        ledger.record_approval(conn, run_id="apply-1", gate="plan", approved_by="ana", now=NOW, plan_hash="abc")
        ledger.record_approval(
            conn, run_id="apply-1", gate="soak", approved_by="bo", now=NOW, note="no soak", kind="override"
        )
        found = ledger.approvals_for(conn, "apply-1")
    assert [(a.gate, a.kind, a.approved_by, a.plan_hash) for a in found] == [
        ("plan", "approval", "ana", "abc"),
        ("soak", "override", "bo", None),
    ]
    with pytest.raises(RunNotFound), target.db.begin() as conn:
        ledger.record_approval(conn, run_id="nope", gate="plan", approved_by="ana", now=NOW)


def test_a_run_read_without_its_plan_leaves_the_plan_in_the_database(target: Target) -> None:
    ledger.init_ledger(target.db)
    plan = {"candidates": [{"key": "s1", "operations": ["fc_scores:insert"]}], "hash": "h"}
    with target.db.begin() as conn:
        created = ledger.create_run(
            conn,
            run_id="apply-2",
            phase="apply",
            environment="staging",
            job="prism",
            versions={"fc": "v1.2"},
            params={},
            plan=plan,
            plan_hash="h",
            now=NOW,
        )
    assert created.plan is None  # create_run hands back the light form
    with target.db.connect() as conn:
        assert ledger.get_run(conn, "apply-2").plan == plan
        light = ledger.get_run(conn, "apply-2", with_plan=False)
    assert light.plan is None and light.plan_hash == "h" and light.status is RunStatus.PLANNED
