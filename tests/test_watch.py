"""Ongoing monitoring on SQLite and Postgres: ``gatefill watch`` records each due set's checks over the latest
period in the ledger, the console's watch page shows them, a set that is not due does not run, a day later the daily
set runs again, a changed verdict is one webhook, a bad configuration records nothing, and the loop stops cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from gatefill import commands, ledger
from gatefill.clock import SimulatedClock
from gatefill.config import load_settings
from gatefill.db import Database
from gatefill.watch import WatchChange, WatchResult
from tests.conftest import Seeder, Target
from tests.console_server import SECRETS, TOKEN, Bench, stop
from tests.webhooks import Receiver

#: The seeded staging scenario's last day: four sessions completed since 2025-09-16 09:00, two without a profile.
T1 = datetime(2025, 9, 17, 9, 0, tzinfo=UTC)
WATCH = """
[watch]
daily = ["missing_profiles"]
weekly = ["version_stamps", "conversion"]
monthly = []

[notify]
webhook_url_env = "GATEFILL_TEST_WEBHOOK"
console_url = "http://console.test:8765"
backoff = 0.05
"""


@pytest.fixture
def bench(tmp_path: Path, target: Target, seeder: Seeder) -> Bench:
    seeder(target, "staging-2025-09-17")
    bench = Bench.make(tmp_path, target)
    config = bench.work / "gatefill.toml"
    config.write_text(config.read_text(encoding="utf-8") + WATCH, encoding="utf-8")
    return bench


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    r = Receiver()
    monkeypatch.setenv("GATEFILL_TEST_WEBHOOK", r.url)
    yield r
    r.close()


def _verdicts(result: WatchResult) -> dict[str, dict[str, str]]:
    return {r.set_name: {c.name: c.verdict for c in r.checks} for r in result.ran}


def _stored(target: Target) -> list[ledger.WatchRecord]:
    with Database(target.env) as db, db.connect() as conn:
        return ledger.watch_history(conn, "staging")


def test_watch_once_records_what_the_console_shows_and_runs_only_what_is_due(
    bench: Bench, target: Target, receiver: Receiver
) -> None:
    settings = load_settings(bench.work / "gatefill.toml", environ=bench.env)
    clock = SimulatedClock(T1)
    first = commands.watch(settings, "staging", once=True, clock=clock)
    assert first.last is not None
    weekly = _verdicts(first.last)["weekly"]
    assert _verdicts(first.last)["daily"] == {"missing_profiles": "FAIL"} and list(weekly) == [
        "version_stamps",
        "conversion",
    ]
    assert first.exit_code == 1 and first.last.changes == () and not receiver.bodies  # nothing recorded before
    daily = first.last.ran[0]
    assert (daily.window_start, daily.window_end) == (datetime(2025, 9, 16, 9, 0, tzinfo=UTC), T1)
    assert first.last.ran[1].window_start == datetime(2025, 9, 10, 9, 0, tzinfo=UTC)
    assert len(_stored(target)) == 3

    again = commands.watch(settings, "staging", once=True, clock=clock)
    assert again.last is not None and again.last.ran == () and again.exit_code == 0  # nothing due
    assert len(_stored(target)) == 3

    clock.advance(86400)  # a day later: the daily set is due again, the weekly one is not
    later = commands.watch(settings, "staging", once=True, clock=clock)
    assert later.last is not None and _verdicts(later.last) == {"daily": {"missing_profiles": "INCONCLUSIVE"}}
    assert later.last.changes == (WatchChange("daily", "missing_profiles", "FAIL", "INCONCLUSIVE"),)
    assert later.exit_code == 0
    assert len(receiver.bodies) == 1  # one webhook: the one verdict that changed
    text = receiver.bodies[0]["text"].splitlines()
    assert text[0] == "staging: missing_profiles (daily watch) went from FAIL to INCONCLUSIVE"
    assert text[-1] == "http://console.test:8765/env/staging/watch"
    stored = _stored(target)
    assert [(r.set_name, r.check_name, r.verdict) for r in stored if r.check_name == "missing_profiles"] == [
        ("daily", "missing_profiles", "FAIL"),
        ("daily", "missing_profiles", "INCONCLUSIVE"),
    ]
    assert stored[0].evidence["missing"] == 2

    with bench.console(envs=("staging",)) as url, httpx.Client(base_url=url, timeout=30) as http:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        page = http.get("/env/staging/watch", headers=headers)
        everything = http.get("/watch", headers=headers)
        assert http.get("/", headers=headers).text.count('href="/watch"') == 1  # in the nav
    assert page.status_code == 200 and everything.status_code == 200
    trend = page.text[page.text.index('data-check="daily/missing_profiles"') :].split("</tr>")[0]
    assert re.findall(r'class="verdict v-\w+">(\w+)<', trend) == ["INCONCLUSIVE", "FAIL", "INCONCLUSIVE"]
    assert "(1 change)" in trend and "0 of 0 completed sessions have no profile" in trend
    assert 'data-check="weekly/version_stamps"' in page.text and 'data-check="weekly/conversion"' in page.text
    assert 'data-check="daily/missing_profiles"' in everything.text
    assert not any(secret in page.text for secret in SECRETS)


def test_the_loop_sleeps_until_the_next_set_is_due(bench: Bench, target: Target) -> None:
    settings = load_settings(bench.work / "gatefill.toml", environ=bench.env)
    clock = SimulatedClock(T1)
    seen: list[WatchResult] = []
    halt = threading.Event()

    def collect(result: WatchResult) -> None:
        seen.append(result)
        if len(seen) == 3:
            halt.set()

    watched = commands.watch(settings, "staging", once=False, clock=clock, on_result=collect, stop=halt)
    assert [[r.set_name for r in s.ran] for s in seen] == [["daily", "weekly"], ["daily"], ["daily"]]
    assert [s.taken_at for s in seen] == [
        T1,
        datetime(2025, 9, 18, 9, tzinfo=UTC),
        datetime(2025, 9, 19, 9, tzinfo=UTC),
    ]
    assert watched.exit_code == 0 and watched.stopped_by == "a stop request"
    assert len(_stored(target)) == 5


def test_the_cli_runs_once_and_the_foreground_loop_stops_on_sigterm(bench: Bench) -> None:
    once = bench.cli("watch", "--env", "staging", "--once", "--set", "daily")
    assert re.search(r"daily .* missing_profiles .* INCONCLUSIVE", once.stdout)  # today: no new session
    assert "weekly" not in once.stdout.split("next due:")[0]
    assert bench.cli("watch", "--env", "staging", "--once", "--set", "daily").stdout.startswith("staging at ")
    proc = bench.start("watch", "--env", "staging", stdout=subprocess.PIPE)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("next due:"):
            break
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(15)
    rest = proc.stdout.read()
    assert code == 0 and "watch stopped (SIGTERM)" in rest, (code, rest)
    stop(proc)


@pytest.mark.parametrize(
    ("config", "argv", "message"),
    [
        (
            '\n[watch]\ndaily = ["missing_profiles", "no_such_check"]\n',
            (),
            "watch.daily: unknown check(s) no_such_check",
        ),
        ('\n[watch]\nhourly = ["health"]\n', (), "unknown watch set 'hourly'"),
        ("", ("--set", "hourly"), "--set hourly: unknown set (use daily, weekly, monthly)"),
    ],
)
def test_a_bad_watch_configuration_is_one_line_exit_2_and_records_nothing(
    tmp_path: Path, target: Target, seeder: Seeder, config: str, argv: tuple[str, ...], message: str
) -> None:
    seeder(target, "staging-2025-09-17")
    bench = Bench.make(tmp_path, target)
    toml = bench.work / "gatefill.toml"
    toml.write_text(toml.read_text(encoding="utf-8") + config, encoding="utf-8")
    failed = bench.cli("watch", "--env", "staging", "--once", *argv, check=2)
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("error: ") and message in failed.stderr
    with Database(target.env) as db, db.connect() as conn:
        if sa.inspect(conn).has_table(ledger.watch_results.name):
            assert conn.execute(sa.select(sa.func.count()).select_from(ledger.watch_results)).scalar_one() == 0
