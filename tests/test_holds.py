"""Apply's manual holds (``--throttle-file``, ``--throttle-query``) on SQLite and Postgres: a hold keeps the next
batch from starting until its indicator clears, is recorded in the ledger with its duration and shows in ``status``
and the backfill summary; a query that cannot run is refused before anything is written; a signal while held pauses
the run with every earlier batch committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ApplyOptions, apply_plan, measure_backfill_gate
from gatefill.cli import main
from gatefill.clock import SimulatedClock
from gatefill.ledger import RunStatus
from gatefill.plan import Plan, PlanParams, build_plan
from gatefill.prism.job import PrismJob
from gatefill.reports.apply import write_apply_artifacts
from tests.conftest import Seeder, Target

# The read-only throttle query also runs through PgBouncer in transaction mode (the `pooled` target).
pytestmark = pytest.mark.pooled

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)


class HookedClock(SimulatedClock):
    """A simulated clock that calls ``on_sleep(n)`` after its n-th sleep (only holds sleep at an unlimited rate)."""

    def __init__(self, on_sleep: Callable[[int], None]) -> None:
        super().__init__(START)
        self.sleeps = 0
        self.on_sleep = on_sleep

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        self.sleeps += 1
        self.on_sleep(self.sleeps)


@pytest.fixture
def plan(target: Target, seeder: Seeder, tmp_path: Path) -> Plan:
    seeder(target, "staging-2025-09-17")
    params = PlanParams(since=SINCE, rate="unlimited", batch_size=5)
    return build_plan(target.db, target.env, PrismJob(), params, now=START, artifacts_dir=tmp_path / "artifacts").plan


def write_config(tmp_path: Path, target: Target) -> Path:
    config = tmp_path / "gatefill.toml"
    config.write_text(f'artifacts_dir = "artifacts"\n[env.test]\ndatabase_url = "{target.url}"\n', encoding="utf-8")
    return config


def test_a_throttle_file_holds_the_next_batch_until_removed(
    target: Target, plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = tmp_path / "hold"
    clock = HookedClock(lambda n: flag.unlink() if n == 3 else None)
    started: list[tuple[int, bool]] = []

    def before_batch(batch_no: int) -> None:
        if batch_no == 2:
            flag.touch()
        started.append((batch_no, flag.exists()))

    options = ApplyOptions(approve_as="t", throttle_file=flag, throttle_interval=2.0, cool_down=0)
    result = apply_plan(
        target.db, target.env, PrismJob(), plan, options=options, clock=clock, artifacts_dir=tmp_path / "a",
        before_batch=before_batch,
    )  # fmt: skip
    assert result.status is RunStatus.SUCCEEDED
    assert (result.holds, result.held_seconds) == (1, 6.0)
    with target.db.connect() as conn:
        (hold,) = ledger.holds_for(conn, plan.run_id)
        batch_2 = conn.execute(
            sa.select(ledger.batches.c.started_at).where(
                ledger.batches.c.run_id == plan.run_id, ledger.batches.c.batch_no == 2
            )
        ).scalar_one()
    assert (hold.batch_no, hold.indicator, hold.value, hold.checks, hold.ended_by) == (2, "file", "present", 4, "clear")
    assert hold.seconds == 6.0 and hold.ended_at is not None
    assert (hold.ended_at - hold.began_at).total_seconds() == 6.0
    assert batch_2 >= hold.ended_at  # batch 2 started only once the file was gone

    gate = measure_backfill_gate(target.db, target.env, PrismJob(), plan.run_id, clock=clock, artifacts_dir=tmp_path)
    gate = write_apply_artifacts(target.db, PrismJob(), gate, tmp_path / "a")
    assert "| holds | 1 hold, 6.0 s held in all" in gate.paths["summary"].read_text(encoding="utf-8")

    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(write_config(tmp_path, target)), "status", plan.run_id]) == 0
    out = capsys.readouterr().out
    assert "holds: 1, 6.0 s in all; last: file = present before batch 2" in out
    assert "ended (clear)" in out


def test_a_throttle_query_holds_while_true_and_while_it_fails(target: Target, plan: Plan, tmp_path: Path) -> None:
    with target.db.begin() as conn:
        conn.execute(sa.text("CREATE TABLE throttle_flag (v integer)"))
        conn.execute(sa.text("INSERT INTO throttle_flag VALUES (1)"))

    def on_sleep(n: int) -> None:  # checks 1-2: true; check 3: the query fails; check 4: false
        with target.db.begin() as conn:
            if n == 2:
                conn.execute(sa.text("ALTER TABLE throttle_flag RENAME TO throttle_gone"))
            if n == 3:
                conn.execute(sa.text("ALTER TABLE throttle_gone RENAME TO throttle_flag"))
                conn.execute(sa.text("UPDATE throttle_flag SET v = 0"))

    options = ApplyOptions(approve_as="t", throttle_query="SELECT v FROM throttle_flag", cool_down=0)
    result = apply_plan(
        target.db, target.env, PrismJob(), plan, options=options, clock=HookedClock(on_sleep),
        artifacts_dir=tmp_path / "a",
    )  # fmt: skip
    assert result.status is RunStatus.SUCCEEDED and (result.holds, result.held_seconds) == (1, 3.0)
    with target.db.connect() as conn:
        (hold,) = ledger.holds_for(conn, plan.run_id)
        assert len(ledger.session_results_for(conn, plan.run_id)) == 39
    assert (hold.batch_no, hold.indicator, hold.checks, hold.ended_by) == (1, "query", 4, "clear")
    # The last look that held was the failing one: never proceed on an unknown, and say why.
    assert hold.value == "error" and hold.reason.startswith("throttle query failed:")


def test_a_throttle_query_that_cannot_run_exits_2_and_writes_nothing(
    target: Target, plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def ledger_rows() -> list[int]:
        with target.db.connect() as conn:
            tables = (ledger.run_events, ledger.approvals, ledger.batches, ledger.holds)
            return [conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in tables]

    before = ledger_rows()
    monkeypatch.chdir(tmp_path)
    argv = ["apply", plan.run_id, "--approve-as", "t", "--throttle-query", "SELECT v FROM no_such_table"]
    assert main(["--config", str(write_config(tmp_path, target)), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --throttle-query failed:") and err.count("\n") == 1
    assert ledger_rows() == before
    with target.db.connect() as conn:
        assert ledger.get_run(conn, plan.run_id).status is RunStatus.PLANNED


def test_ctrl_c_while_held_pauses_with_every_earlier_batch_committed(
    target: Target, plan: Plan, tmp_path: Path
) -> None:
    config = write_config(tmp_path, target)
    # Holds once two batches are committed: the hold comes before batch 3.
    query = "SELECT count(*) >= 2 FROM gatefill_batches"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatefill", "--config", str(config), "apply", plan.run_id, "--approve-as", "t",
         "--throttle-query", query, "--throttle-interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            with target.db.connect() as conn:
                if ledger.holds_for(conn, plan.run_id):
                    break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "apply never held"
            time.sleep(0.05)
        time.sleep(0.5)  # a few looks into the hold
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.startswith(f"error: run {plan.run_id} paused: interrupted (Ctrl-C) before batch 3")
    with target.db.connect() as conn:
        assert ledger.get_run(conn, plan.run_id).status is RunStatus.PAUSED
        assert ledger.committed_batches(conn, plan.run_id) == {1, 2}
        assert len(ledger.session_results_for(conn, plan.run_id)) == 10
        (hold,) = ledger.holds_for(conn, plan.run_id)
    assert (hold.batch_no, hold.ended_by) == (3, "stop") and hold.seconds is not None and hold.seconds > 0
