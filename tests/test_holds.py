"""Apply's manual holds (``--throttle-file``, ``--throttle-query``) on SQLite and Postgres: a hold keeps the next
batch from starting until its indicator clears, is recorded in the ledger with its duration and shows in ``status``
and the backfill summary; a query that cannot run is refused before anything is written; a signal while held pauses
the run with every earlier batch committed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ApplyOptions, apply_plan, ensure_run_for_plan, measure_backfill_gate
from gatefill.cli import main
from gatefill.clock import SimulatedClock
from gatefill.config import Environment, ThrottleSettings
from gatefill.job import BatchRecord
from gatefill.ledger import RunStatus
from gatefill.pacing import Pacer
from gatefill.plan import Plan, PlanParams, build_plan
from gatefill.prism.job import PrismJob
from gatefill.reports.apply import write_apply_artifacts
from gatefill.throttle import parse_rate
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
    # Holds once two batches are committed: the hold comes before batch 3. (Without the health indicators: on a
    # server shared with other suites and benchmarks, the WAL rate or the connections can stop the apply earlier.)
    query = "SELECT count(*) >= 2 FROM gatefill_batches"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gatefill", "--config", str(config), "apply", plan.run_id, "--approve-as", "t",
         "--throttle-query", query, "--throttle-interval", "0.2", "--no-health"],
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


# ------------------------------------------------------------------------------- adaptive pacing (issue 16 item 2)


def replay_lag_env(target: Target) -> Environment:
    """The environment with its replay-lag indicator reading the test's ``fake_replication`` table (the seam of
    ``gatefill.indicators``); on SQLite the table is there but the indicator is N/A."""
    with target.db.begin() as conn:
        conn.execute(sa.text("CREATE TABLE fake_replication (replay_lsn text, replay_lag text)"))
    if target.dialect != "sqlite":
        with target.db.begin() as conn:
            conn.execute(sa.text("DROP TABLE fake_replication"))
            conn.execute(sa.text("CREATE TABLE fake_replication (replay_lsn pg_lsn, replay_lag interval)"))
    return replace(target.env, throttle=ThrottleSettings(replication_source="fake_replication"))


def set_replay_lag(target: Target, seconds: float | None) -> None:
    with target.db.begin() as conn:
        conn.execute(sa.text("DELETE FROM fake_replication"))
        if seconds is not None:
            conn.execute(
                sa.text("INSERT INTO fake_replication VALUES (pg_current_wal_lsn(), make_interval(secs => :s))"),
                {"s": seconds},
            )


def batch_sizes(target: Target, run_id: str) -> list[int]:
    with target.db.connect() as conn:
        b = ledger.batches
        return list(conn.execute(sa.select(b.c.sessions).where(b.c.run_id == run_id).order_by(b.c.batch_no)).scalars())


def test_a_hold_is_undone_only_after_three_normal_looks_in_a_row(
    target: Target, seeder: Seeder, tmp_path: Path
) -> None:
    seeder(target, "staging-2025-09-17")
    params = PlanParams(since=SINCE, rate="60/min", batch_size=8)
    plan = build_plan(target.db, target.env, PrismJob(), params, now=START, artifacts_dir=tmp_path / "p").plan
    env = replay_lag_env(target)
    assert env.throttle.recover_after_looks == 3  # the default

    def before_batch(batch_no: int) -> None:  # replay lag 2 s (Hold) before batch 2 only
        if target.dialect != "sqlite" and batch_no in (2, 3):
            set_replay_lag(target, 2.0 if batch_no == 2 else None)

    options = ApplyOptions(approve_as="t", batch_size=8)
    result = apply_plan(target.db, env, PrismJob(), plan, options=options, clock=SimulatedClock(START),
                        artifacts_dir=tmp_path / "a", before_batch=before_batch)  # fmt: skip
    assert result.status is RunStatus.SUCCEEDED
    with target.db.connect() as conn:
        decisions = [d for d in ledger.decisions_for(conn, plan.run_id) if d.action != "watch"]
    if target.dialect == "sqlite":
        assert decisions == [] and batch_sizes(target, plan.run_id) == [8, 8, 7, 8, 8]
        return
    # Normal before batches 3, 4 and 5: the recovery comes at the third of them, not the first.
    assert [(d.action, d.batch_no, d.batch_size) for d in decisions] == [("slow", 2, 4), ("recover", 5, 8)]
    assert "3 looks in a row" in decisions[1].reason
    assert batch_sizes(target, plan.run_id) == [8, 8, 4, 3, 4, 4, 8]


def test_each_hold_halves_rate_and_batch_size_and_normal_recovers_them_stepwise(
    target: Target, seeder: Seeder, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seeder(target, "staging-2025-09-17")
    params = PlanParams(since=SINCE, rate="60/min", batch_size=8)
    plan = build_plan(target.db, target.env, PrismJob(), params, now=START, artifacts_dir=tmp_path / "p").plan
    env = replay_lag_env(target)
    env = replace(env, throttle=replace(env.throttle, recover_after_looks=1))
    # Replay lag 2 s (Hold ≥ 1.5 s) before batches 2 and 3, Normal from batch 4 on. A Hold read before batch N
    # slows N's tokens and sizes the batches after it (N was drawn before the look).
    lags = {2: 2.0, 3: 2.0, 4: None}

    def before_batch(batch_no: int) -> None:
        if target.dialect != "sqlite" and batch_no in lags:
            set_replay_lag(target, lags[batch_no])

    options = ApplyOptions(approve_as="t", batch_size=8)
    clock = SimulatedClock(START)
    result = apply_plan(target.db, env, PrismJob(), plan, options=options, clock=clock,
                        artifacts_dir=tmp_path / "a", before_batch=before_batch)  # fmt: skip
    assert result.status is RunStatus.SUCCEEDED
    with target.db.connect() as conn:
        decisions = [d for d in ledger.decisions_for(conn, plan.run_id) if d.action != "watch"]
        watched = {d.indicator: d for d in ledger.decisions_for(conn, plan.run_id) if d.action == "watch"}
    monkeypatch.chdir(tmp_path)
    config = str(write_config(tmp_path, target))
    if target.dialect == "sqlite":  # the Postgres indicators are N/A, listed as such: nothing slowed the apply
        assert watched["replay_lag"].level == "n/a" and decisions == []
        assert batch_sizes(target, plan.run_id) == [8, 8, 7, 8, 8]  # the plan's batches (two groups)
        assert result.throttle_wait_seconds == 39.0  # 39 sessions at 60/min
        assert main(["--config", config, "status", plan.run_id]) == 0
        out = capsys.readouterr().out
        assert "pacing: 0 decisions; now 60/min, batch size 8" in out
        assert "  replay_lag: n/a (not read: the database has no server statistics); hold ≥ 1.50 s" in out
        return
    assert [(d.action, d.batch_no, d.rate, d.batch_size) for d in decisions] == [
        ("slow", 2, "0.5/s (0.5 of 60/min: Hold)", 4),
        ("slow", 3, "0.25/s (0.25 of 60/min: Hold)", 2),
        ("recover", 4, "0.5/s (0.5 of 60/min: Hold)", 4),
        ("recover", 5, "60/min", 8),
    ]
    slow = decisions[0]
    assert (slow.indicator, slow.level, slow.value, slow.threshold) == (
        "replay_lag", "hold", "2.00 s", "hold ≥ 1.50 s, stop ≥ 6.00 s",
    )  # fmt: skip
    # Batch 5 asks for 4 but its plan batch (8, 8, 7) has 1 left.
    assert batch_sizes(target, plan.run_id) == [8, 8, 4, 2, 1, 8, 8]
    # Tokens: 8 at 1/s, 8 at 0.5/s, 4 at 0.25/s, 2 at 0.5/s, then 1, 8 and 8 at 1/s (the bucket restarts empty
    # whenever the rate changes, so no window goes faster than the rate of the moment).
    assert result.throttle_wait_seconds == 8 + 16 + 16 + 4 + 1 + 8 + 8

    gate = measure_backfill_gate(target.db, env, PrismJob(), plan.run_id, clock=clock, artifacts_dir=tmp_path / "a")
    gate = write_apply_artifacts(target.db, PrismJob(), gate, tmp_path / "a")
    summary = gate.paths["summary"].read_text(encoding="utf-8")
    row = "| 2 | slow | replay_lag | 2.00 s | hold ≥ 1.50 s, stop ≥ 6.00 s | - | 0.5/s (0.5 of 60/min: Hold) | 4 |"
    assert row in summary
    assert "| replay_lag | n/a | no replicas (fake_replication is empty) | hold ≥ 1.50 s, stop ≥ 6.00 s |" in summary
    pacing = json.loads(gate.paths["execution_results"].read_text(encoding="utf-8"))["pacing"]
    assert [d["action"] for d in pacing["decisions"]] == ["slow", "slow", "recover", "recover"]
    assert {d["indicator"] for d in pacing["indicators"]} >= {"replay_lag", "wal_rate", "connections", "autovacuum"}

    assert main(["--config", config, "status", plan.run_id]) == 0
    out = capsys.readouterr().out
    assert "pacing: 4 decisions; now 60/min, batch size 8" in out
    assert "before batch 2: slow on replay_lag = 2.00 s [hold ≥ 1.50 s, stop ≥ 6.00 s] -> rate 0.5/s" in out


def test_a_stop_waits_for_every_indicator_to_be_normal_for_the_cool_down(
    target: Target, plan: Plan, tmp_path: Path
) -> None:
    env = replay_lag_env(target)
    with target.db.begin() as conn:
        conn.execute(sa.text("CREATE TABLE throttle_flag (v integer)"))
        conn.execute(sa.text("INSERT INTO throttle_flag VALUES (0)"))

    def flag(v: int) -> None:
        with target.db.begin() as conn:
            conn.execute(sa.text("UPDATE throttle_flag SET v = :v"), {"v": v})

    postgres = target.dialect != "sqlite"
    # Looks every 2 s while stopped: the query clears at look 2 (t=4); a Hold (replay lag) at look 3 restarts the
    # cool-down, which runs again from look 4 (t=8) and is over at look 7 (t=14: Normal for 6 s ≥ 5 s).
    # On SQLite (no replay lag) the cool-down runs from t=4 and is over at look 5 (t=10).
    actions = {2: lambda: flag(0), 3: lambda: set_replay_lag(target, 2.0) if postgres else None,
               4: lambda: set_replay_lag(target, None) if postgres else None}  # fmt: skip
    clock = HookedClock(lambda n: actions.get(n, lambda: None)())

    def before_batch(batch_no: int) -> None:
        if batch_no == 2:
            flag(1)

    options = ApplyOptions(approve_as="t", throttle_query="SELECT v FROM throttle_flag", throttle_interval=2.0,
                           cool_down=5.0)  # fmt: skip
    result = apply_plan(target.db, env, PrismJob(), plan, options=options, clock=clock, artifacts_dir=tmp_path / "a",
                        before_batch=before_batch)  # fmt: skip
    assert result.status is RunStatus.SUCCEEDED
    held = 14.0 if postgres else 10.0
    assert (result.holds, result.held_seconds) == (1, held)
    with target.db.connect() as conn:
        (hold,) = ledger.holds_for(conn, plan.run_id)
        changes = [d for d in ledger.decisions_for(conn, plan.run_id) if d.action in ("stop", "resume")]
    assert (hold.batch_no, hold.indicator, hold.ended_by, hold.seconds) == (2, "query", "clear", held)
    assert hold.checks == (8 if postgres else 6)
    stop, resume = changes
    assert (stop.batch_no, stop.indicator, stop.level, stop.threshold) == (
        2, "query", "stop", "stop while the first column is true",
    )  # fmt: skip
    assert (resume.batch_no, resume.held_seconds) == (2, held)
    assert "Normal for 5 s after the Stop: resuming at 0.5" in resume.reason
    assert resume.batch_size == 5  # the plan's 5 (fitted to 10 after batch 1) halved: it resumes one Hold step down


def test_batches_are_sized_to_the_target_batch_time_within_bounds(target: Target, plan: Plan) -> None:
    run = ensure_run_for_plan(target.db, plan, now=START)
    clock = SimulatedClock(START)

    def pacer(**kw: Any) -> Pacer:
        return Pacer(target.db, run.id, clock, threading.Event(), lambda conn: None, parse_rate("unlimited"),
                     **{"size": 5, "target_batch_time": 1.0, **kw})  # fmt: skip

    def batch(no: int, n: int, seconds: float) -> BatchRecord:
        keys = {f"s{i}": "profile+fc" for i in range(n)}
        started = clock.now()
        clock.advance(seconds)
        return BatchRecord(run.id, no, None, keys, (), (), started, clock.now())

    sized = pacer(max_size=12)
    sizes = []
    for no, (n, seconds) in enumerate([(5, 0.25), (10, 0.5), (12, 0.6), (12, 3.0), (6, 3.0)], start=1):
        sized.after_batch(batch(no, n, seconds))
        sizes.append(sized.batch_size())
    # 50 ms each → 20 fit in 1 s, but at most 2x the largest batch seen (10), then the maximum (12); slower batches
    # pull the EMA (alpha 0.4) up: 0.4 x 250 ms + 0.6 x 50 ms = 130 ms → 7; then 0.4 x 500 + 0.6 x 130 → 2.
    assert sizes == [10, 12, 12, 7, 3]
    assert [d.batch_size for d in sized.decisions] == sizes[:2] + sizes[3:]  # the unchanged one is no decision
    first = sized.decisions[0]
    assert (first.action, first.indicator, first.threshold) == ("size", "batch_time", "target 1 s, 1..12 per batch")
    with target.db.connect() as conn:
        assert [d.batch_size for d in ledger.decisions_for(conn, run.id)] == [10, 12, 7, 3]

    fixed = pacer(fixed_size=True)  # --batch-size wins: never resized
    fixed.after_batch(batch(1, 5, 5.0))
    assert fixed.batch_size() == 5 and fixed.decisions == []
    floor = pacer(min_size=4)
    floor.after_batch(batch(1, 5, 50.0))
    assert floor.batch_size() == 4


def test_a_ledger_from_before_pacing_decisions_still_opens_and_gets_the_table_on_the_next_apply(
    target: Target, plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_run_for_plan(target.db, plan, now=START)
    with target.db.begin() as conn:
        conn.execute(sa.text("DROP TABLE gatefill_decisions"))
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(write_config(tmp_path, target)), "status", plan.run_id]) == 0
    assert "pacing:" not in capsys.readouterr().out
    options = ApplyOptions(approve_as="t")
    result = apply_plan(target.db, target.env, PrismJob(), plan, options=options, clock=SimulatedClock(START),
                        artifacts_dir=tmp_path / "a")  # fmt: skip
    assert result.status is RunStatus.SUCCEEDED
    with target.db.connect() as conn:
        watched = [d for d in ledger.decisions_for(conn, plan.run_id) if d.action == "watch"]
    assert [d.indicator for d in watched][:2] == ["replication_lag", "replay_lag"] and len(watched) == 6
