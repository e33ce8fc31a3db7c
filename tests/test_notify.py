"""Notifications: real webhook receivers on 127.0.0.1 get Slack-compatible JSON for each notice kind; a receiver that
fails is retried, and one that cannot be reached neither blocks nor fails an apply (its URL never logged)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gatefill import commands, notify
from gatefill.apply import ApplyOptions, RunPaused, apply_plan
from gatefill.clock import SimulatedClock
from gatefill.config import NotifySettings, Settings
from gatefill.ledger import RunStatus
from gatefill.pipeline import PipelineOptions
from gatefill.plan import PlanParams, build_plan
from gatefill.prism.job import PrismJob
from gatefill.prism.schema import assessment_sessions, profiles
from gatefill.soak import SoakOptions
from tests.conftest import Seeder, Target, sqlite_env
from tests.webhooks import HOOK_SECRET, Receiver

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _settings(**extra: Any) -> NotifySettings:
    values: dict[str, Any] = {"webhook_url_env": "GATEFILL_TEST_WEBHOOK", "backoff": 0.05, "timeout": 2.0}
    return NotifySettings(**{**values, **extra})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_each_notice_kind_is_posted_as_slack_json_with_its_console_link(receiver: Receiver) -> None:
    notices = [
        notify.gate_waiting("staging", "apply-1", "plan"),
        notify.gate_waiting("production", "pipeline-1", "production", page="/pipeline"),
        notify.soak_verdict_changed("staging", "soak-1", 4, "INCONCLUSIVE", "FAIL", "conversion FAIL"),
        notify.run_failed("staging", "apply-2", "2 session(s) failed in this apply"),
        notify.run_paused("staging", "apply-3", "interrupted (Ctrl-C) before batch 4"),
        notify.watch_verdict_changed("production", "daily", "missing_profiles", "PASS", "FAIL", "3 missing"),
    ]
    settings = _settings(console_url="http://console.example:8765")
    with notify.notifying(settings, {"GATEFILL_TEST_WEBHOOK": receiver.url}) as notifier:
        assert notifier is not None
        for n in notices:
            notify.send(n)
    assert notifier.delivered == len(notices) and notifier.failed == 0
    by_kind = {b["blocks"][1]["elements"][0]["text"].split(" · ")[0]: b for b in receiver.bodies}
    assert set(by_kind) == {"gate_waiting", "soak_verdict", "run_failed", "run_paused", "watch_verdict"}
    plan_gate = next(b for b in receiver.bodies if "apply-1" in b["text"])
    assert plan_gate["text"].splitlines() == [
        "staging: the plan gate of apply-1 waits for approval",
        "approve it in the console or with `gatefill approve apply-1 --gate plan --by NAME --env staging`",
        "http://console.example:8765/env/staging/runs/apply-1/plan",
    ]
    assert "<http://console.example:8765/env/staging/runs/apply-1/plan|" in json.dumps(plan_gate["blocks"])
    production_gate = next(b for b in receiver.bodies if "pipeline-1" in b["text"])
    assert production_gate["text"].endswith("http://console.example:8765/pipeline")
    assert by_kind["watch_verdict"]["text"].endswith("http://console.example:8765/env/production/watch")
    assert "went from INCONCLUSIVE to FAIL at look 4" in by_kind["soak_verdict"]["text"]


def test_events_filter_and_no_link_without_console_url(receiver: Receiver) -> None:
    with notify.notifying(_settings(events=("run_paused",)), {"GATEFILL_TEST_WEBHOOK": receiver.url}):
        notify.send(notify.gate_waiting("staging", "apply-1", "plan"))
        notify.send(notify.run_paused("staging", "apply-3", "interrupted"))
    assert len(receiver.bodies) == 1
    assert receiver.bodies[0]["text"] == "staging: run apply-3 paused\ninterrupted"  # no console_url: no link


def test_a_failing_receiver_is_retried_until_it_answers(caplog: pytest.LogCaptureFixture) -> None:
    flaky = Receiver(statuses=(500, 500))
    try:
        hook = {"GATEFILL_TEST_WEBHOOK": flaky.url}
        with caplog.at_level(logging.WARNING, "gatefill.notify"), notify.notifying(_settings(), hook) as notifier:
            notify.send(notify.run_failed("staging", "apply-2", "2 failed"))
        assert flaky.attempts == 3 and len(flaky.bodies) == 1
        assert notifier is not None and notifier.delivered == 1 and notifier.failed == 0
        assert not caplog.records
    finally:
        flaky.close()


def test_an_unset_variable_turns_notifications_off_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "gatefill.notify"), notify.notifying(_settings(), {}) as notifier:
        notify.send(notify.run_failed("staging", "apply-2", "2 failed"))  # goes nowhere, raises nothing
    assert notifier is None
    expected = "notify: GATEFILL_TEST_WEBHOOK is not set: notifications are off"
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_an_unreachable_receiver_neither_blocks_nor_fails_an_apply(
    target: Target, seeder: Seeder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seeder(target, "staging-2025-09-17")
    url = f"http://127.0.0.1:{_closed_port()}/hooks/{HOOK_SECRET}"
    plan = build_plan(
        target.db, target.env, PrismJob(), PlanParams(since=SINCE), now=START, artifacts_dir=tmp_path / "a"
    ).plan
    stop = threading.Event()
    stop.set()  # a Ctrl-C before the first batch: the apply pauses, and says so
    options = ApplyOptions(approve_as="t", rate="unlimited")
    hook = {"GATEFILL_TEST_WEBHOOK": url}
    with caplog.at_level(logging.WARNING, "gatefill.notify"), notify.notifying(_settings(), hook) as notifier:
        with pytest.raises(RunPaused):
            apply_plan(target.db, target.env, PrismJob(), plan, options=options, clock=SimulatedClock(START),
                       artifacts_dir=tmp_path / "a", stop=stop)  # fmt: skip
        started = time.monotonic()
        result = apply_plan(target.db, target.env, PrismJob(), plan, options=options, clock=SimulatedClock(START),
                            artifacts_dir=tmp_path / "a")  # fmt: skip
        applied_in = time.monotonic() - started
    assert result.status is RunStatus.SUCCEEDED and sum(result.counts.values()) == 39
    assert notifier is not None and notifier.failed == 1 and notifier.delivered == 0
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["notify: delivery of the run_paused notice for test failed after 3 attempt(s) "
                        "(URLError: [Errno 111] Connection refused)"]  # fmt: skip
    assert all(HOOK_SECRET not in m and "127.0.0.1" not in m for m in messages)
    assert applied_in < 30.0  # the failing deliveries ran beside it, in their own thread


def test_a_paused_apply_is_announced(target: Target, seeder: Seeder, tmp_path: Path, receiver: Receiver) -> None:
    seeder(target, "staging-2025-09-17")
    plan = build_plan(
        target.db, target.env, PrismJob(), PlanParams(since=SINCE), now=START, artifacts_dir=tmp_path / "a"
    ).plan
    stop = threading.Event()
    stop.set()
    with notify.notifying(_settings(), {"GATEFILL_TEST_WEBHOOK": receiver.url}), pytest.raises(RunPaused):
        apply_plan(target.db, target.env, PrismJob(), plan, options=ApplyOptions(approve_as="t"),
                   clock=SimulatedClock(START), artifacts_dir=tmp_path / "a", stop=stop)  # fmt: skip
    assert [b["text"].splitlines()[:2] for b in receiver.bodies] == [
        [f"test: run {plan.run_id} paused", "interrupted (a stop request) before batch 1"]
    ]


def test_a_soak_whose_verdict_changes_and_fails_is_announced_twice(
    target: Target, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = datetime(2025, 10, 1, tzinfo=UTC)
    at = start + timedelta(minutes=40)  # after look 1's cutoff (30 min), before look 2's (60 min)
    sid = "00000000-0000-4000-9000-000000000001"
    session = {"id": sid, "started_at": at, "created_at": at, "updated_at": at, "share_token": f"t-{sid}"}
    profile = {"session_id": sid, "results_version": None, "created_at": at, "updated_at": at}  # a wrong stamp
    with target.db.begin() as conn:
        conn.execute(assessment_sessions.insert(), [session])
        conn.execute(profiles.insert(), [profile])
    monkeypatch.setenv("GATEFILL_TEST_WEBHOOK", receiver.url)
    settings = Settings(None, tmp_path, tmp_path / "a", {"test": target.env}, notify=_settings())
    options = SoakOptions(start=start, duration=3600.0, interval=1800.0, chart=False)
    result = commands.soak(settings, options, env_name="test", clock="simulated", latency_p95_ms=1000.0)
    assert result.verdict == "FAIL" and [m.verdict for m in result.measurements] == ["INCONCLUSIVE", "FAIL"]
    texts = [b["text"].splitlines() for b in receiver.bodies]
    assert [t[0] for t in texts] == [
        f"test: soak {result.run_id} went from INCONCLUSIVE to FAIL at look 2",
        f"test: run {result.run_id} failed",
    ]
    assert "version_stamps FAIL" in texts[0][1]


def test_a_recorded_plan_waits_at_its_gate_with_a_link_to_its_page(
    target: Target, seeder: Seeder, tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeder(target, "staging-2025-09-17")
    monkeypatch.setenv("GATEFILL_TEST_WEBHOOK", receiver.url)
    notify_settings = _settings(console_url="http://console.test:8765")
    settings = Settings(None, tmp_path, tmp_path / "a", {"test": target.env}, notify=notify_settings)
    files = commands.plan(settings, "test", PlanParams(since=SINCE))
    assert [b["text"].splitlines()[::2] for b in receiver.bodies] == [
        [
            f"test: the plan gate of {files.run_id} waits for approval",
            f"http://console.test:8765/env/test/runs/{files.run_id}/plan",
        ]
    ]


def test_a_pipeline_stopped_at_a_gate_announces_it(
    target: Target, seeder: Seeder, sqlite_template: Path, tmp_path: Path, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    seeder(target, "staging-2025-09-17")
    production = tmp_path / "production.db"
    shutil.copyfile(sqlite_template, production)
    monkeypatch.setenv("GATEFILL_TEST_WEBHOOK", receiver.url)
    environments = {
        "staging": replace(target.env, name="staging"),
        "production": sqlite_env(production, "production", kind="production"),
    }
    settings = Settings(None, tmp_path, tmp_path / "a", environments, notify=_settings())
    options = PipelineOptions(staging="staging", production="production", since=SINCE)
    state = commands.pipeline(settings, options, soak_duration=3600.0, soak_interval=600.0)
    plan_run = state.steps["plan"]["run_id"]
    assert "--gate plan" in str(state.waiting_for)
    assert [b["text"].splitlines()[0] for b in receiver.bodies] == [
        f"staging: the plan gate of {plan_run} waits for approval"
    ]
