"""Plans streamed: a plan file is verified (hash, derived content) without holding its candidates, its work is stored
beside its run and the apply reads it from there a batch at a time; a file modified after hashing is refused before
anything is written; runs recorded with their whole plan on the row still apply."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gatefill import ledger, worklist
from gatefill.apply import ApplyOptions, apply_plan, ensure_run_for_plan, measure_backfill_gate
from gatefill.clock import SimulatedClock
from gatefill.errors import UsageError
from gatefill.ledger import RunStatus
from gatefill.plan import (
    PlanParams,
    build_plan,
    compose_plan,
    load_plan,
    open_plan,
    plan_from_ledger,
    plan_hash,
    write_plan_files,
)
from gatefill.prism.job import PrismJob
from gatefill.prism.sandbox.seed import TEST_SESSION_B
from tests.conftest import Seeder, Target

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)
OPTIONS = ApplyOptions(rate="unlimited", batch_size=4, approve_as="tester")


def _elsewhere(target: Target, seeder: Seeder, tmp_path: Path) -> Path:
    """A plan file made without recording its run (as health's mini plan is), with a priority and every category."""
    seeder(target, "staging-2025-09-17")
    with target.db.connect() as conn:
        plan = compose_plan(
            conn,
            target.env,
            PrismJob(),
            PlanParams(since=SINCE, priority=(TEST_SESSION_B,), batch_size=5, profiles="stale"),
            now=START,
        )
    return write_plan_files(plan, tmp_path / "made_elsewhere", "plan").json_path


def _runs(target: Target) -> list[str]:
    ledger.init_ledger(target.db)
    with target.db.connect() as conn:
        return list(conn.execute(sa.select(ledger.runs.c.id)).scalars())


def test_open_plan_verifies_as_load_plan_does_and_keeps_only_the_header(
    target: Target, seeder: Seeder, tmp_path: Path
) -> None:
    path = _elsewhere(target, seeder, tmp_path)
    whole = load_plan(path)
    head = open_plan(path)
    assert head.hash == whole.hash == plan_hash(json.loads(path.read_text()))
    assert head.plan is None and head.path == path and head.runnable == len(whole.runnable)
    assert dict(head.header) == whole.head().header and "candidates" not in head.header
    assert all("keys" not in c for c in head.header["categories"].values())


def test_a_plan_file_made_elsewhere_is_recorded_from_the_stream_and_applied(
    target: Target, seeder: Seeder, tmp_path: Path
) -> None:
    path = _elsewhere(target, seeder, tmp_path)
    whole = load_plan(path)
    head = open_plan(path)
    result = apply_plan(
        target.db, target.env, PrismJob(), head, options=OPTIONS, clock=SimulatedClock(START), artifacts_dir=tmp_path
    )
    assert result.status is RunStatus.SUCCEEDED and sum(result.counts.values()) == len(whole.runnable)
    with target.db.connect() as conn:
        stored = ledger.get_run(conn, head.run_id).plan
        order = list(
            conn.execute(
                sa.select(ledger.plan_batches.c.session_id)
                .where(ledger.plan_batches.c.run_id == head.run_id)
                .order_by(ledger.plan_batches.c.position)
            ).scalars()
        )
    assert stored == whole.head().header  # the run's row keeps the header only
    assert order == [key for b in whole.batches for key in b.keys]  # the work in plan order
    assert order[0] == TEST_SESSION_B  # the priority session first
    gate = measure_backfill_gate(
        target.db, target.env, PrismJob(), head.run_id, clock=SimulatedClock(START), artifacts_dir=tmp_path
    )
    checks = {c.name: c for c in gate.checks}
    assert gate.planned == len(whole.runnable) and checks["all_candidates_processed"].verdict == "PASS"
    wanted = Counter(c.category for c in whole.runnable)
    assert {k: v["planned"] for k, v in gate.by_category.items()} == dict(wanted)
    assert {k: v["written"] for k, v in gate.by_category.items()} == dict(wanted)
    # Resumed from the ledger (``gatefill apply RUN``), the plan is its header: nothing is left to do.
    again = plan_from_ledger(target.db, head.run_id)
    assert again.plan is None and again.path is None and again.hash == head.hash


def _modified(path: Path, change: Any) -> Path:
    body = json.loads(path.read_text())
    change(body)
    out = path.with_name("modified.json")
    out.write_text(json.dumps(body, indent=1))
    return out


def test_a_plan_modified_in_its_candidates_after_hashing_is_refused_before_any_write(
    target: Target, seeder: Seeder, tmp_path: Path
) -> None:
    path = _elsewhere(target, seeder, tmp_path)

    def drop_one(body: dict[str, Any]) -> None:
        body["candidates"] = [c for c in body["candidates"] if c["key"] != body["batches"][0]["keys"][0]]

    def recategorise(body: dict[str, Any]) -> None:
        body["candidates"][-1]["category"] = "profile+fc"

    for change in (drop_one, recategorise):
        with pytest.raises(UsageError, match="plan hash does not match its content"):
            open_plan(_modified(path, change))

    # Re-hashed after the edit: the header no longer says what the candidates derive (categories, totals).
    def rehashed(body: dict[str, Any]) -> None:
        drop_one(body)
        body["hash"] = plan_hash(body)

    with pytest.raises(UsageError, match="does not match what gatefill derives"):
        open_plan(_modified(path, rehashed))
    assert _runs(target) == []


def test_a_plan_file_changed_between_its_check_and_its_recording_records_nothing(
    target: Target, seeder: Seeder, tmp_path: Path
) -> None:
    path = _elsewhere(target, seeder, tmp_path)
    head = open_plan(path)
    body = json.loads(path.read_text())
    body["candidates"][0]["detail"] = {"tampered": True}
    path.write_text(json.dumps(body))  # same hash field: only the streamed digest can tell
    with pytest.raises(UsageError, match="changed while it was read"):
        ensure_run_for_plan(target.db, head, now=START)
    assert _runs(target) == []


def test_a_run_recorded_with_its_whole_plan_on_its_row_still_applies(
    target: Target, seeder: Seeder, tmp_path: Path
) -> None:
    """A ledger from before plans were stored apart: the first apply stores the work apart and keeps the header."""
    seeder(target, "staging-2025-09-17")
    files = build_plan(
        target.db, target.env, PrismJob(), PlanParams(since=SINCE, batch_size=6), now=START, artifacts_dir=tmp_path
    )
    with target.db.begin() as conn:
        for table in (ledger.plan_batches, ledger.plan_candidates):
            conn.execute(table.delete().where(table.c.run_id == files.run_id))
        ledger.replace_run_plan(conn, files.run_id, files.plan.to_json())
    head = plan_from_ledger(target.db, files.run_id)
    assert head.plan is not None  # verified as a whole plan, as before
    result = apply_plan(
        target.db, target.env, PrismJob(), head, options=OPTIONS, clock=SimulatedClock(START), artifacts_dir=tmp_path
    )
    assert result.status is RunStatus.SUCCEEDED and sum(result.counts.values()) == len(files.plan.runnable)
    with target.db.connect() as conn:
        run = ledger.get_run(conn, files.run_id)
        assert run.plan is not None and "candidates" not in run.plan
        todo = worklist.open_work(target.db, run)
    assert todo.total == len(files.plan.runnable) and todo.remaining == 0 and todo.take(5) is None


def test_work_is_drawn_across_pages_without_spanning_plan_batches(
    target: Target, seeder: Seeder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of 3 candidates, plan batches of 5, draws of 4: batches follow the plan's, whatever the page size."""
    monkeypatch.setattr(worklist, "PAGE", 3)
    seeder(target, "staging-2025-09-17")
    files = build_plan(
        target.db, target.env, PrismJob(), PlanParams(since=SINCE, batch_size=5), now=START, artifacts_dir=tmp_path
    )
    with target.db.connect() as conn:
        run = ledger.get_run(conn, files.run_id, with_plan=False)
    todo = worklist.open_work(target.db, run)
    drawn = []
    while (task := todo.take(4)) is not None:
        drawn.append([c.key for c in task.candidates])
    expected = []
    for batch in files.plan.batches:
        keys = list(batch.keys)
        expected += [keys[i : i + 4] for i in range(0, len(keys), 4)]
    assert drawn == expected and todo.remaining == 0
