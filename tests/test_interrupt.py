"""Ctrl-C and SIGTERM sent to a real ``gatefill apply`` process while it waits for its throttle: the wait ends at
once, no batch starts, the run is paused (not left ``running``) and a later apply resumes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.ledger import RunStatus
from gatefill.plan import PlanParams, build_plan
from gatefill.prism.job import PrismJob
from tests.conftest import Seeder, Target

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)


def gatefill(config: Path, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gatefill", "--config", str(config), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def status(target: Target, run_id: str) -> RunStatus:
    with target.db.connect() as conn:
        return ledger.get_run(conn, run_id, with_plan=False).status


@pytest.mark.parametrize(
    ("signum", "said", "exit_code"), [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143)]
)
def test_a_signal_during_the_throttle_wait_pauses_before_any_batch(
    target: Target, tmp_path: Path, signum: signal.Signals, said: str, exit_code: int, seeder: Seeder
) -> None:
    seeder(target, "staging-2025-09-17")
    # 5 sessions per batch at 1/min: the first batch waits 300 s for its tokens, which is when the signal comes.
    params = PlanParams(since=SINCE, rate="1/min", batch_size=5)
    plan = build_plan(target.db, target.env, PrismJob(), params, now=START, artifacts_dir=tmp_path / "artifacts")
    config = tmp_path / "gatefill.toml"
    config.write_text(f'artifacts_dir = "artifacts"\n[env.test]\ndatabase_url = "{target.url}"\n', encoding="utf-8")

    proc = gatefill(config, "apply", plan.run_id, "--approve-as", "tess")
    try:
        deadline = time.monotonic() + 60
        while status(target, plan.run_id) is not RunStatus.RUNNING:  # it is now taking its first throttle wait
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "apply never started"
            time.sleep(0.05)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)  # a hang guard: the old code slept out its 300 s first
    finally:
        proc.kill()

    assert proc.returncode == exit_code, err
    assert err.count("\n") == 1 and err.startswith(
        f"error: run {plan.run_id} paused: interrupted ({said}) before batch 1"
    )
    assert status(target, plan.run_id) is RunStatus.PAUSED
    with target.db.connect() as conn:
        assert ledger.committed_batches(conn, plan.run_id) == set()
        assert ledger.session_results_for(conn, plan.run_id) == {}
        reason = conn.execute(
            sa.select(ledger.run_events.c.reason).where(
                ledger.run_events.c.run_id == plan.run_id, ledger.run_events.c.to_status == "paused"
            )
        ).scalar_one()
    assert reason == f"interrupted ({said}) before batch 1; every earlier batch is committed"

    resumed = gatefill(config, "apply", plan.run_id, "--rate", "unlimited")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"run {plan.run_id}: succeeded; written 39" in out


def test_sigterm_pauses_a_soak_waiting_for_its_next_look(target: Target, tmp_path: Path, seeder: Seeder) -> None:
    """A real-clock soak sits waiting for its first look (five minutes away) when SIGTERM comes: it ends at once with
    the run paused and the signal named, as Ctrl-C does (it only listened for Ctrl-C before, and died 'running')."""
    seeder(target, "staging-2025-09-17")
    config = tmp_path / "gatefill.toml"
    config.write_text(f'artifacts_dir = "artifacts"\n[env.test]\ndatabase_url = "{target.url}"\n', encoding="utf-8")
    now = datetime.now(UTC).isoformat()
    proc = gatefill(config, "soak", "--env", "test", "--from", now, "--duration", "10m", "--interval", "5m")
    try:
        deadline = time.monotonic() + 60
        while True:
            with target.db.connect() as conn:
                held = (
                    sa.inspect(conn).has_table(ledger.runs.name)
                    and conn.execute(
                        sa.select(ledger.runs.c.id).where(ledger.runs.c.status == "running")
                    ).scalar_one_or_none()
                )
            if held:
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the soak never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)  # a hang guard: it would wait five minutes for its look
    finally:
        proc.kill()
    assert "interrupted (SIGTERM): continue with `gatefill soak --resume" in out, out + err
    assert status(target, str(held)) is RunStatus.PAUSED
    with target.db.connect() as conn:
        assert ledger.get_lease(conn, f"run:{held}") is None
