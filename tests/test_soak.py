"""The staging soak end to end: simulated traffic (the ground truth) against a live functions server, soaked with a
simulated clock on SQLite and Postgres; verdicts, counts, restarts, probes and artifacts.

One functions server and one database per dialect serve the whole module; each test soaks a window of its own
(``_window(n)``: windows 60 days apart, baselines of 7 days, tokens that live 30 days), so tests never see each
other's sessions, events or probe targets.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gatefill import ledger, stats
from gatefill.cli import main
from gatefill.clock import SimulatedClock
from gatefill.config import Environment, Settings
from gatefill.db import Database
from gatefill.errors import UsageError
from gatefill.gate import find_passing_soak
from gatefill.job import Baseline, Check, Measurement, overall_verdict
from gatefill.ledger import RunStatus
from gatefill.prism.checks.soak import CHECK_NAMES, PrismSoakChecks, PrismSoakSettings
from gatefill.prism.job import PrismJob
from gatefill.prism.platform.server import create_app, serve_in_thread
from gatefill.prism.platform.service import CallContext, PrismService
from gatefill.prism.sandbox.simulator import SimulationReport, simulate
from gatefill.prism.schema import assessment_sessions, fc_scores, profiles
from gatefill.reports.soak import write_soak_artifacts
from gatefill.soak import (
    SoakOptions,
    SoakResult,
    exit_code_for,
    parse_margin,
    parse_min_conversion,
    run_soak,
    soak_job,
    soak_verdict,
)
from tests.conftest import create_pg_database, drop_pg_database, pg_env, sqlite_env

SERVICE_KEY = "sk-test-soak-51d0f3f2c6a94e0c9a4be1f7"
KEY_ENV = "GATEFILL_TEST_SOAK_SERVICE_ROLE_KEY"
BASE = datetime(2024, 1, 1, tzinfo=UTC)
HOUR = 3600.0
# 3 hours in 12 looks of 15 minutes; traffic runs in the first hour, so every session is judged by the last look.
# Charts only where a test looks at them: drawing one costs about half a second.
OPTIONS = SoakOptions(duration=3 * HOUR, interval=900.0, baseline_days=7.0, chart=False)


def _window(n: int) -> datetime:
    return BASE + timedelta(days=60 * n)


@dataclass
class Soaked:
    """A live server on a module database, and helpers to make traffic and soak it."""

    dialect: str
    env: Environment
    db: Database
    url: str
    artifacts: Path

    def traffic(self, start: datetime, sessions: int, **kwargs: Any) -> SimulationReport:
        kwargs.setdefault("abandon_rate", 0.0)
        kwargs.setdefault("duration", "1h")
        return simulate(
            self.db,
            f"{self.url}/functions/v1",
            sessions=sessions,
            clock=SimulatedClock(start),
            service_role_key=SERVICE_KEY,
            **kwargs,
        )

    def baseline(self, start: datetime, *, started: int, completed: int, profiled: int) -> None:
        """Sessions of the week before ``start`` (direct rows: only their funnel matters)."""
        rows, prof = [], []
        for i in range(started):
            at = start - timedelta(days=6) + timedelta(minutes=20 * i)
            sid = f"00000000-0000-4000-8000-{start.strftime('%y%m%d')}{i:06d}"
            done = i < completed
            rows.append(
                {
                    "id": sid,
                    "started_at": at,
                    "created_at": at,
                    "updated_at": at,
                    "status": "completed" if done else "in_progress",
                    "completed_at": at + timedelta(minutes=15) if done else None,
                    "finalized_at": at + timedelta(minutes=15) if done else None,
                    "share_token": f"baseline-token-{sid}",
                }
            )
            if i < profiled:
                stamp = at + timedelta(minutes=15)
                prof.append({"session_id": sid, "results_version": "v1.2.1", "created_at": stamp, "updated_at": stamp})
        with self.db.begin() as conn:
            conn.execute(assessment_sessions.insert(), rows)
            if prof:
                conn.execute(profiles.insert(), prof)

    def soak(self, options: SoakOptions, *, clock_start: datetime | None = None, **kwargs: Any) -> SoakResult:
        settings = kwargs.pop("settings", PrismSoakSettings(service_role_key=SERVICE_KEY))
        env = kwargs.pop("env", self.env)
        with PrismSoakChecks(env, settings) as checks:
            result = run_soak(
                self.db,
                env,
                options=options,
                clock=SimulatedClock(clock_start or options.start),
                checks=checks,
                versions={"fc_version": "v1.2", "fc_kind": "functions", "engine_version": "v1.2.1"},
                **kwargs,
            )
        return write_soak_artifacts(result, self.artifacts)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def soaked(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Soaked]:
    tmp = tmp_path_factory.mktemp("soak")
    pg_name = None
    if request.param == "sqlite":
        path = tmp / "prism.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        base_env = sqlite_env(path)
    else:
        pg_name = create_pg_database(request.getfixturevalue("pg_template"))
        base_env = pg_env(pg_name)
    server_db = Database(replace(base_env, service_role_key_env=KEY_ENV), pool_size=3)
    db = Database(base_env, pool_size=3)
    try:
        # A high rate limit: every test probes from 127.0.0.1 within seconds (429 handling has its own test).
        app = create_app(
            base_env, server_db, allow_fault_injection=True, service_role_key=SERVICE_KEY, rate_limit_per_minute=5000
        )
        with serve_in_thread(app) as url:
            env = replace(base_env, results_url=url, functions_url=f"{url}/functions/v1", service_role_key_env=KEY_ENV)
            yield Soaked(request.param, env, db, url, tmp / "artifacts")
    finally:
        db.dispose()
        server_db.dispose()
        if pg_name:
            drop_pg_database(pg_name)


def _by_name(result: SoakResult) -> dict[str, Any]:
    return {c.name: c for c in result.checks}


def _stored(soaked: Soaked, run_id: str) -> list[int]:
    with soaked.db.connect() as conn:
        m = ledger.measurements
        return [r[0] for r in conn.execute(sa.select(m.c.seq).where(m.c.run_id == run_id).order_by(m.c.seq))]


# ====================================================================================================================


def test_clean_traffic_with_enough_sessions_passes(soaked: Soaked, caplog: pytest.LogCaptureFixture) -> None:
    start = _window(1)
    soaked.baseline(start, started=200, completed=180, profiled=170)
    report = soaked.traffic(start, 50, seed=11)
    assert report.totals()["profiles_expected"] == 50
    # Only the results link configured: the probes GET /results/{id}?t=TOKEN, and httpx logs those URLs at INFO.
    caplog.set_level("INFO", logger="httpx")
    link_only = replace(soaked.env, functions_url=None)
    result = soaked.soak(replace(OPTIONS, start=start, chart=True), env=link_only)
    checks = _by_name(result)
    assert result.verdict == "PASS", {n: (c.verdict, c.summary) for n, c in checks.items()}
    assert result.exit_code == 0 and result.status is RunStatus.SUCCEEDED and result.complete
    assert [c.name for c in result.checks] == list(CHECK_NAMES)
    assert _stored(soaked, result.run_id) == list(range(1, 13))
    funnels = checks["conversion"].evidence["funnels"]
    assert (funnels["completion"]["k"], funnels["completion"]["n"]) == (50, 50)
    assert (funnels["profile"]["k"], funnels["profile"]["n"]) == (50, 50)
    assert checks["conversion"].evidence["baseline"]["completion"] == {"k": 180, "n": 200}
    floor = checks["conversion_floor"]
    assert floor.verdict == "PASS" and (floor.evidence["k"], floor.evidence["n"], floor.evidence["floor"]) == (
        50,
        50,
        0.85,
    )
    assert "the rate is shown to be above the floor 85.0%" in floor.summary
    stamps = checks["version_stamps"].evidence
    assert stamps["fc_scores"] == {"checked": 50, "wrong": 0} and stamps["profiles"] == {"checked": 50, "wrong": 0}
    assert checks["write_failures"].evidence["finalized_judged"] == 50
    gating = checks["token_gating"].evidence
    assert gating["probes"]["failed"] == 0 and all(gating["cases_passed"].values())
    assert gating["endpoint"] == "GET /results/{session_id}?t=TOKEN"
    if soaked.dialect == "postgresql":
        assert {t: v["visible"] for t, v in gating["rls"]["tables"].items()} == {
            "profiles": 0,
            "assessment_sessions": 0,
        }

    # The artifacts: present, saying PASS, and free of every share token and of the service-role key.
    out = soaked.artifacts / result.run_id
    names = {p.name for p in out.iterdir()}
    assert {"staging_observability.md", "staging_soak_gate.md", "soak_measurements.json"} <= names
    assert "staging_observability_chart.png" in names
    gate = (out / "staging_soak_gate.md").read_text()
    assert "## Verdict: **PASS**" in gate and f"gatefill approve {result.run_id} --gate soak" in gate
    with soaked.db.connect() as conn:
        tokens = [t for (t,) in conn.execute(sa.select(assessment_sessions.c.share_token))]
    everything = "".join(p.read_text(errors="replace") for p in out.iterdir() if p.suffix in (".md", ".json"))
    assert SERVICE_KEY not in everything
    assert not [t for t in tokens if t in everything]
    assert "/results/" in caplog.text and "t=***" in caplog.text
    assert not [t for t in tokens if t in caplog.text] and SERVICE_KEY not in caplog.text
    measurements = json.loads((out / "soak_measurements.json").read_text())
    assert [m["seq"] for m in measurements["measurements"]] == list(range(1, 13))

    # The production gate finds this soak once it is approved, and only for the same versions.
    settings = Settings(None, soaked.artifacts, soaked.artifacts, {"staging": replace(soaked.env, name="staging")})
    with soaked.db.connect() as conn:
        run = ledger.get_run(conn, result.run_id)
    assert run.phase == "soak" and (run.summary or {})["verdict"] == "PASS" and run.finished_at is not None
    later = run.finished_at + timedelta(hours=1)
    assert find_passing_soak(settings, run.versions, later)[0] is None
    with soaked.db.begin() as conn:
        ledger.record_approval(conn, run_id=run.id, gate="soak", approved_by="qa", now=later)
    found, _ = find_passing_soak(settings, run.versions, later)
    assert found is not None and found.run_id == run.id
    assert find_passing_soak(settings, {**run.versions, "engine_version": "v9"}, later)[0] is None


def test_the_seeds_twelve_sessions_against_89_2_percent_are_inconclusive(soaked: Soaked) -> None:
    start = _window(2)
    finished = soaked.traffic(start, 11, seed=5)
    left = soaked.traffic(start + timedelta(minutes=5), 1, seed=6, inject={"abandon": 1.0})
    assert finished.totals()["completed_sessions"] == 11 and left.totals()["completed_sessions"] == 0
    result = soaked.soak(replace(OPTIONS, start=start, baseline_rate=0.892))
    conversion = _by_name(result)["conversion"]
    completion = conversion.evidence["funnels"]["completion"]
    assert (completion["k"], completion["n"]) == (11, 12)
    assert completion["verdict"] == "INCONCLUSIVE" and completion["baseline"]["rate"] == 0.892
    assert "too little data" in completion["summary"] and "11 of 12" in completion["summary"]
    assert conversion.verdict == "INCONCLUSIVE"
    # The seed's floor cannot be shown either way on 11 completions: too little data, not a PASS.
    floor = _by_name(result)["conversion_floor"]
    assert (floor.evidence["k"], floor.evidence["n"]) == (11, 11)
    assert floor.verdict == "INCONCLUSIVE" and "too little data" in floor.summary
    assert result.verdict == "INCONCLUSIVE" and result.exit_code == 3


def test_injected_faults_fail_the_checks_with_the_injected_counts(soaked: Soaked) -> None:
    start = _window(3)
    faults = ("engine_version_override", "legacy_fc", "profile_write_fail", "token_bypass")
    report = soaked.traffic(start, 20, seed=179, inject={name: 0.2 for name in faults})
    injected = report.injected_counts
    # Precondition on the seed: every fault occurs, and never two on one session, so each count is exactly one cause.
    assert all(injected[name] > 0 for name in faults), injected
    assert all(len(s.injected) <= 1 for s in report.sessions)
    result = soaked.soak(replace(OPTIONS, start=start))
    checks = _by_name(result)
    assert result.verdict == "FAIL" and result.exit_code == 1
    failed = {n for n, c in checks.items() if c.verdict == "FAIL"}
    assert {"engine_version_override", "legacy_fc", "write_failures", "token_gating", "function_errors"} <= failed
    for name in ("engine_version_override", "legacy_fc", "write_failures", "token_gating"):
        assert name in result.reason
    ev = checks["engine_version_override"].evidence
    assert ev["engine_version_override_events"] == injected["engine_version_override"]
    legacy = checks["legacy_fc"].evidence
    assert legacy["fc_fallback_legacy_events"] == injected["legacy_fc"]
    assert legacy["profiles_without_fc_scores"] == injected["legacy_fc"]
    assert checks["write_failures"].evidence["without_profile"] == injected["profile_write_fail"]
    assert checks["function_errors"].evidence["error_events"] == {
        "profile_write_failed": injected["profile_write_fail"]
    }
    assert checks["function_errors"].evidence["failed_finalizations"] == injected["profile_write_fail"]
    assert checks["token_gating"].evidence["tokenless_served"] == injected["token_bypass"]
    assert report.totals()["results_served_without_token"] == injected["token_bypass"]
    # The summaries name the counts too, so the gate report says what was found.
    assert (
        f"{injected['engine_version_override']} engine_version_override events"
        in checks["engine_version_override"].summary
    )
    assert f"{injected['legacy_fc']} fc_fallback_legacy events" in checks["legacy_fc"].summary
    assert f"{injected['legacy_fc']} profiles written in the window" in checks["legacy_fc"].summary
    assert checks["write_failures"].summary.startswith(f"{injected['profile_write_fail']} of ")
    assert f"{injected['token_bypass']} results requests without a token were served" in checks["token_gating"].summary
    # Version stamps stay right: these faults do not write wrong versions (the original's proxy could not see them).
    assert checks["version_stamps"].verdict == "PASS"


def test_a_restarted_soak_continues_the_same_window_without_double_counting(soaked: Soaked) -> None:
    start = _window(4)
    soaked.baseline(start, started=60, completed=54, profiled=50)
    soaked.traffic(start, 14, seed=8, abandon_rate=0.1)
    options = replace(OPTIONS, start=start, interval=1800.0)  # 6 looks
    stop = threading.Event()

    def stop_after_two(m: Measurement) -> None:
        if m.seq == 2:
            stop.set()

    first = soaked.soak(options, stop=stop, on_look=stop_after_two)
    assert first.status is RunStatus.PAUSED and first.interrupted and first.looks_taken == 2
    assert first.verdict == "INCONCLUSIVE" and "interrupted" in first.reason
    observability = (soaked.artifacts / first.run_id / "staging_observability.md").read_text()
    assert "was interrupted before the end of its window" in observability
    assert "interrupted (a stop request)" in first.reason  # the test's own stop, not a signal
    assert f"--resume {first.run_id}" in (soaked.artifacts / first.run_id / "staging_soak_gate.md").read_text()

    class Crash(Exception):
        pass

    def crash_at_four(m: Measurement) -> None:
        if m.seq == 4:
            raise Crash

    # Started again with the same options: the unfinished run is continued, then "crashes" (stays running).
    with pytest.raises(Crash):
        soaked.soak(options, on_look=crash_at_four)
    with soaked.db.connect() as conn:
        assert ledger.get_run(conn, first.run_id).status is RunStatus.RUNNING
    # Options that differ for the same window are refused rather than spending the error budget twice.
    with pytest.raises(UsageError, match="--resume"):
        soaked.soak(replace(options, margin=0.10))
    last = soaked.soak(replace(SoakOptions(), resume=first.run_id))
    assert last.run_id == first.run_id and last.resumed_at_look == 5
    assert first.window_start == last.window_start == start and last.window_end == start + timedelta(hours=3)
    assert [m.window_end for m in last.measurements] == [start + timedelta(minutes=30 * j) for j in range(1, 7)]
    assert last.status is RunStatus.SUCCEEDED and last.complete
    assert _stored(soaked, first.run_id) == list(range(1, 7))

    # An uninterrupted soak of the same window measures exactly the same counts.
    reference = soaked.soak(options)
    assert reference.run_id != first.run_id

    def counts(result: SoakResult) -> dict[str, Any]:
        c = _by_name(result)
        funnels = c["conversion"].evidence["funnels"]
        return {
            "funnels": {k: (v["k"], v["n"], v["verdict"]) for k, v in funnels.items()},
            "stamps": (c["version_stamps"].evidence["fc_scores"], c["version_stamps"].evidence["profiles"]),
            "finalized": c["write_failures"].evidence["finalized_judged"],
            "finalize_calls": c["function_errors"].evidence["finalize_calls"],
        }

    assert counts(last) == counts(reference)
    assert counts(last)["finalize_calls"] == counts(last)["funnels"]["completion"][0] > 0


def _stored_baselines(soaked: Soaked, run_id: str) -> int:
    with soaked.db.connect() as conn:
        b = ledger.soak_baselines
        return int(conn.execute(sa.select(sa.func.count()).where(b.c.run_id == run_id)).scalar_one())


def test_the_baseline_is_measured_once_before_the_first_look_and_a_resumed_soak_reuses_it(soaked: Soaked) -> None:
    start = _window(10)
    soaked.baseline(start, started=40, completed=36, profiled=30)
    soaked.traffic(start, 4, seed=21)
    options = replace(OPTIONS, start=start, duration=HOUR)  # 4 looks of 15 minutes
    stop = threading.Event()
    measured: list[Baseline] = []

    def stop_after_one(m: Measurement) -> None:
        if m.seq == 1:
            stop.set()

    first = soaked.soak(options, stop=stop, on_look=stop_after_one, on_baseline=measured.append)
    assert first.status is RunStatus.PAUSED and first.looks_taken == 1
    assert len(measured) == 1 and _stored_baselines(soaked, first.run_id) == 1
    baseline = measured[0]
    # Measured at the window's start (settle is 0 on a simulated clock), before the first look's cutoff.
    assert baseline.start == start - timedelta(days=7) and baseline.end == start
    assert baseline.measured_at == start < first.measurements[0].taken_at
    assert baseline.seconds is not None and baseline.seconds > 0
    assert baseline.evidence["completion"] == {"k": 36, "n": 40}
    assert baseline.evidence["profile"] == {"k": 30, "n": 36}
    assert first.baseline == baseline
    with soaked.db.connect() as conn:
        assert ledger.baseline_for(conn, first.run_id) == baseline

    # Late rows stamped inside the baseline window: a re-measurement would see them, the stored baseline does not.
    late = start - timedelta(days=3)
    with soaked.db.begin() as conn:
        conn.execute(
            assessment_sessions.insert(),
            [
                {
                    "id": f"00000000-0000-4000-a000-{i:012d}",
                    "started_at": late,
                    "created_at": late,
                    "updated_at": late,
                    "status": "in_progress",
                    "share_token": f"late-{i}",
                }
                for i in range(5)
            ],
        )
    resumed = soaked.soak(replace(SoakOptions(), resume=first.run_id), on_baseline=measured.append)
    assert resumed.run_id == first.run_id and resumed.complete and resumed.resumed_at_look == 2
    assert len(measured) == 1 and _stored_baselines(soaked, first.run_id) == 1
    assert resumed.baseline == baseline
    for m in resumed.measurements:
        conversion = m.check("conversion")
        assert conversion is not None
        assert conversion.evidence["baseline"]["completion"] == {"k": 36, "n": 40}, m.seq
        assert conversion.evidence["funnels"]["completion"]["baseline"]["n"] == 40
    # A new soak of the same window measures its own baseline, and sees the late rows.
    fresh = soaked.soak(options, on_baseline=measured.append)
    assert fresh.run_id != first.run_id and len(measured) == 2
    assert measured[1].evidence["completion"] == {"k": 36, "n": 45}

    # Reported separately, with its own timing and evidence.
    out = soaked.artifacts / first.run_id
    data = json.loads((out / "soak_measurements.json").read_text())
    assert data["baseline"]["evidence"]["completion"] == {"k": 36, "n": 40}
    assert data["baseline"]["measured_at"] == start.isoformat()
    assert data["baseline"]["seconds"] == round(baseline.seconds, 4)
    assert data["baseline"]["from"] == (start - timedelta(days=7)).isoformat()
    observability = (out / "staging_observability.md").read_text()
    assert "## Baseline (measured once, before the first look)" in observability
    assert f"took {baseline.seconds * 1000:.0f} ms" in observability
    assert "started → completed 36/40 = 90.0%" in observability
    gate = (out / "staging_soak_gate.md").read_text()
    assert f"| baseline | {(start - timedelta(days=7)).isoformat()} → {start.isoformat()}, measured once" in gate


def test_status_of_a_soak_run_shows_its_window_looks_checks_verdict_and_artifacts(
    soaked: Soaked, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = _window(11)
    at = start + timedelta(minutes=5)
    sid = "00000000-0000-4000-b000-000000000001"
    with soaked.db.begin() as conn:
        conn.execute(
            assessment_sessions.insert(),
            [{"id": sid, "started_at": at, "created_at": at, "updated_at": at, "share_token": f"t-{sid}"}],
        )
        conn.execute(
            profiles.insert(), [{"session_id": sid, "results_version": "v0.9", "created_at": at, "updated_at": at}]
        )
    config = tmp_path / "gatefill.toml"
    config.write_text(
        f'artifacts_dir = "{soaked.artifacts}"\n[env.{soaked.env.name}]\ndatabase_url = "{soaked.env.database_url}"\n',
        encoding="utf-8",
    )

    def status(run_id: str) -> str:
        assert main(["--config", str(config), "status", run_id]) == 0
        return capsys.readouterr().out

    during: list[str] = []

    def look_at_status(m: Measurement) -> None:
        if m.seq == 1:
            with soaked.db.connect() as conn:
                (running,) = [r for r in ledger.list_runs(conn, phase="soak") if r.status is RunStatus.RUNNING]
            during.append(status(running.id))

    options = replace(OPTIONS, start=start, duration=1800.0, observe=("latency",))  # 2 looks
    result = soaked.soak(options, on_look=look_at_status)
    assert result.verdict == "FAIL"

    # While the soak ran (after its first look): running, 1 of 2 looks, no artifacts yet.
    (mid,) = during
    assert f"run {result.run_id} (soak) on {soaked.env.name}: running" in mid
    assert f"window: {start.isoformat()} → {(start + timedelta(minutes=30)).isoformat()} (30 min" in mid
    assert "looks: 1 of 2 (last cutoff " + (start + timedelta(minutes=15)).isoformat() in mid
    assert "artifacts: none yet" in mid
    assert "verdict: FAIL (gating check(s) failed: version_stamps)" in mid

    done = status(result.run_id)
    assert f"run {result.run_id} (soak) on {soaked.env.name}: succeeded" in done
    assert "looks: 2 of 2 (last cutoff " + (start + timedelta(minutes=30)).isoformat() in done
    assert "checks at look 2:" in done
    lines = {line.split()[0]: line for line in done.splitlines() if line.startswith("    ")}
    assert set(lines) == set(CHECK_NAMES)
    assert " FAIL: 1 of 1 rows written in the window carry the wrong version" in lines["version_stamps"]
    assert " INCONCLUSIVE (observe): " in lines["latency"]
    assert "(observe)" not in lines["version_stamps"] and "(observe)" not in lines["conversion"]
    assert "verdict: FAIL (gating check(s) failed: version_stamps)" in done
    assert f"baseline: {(start - timedelta(days=7)).isoformat()} → {start.isoformat()}, measured once at" in done
    out = soaked.artifacts / result.run_id
    assert f"artifacts: {out / 'staging_observability.md'}, {out / 'staging_soak_gate.md'}, " in done
    assert "sessions with a result" not in done
    # Another phase's run keeps the apply view.
    ledger.init_ledger(soaked.db)
    with soaked.db.begin() as conn:
        ledger.create_run(
            conn,
            run_id=f"apply-status-{soaked.dialect}",
            phase="apply",
            environment=soaked.env.name,
            job="prism",
            versions={},
            params={},
            now=start,
        )
    applied = status(f"apply-status-{soaked.dialect}")
    assert "sessions with a result: 0 of 0" in applied and "looks:" not in applied


def test_zero_traffic_is_inconclusive_not_pass(soaked: Soaked) -> None:
    start = _window(5)
    result = soaked.soak(replace(OPTIONS, start=start))
    assert result.verdict == "INCONCLUSIVE" and result.exit_code == 3
    assert {c.verdict for c in result.checks} == {"INCONCLUSIVE"}, {c.name: c.summary for c in result.checks}
    # With no endpoint configured the probe checks say so instead of passing.
    bare = replace(soaked.env, results_url=None, functions_url=None)
    result = soaked.soak(replace(OPTIONS, start=start, duration=1800.0), env=bare)
    checks = _by_name(result)
    assert checks["token_gating"].verdict == "INCONCLUSIVE" and checks["latency"].verdict == "INCONCLUSIVE"
    assert "no results endpoint configured" in checks["latency"].summary


def test_after_an_apply_run_the_window_starts_when_it_finished_and_inherits_its_versions(soaked: Soaked) -> None:
    finished = _window(9) + timedelta(minutes=7, seconds=30)
    versions = {"fc_version": "v1.2", "fc_kind": "functions", "engine_version": "v1.2.1", "plan": "p-1"}
    ledger.init_ledger(soaked.db)
    with soaked.db.begin() as conn:
        for run_id, done in (("apply-done", True), ("apply-half", False)):
            ledger.create_run(
                conn,
                run_id=f"{run_id}-{soaked.dialect}",
                phase="apply",
                environment=soaked.env.name,
                job="prism",
                versions=versions,
                params={},
                now=finished - timedelta(hours=1),
            )
            ledger.transition(conn, f"{run_id}-{soaked.dialect}", RunStatus.RUNNING, now=finished - timedelta(hours=1))
            if done:
                ledger.transition(conn, f"{run_id}-{soaked.dialect}", RunStatus.SUCCEEDED, now=finished)
    options = replace(OPTIONS, duration=1800.0, after=f"apply-done-{soaked.dialect}")
    result = soaked.soak(options, clock_start=finished)
    assert result.window_start == finished
    with soaked.db.connect() as conn:
        run = ledger.get_run(conn, result.run_id)
    assert run.parent_run_id == f"apply-done-{soaked.dialect}" and run.versions == versions
    with pytest.raises(UsageError, match="running"):
        soaked.soak(replace(options, after=f"apply-half-{soaked.dialect}"))


def test_wrong_version_stamps_fail_and_observe_only_never_gates(soaked: Soaked) -> None:
    start = _window(6)
    at = start + timedelta(minutes=10)
    ids = [f"00000000-0000-4000-9000-{i:012d}" for i in range(3)]
    with soaked.db.begin() as conn:
        conn.execute(
            assessment_sessions.insert(),
            [
                {"id": sid, "started_at": at, "created_at": at, "updated_at": at, "share_token": f"t-{sid}"}
                for sid in ids
            ],
        )
        conn.execute(
            profiles.insert(),
            [
                {"session_id": ids[0], "results_version": None, "created_at": at, "updated_at": at},
                {"session_id": ids[1], "results_version": "v1.2.1", "created_at": at, "updated_at": at},
            ],
        )
        conn.execute(
            fc_scores.insert(),
            [
                {
                    "session_id": ids[2],
                    "version": "v1.2",
                    "fc_kind": "types",
                    "scores_json": {},
                    "blocks_answered": 1,
                    "created_at": at,
                }
            ],
        )
    options = replace(OPTIONS, start=start, duration=1800.0)
    result = soaked.soak(options)
    stamps = _by_name(result)["version_stamps"]
    assert stamps.verdict == "FAIL" and result.verdict == "FAIL"
    assert stamps.evidence["profiles"] == {"checked": 2, "wrong": 1}
    assert stamps.evidence["fc_scores"] == {"checked": 1, "wrong": 1}
    assert {e["session_id"] for e in stamps.evidence["examples"]} == {ids[0], ids[2]}
    # --fail-fast: the first look already sees the rows, and a FAIL is final, so the soak ends there.
    fast = soaked.soak(replace(options, fail_fast=True))
    assert fast.verdict == "FAIL" and fast.looks_taken == 1 and not fast.complete
    assert fast.status is RunStatus.SUCCEEDED and "ended early at look 1 of 2" in fast.reason
    observed = soaked.soak(replace(options, observe=("version_stamps",)))
    check = _by_name(observed)["version_stamps"]
    assert check.verdict == "FAIL" and not check.gating
    assert observed.verdict == "INCONCLUSIVE"
    assert (
        "version_stamps | FAIL | observe" in (soaked.artifacts / observed.run_id / "staging_soak_gate.md").read_text()
    )


def test_rate_limited_probes_are_inconclusive_not_passed(soaked: Soaked) -> None:
    start = _window(7)
    soaked.traffic(start, 2, seed=3)
    tight = create_app(
        soaked.env, soaked.db, allow_fault_injection=True, service_role_key=SERVICE_KEY, rate_limit_per_minute=3
    )
    with serve_in_thread(tight) as url:
        tight_env = replace(soaked.env, results_url=url, functions_url=f"{url}/functions/v1")
        result = soaked.soak(replace(OPTIONS, start=start, duration=HOUR), env=tight_env)
    gating = _by_name(result)["token_gating"]
    assert gating.evidence["endpoint"] == "POST /functions/v1/get-results-by-session"
    statuses = [p["status"] for p in gating.evidence["this_look"]["probes"]]
    assert 429 in statuses or gating.evidence["probes"]["inconclusive"] > 0
    assert gating.evidence["probes"]["failed"] == 0 and gating.evidence["probes"]["inconclusive"] >= 1
    assert gating.verdict == "INCONCLUSIVE"


def test_the_library_entry_of_the_cli_soaks_with_a_simulated_clock(
    soaked: Soaked, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SERVICE_KEY)
    start = _window(8)
    result = write_soak_artifacts(
        soak_job(soaked.env, PrismJob(), replace(OPTIONS, start=start), clock="simulated"), soaked.artifacts
    )
    assert result.verdict == "INCONCLUSIVE" and result.complete and result.looks_taken == 12
    with soaked.db.connect() as conn:
        run = ledger.get_run(conn, result.run_id)
    assert run.phase == "soak" and run.params["clock"] == "simulated" and run.summary is not None
    assert run.versions == {"fc_version": "v1.2", "fc_kind": "functions", "engine_version": "v1.2.1"}
    assert run.summary["verdict"] == "INCONCLUSIVE"
    production = replace(soaked.env, kind="production")
    with pytest.raises(UsageError, match="production"):
        soak_job(production, PrismJob(), replace(OPTIONS, start=start), clock="simulated")
    assert exit_code_for("PASS") == 0 and exit_code_for("FAIL") == 1 and exit_code_for("INCONCLUSIVE") == 3


# ====================================================================================================================
# The rules, without a database


def test_verdict_rules_fail_is_final_pass_needs_everything_and_the_whole_window() -> None:
    def checks(*verdicts: str, gating: bool = True) -> list[Check]:
        return [Check(f"c{i}", v, "", gating=gating) for i, v in enumerate(verdicts)]

    assert soak_verdict(checks("PASS", "PASS"), complete=True, looks=12, max_looks=12)[0] == "PASS"
    assert soak_verdict(checks("PASS", "PASS"), complete=False, looks=5, max_looks=12)[0] == "INCONCLUSIVE"
    assert soak_verdict(checks("PASS", "FAIL"), complete=False, looks=5, max_looks=12)[0] == "FAIL"
    assert soak_verdict(checks("PASS", "INCONCLUSIVE"), complete=True, looks=12, max_looks=12)[0] == "INCONCLUSIVE"
    observed = [*checks("PASS"), *checks("FAIL", gating=False)]
    assert soak_verdict(observed, complete=True, looks=12, max_looks=12)[0] == "PASS"
    assert soak_verdict(checks("PASS", gating=False), complete=True, looks=1, max_looks=1)[0] == "INCONCLUSIVE"
    # N/A (a check that does not apply here) counts neither as PASS nor as FAIL, and alone it concludes nothing.
    verdict, why = soak_verdict(checks("PASS", "N/A"), complete=True, looks=12, max_looks=12)
    assert verdict == "PASS" and "(c1 N/A here)" in why
    assert soak_verdict(checks("N/A", "N/A"), complete=True, looks=12, max_looks=12)[0] == "INCONCLUSIVE"
    assert soak_verdict(checks("N/A", "FAIL"), complete=True, looks=12, max_looks=12)[0] == "FAIL"
    assert soak_verdict(checks("N/A", "INCONCLUSIVE"), complete=True, looks=12, max_looks=12)[0] == "INCONCLUSIVE"
    assert overall_verdict(["PASS", "N/A"]) == "PASS" and overall_verdict(["N/A"]) == "INCONCLUSIVE"
    assert overall_verdict([]) == "INCONCLUSIVE" and overall_verdict(["N/A", "FAIL", "PASS"]) == "FAIL"


def test_options_margins_and_look_counts() -> None:
    assert SoakOptions(duration=6 * HOUR, interval=300.0).max_looks == 72
    assert SoakOptions(duration=HOUR, interval=25 * 60.0).max_looks == 3  # the last look is cut at the window's end
    assert parse_margin("5pp") == parse_margin("5%") == parse_margin("0.05") == 0.05
    for bad in ("x", "150pp", "-1"):
        with pytest.raises(UsageError):
            parse_margin(bad)
    invalid = [
        SoakOptions(interval=0.0),
        SoakOptions(duration=60.0, interval=120.0),
        SoakOptions(after="apply-1", start=BASE),
        SoakOptions(resume="soak-1", start=BASE),
        SoakOptions(baseline_rate=1.5),
        SoakOptions(baseline_days=0.0),
    ]
    for options in invalid:
        with pytest.raises(UsageError):
            options.validate()


def test_a_call_the_server_answered_504_counts_as_a_failed_function_call(soaked: Soaked) -> None:
    """A finalize that outlived the server's deadline leaves no error row of its own, only the server's
    ``call_timeout`` event: the function_errors check must count it, with its session, as a failed finalization."""
    start = _window(12)
    report = soaked.traffic(start, 6, seed=12)
    assert report.totals()["completed_sessions"] == 6
    service = PrismService(soaked.db, clock=SimulatedClock(start))
    stuck = "00000000-0000-4000-8000-000000000504"
    at = start + timedelta(minutes=30)
    service.record_timeout("finalizeAssessment", stuck, CallContext(now=at, request_id="t504"), 25.0)
    checks = _by_name(soaked.soak(replace(OPTIONS, start=start)))
    errors = checks["function_errors"]
    assert errors.verdict == "FAIL"
    assert errors.evidence["error_events"] == {"call_timeout": 1}
    assert errors.evidence["failed_finalizations"] == 1 and errors.evidence["failed_sessions"] == [stuck]


# ====================================================================================================================
# Issue 14: probes over the whole window, the conversion floor, the chart, production refused


def _probed_spans(result: SoakResult) -> set[int]:
    """The hours of the window (0-based) in which some look sent probes, read from the stored per-look evidence."""
    spans = set()
    for m in result.measurements:
        gating = m.check("token_gating")
        assert gating is not None
        if gating.evidence["this_look"]["probes"]:
            spans.add(int((m.window_end - m.window_start).total_seconds() - 1) // 3600)
    return spans


def test_probes_cover_every_hour_of_a_six_hour_window_within_the_endpoints_rate_limit(soaked: Soaked) -> None:
    """72 looks taken back to back under a simulated clock: the probes are spread so every hour has probed looks
    (a budget of 30 requests per real minute cannot probe them all), and no request is refused by the limit."""
    start = _window(13)
    soaked.baseline(start, started=200, completed=180, profiled=170)
    soaked.traffic(start, 60, seed=13, duration="6h")
    limited = create_app(
        soaked.env, soaked.db, allow_fault_injection=True, service_role_key=SERVICE_KEY, rate_limit_per_minute=60
    )
    with serve_in_thread(limited) as url:
        env = replace(soaked.env, results_url=url, functions_url=f"{url}/functions/v1")
        result = soaked.soak(replace(OPTIONS, start=start, duration=6 * HOUR, interval=300.0), env=env)
    assert result.looks_taken == 72
    assert _probed_spans(result) == set(range(6))
    checks = _by_name(result)
    gating, latency = checks["token_gating"], checks["latency"]
    assert gating.evidence["coverage"]["covered"] == list(range(6)) and gating.evidence["coverage"]["enough"]
    assert latency.evidence["coverage"]["covered"] == list(range(6))
    statuses = [
        p["status"]
        for m in result.measurements
        for p in (m.check("token_gating") or Check("", "", "")).evidence["this_look"]["probes"]
    ]
    assert statuses and 429 not in statuses and None not in statuses
    assert gating.verdict == "PASS" and "6 of 6 hours of the window covered" in gating.summary
    assert f"over {gating.evidence['probes']['looks_probed']} of 72 looks" in gating.summary
    assert latency.verdict == "PASS" and "6 of 6 hours" in latency.summary
    # Looks not probed say why: the hour is covered and the budget is kept for the hours still to come.
    skipped = [
        m.check("token_gating").evidence["this_look"]["skipped"]  # type: ignore[union-attr]
        for m in result.measurements
        if not m.check("token_gating").evidence["this_look"]["probes"]  # type: ignore[union-attr]
    ]
    assert skipped and all("already covered" in s for s in skipped if s and "no completed session" not in s)


def test_probes_covering_less_of_the_window_than_the_minimum_are_inconclusive(soaked: Soaked) -> None:
    """An endpoint that answers only the first probed look and then 429 (its limiter runs on a clock that never
    moves): every case was shown once, in the first hour only, so neither probe check may conclude."""
    start = _window(14)
    # Two sessions finished before the window: the first look already has two to probe, so all four cases.
    soaked.traffic(start - timedelta(hours=2), 2, seed=41)
    soaked.traffic(start, 4, seed=14)
    stingy = create_app(
        soaked.env,
        soaked.db,
        clock=SimulatedClock(start),
        allow_fault_injection=True,
        service_role_key=SERVICE_KEY,
        rate_limit_per_minute=4,
    )
    # The probe budget's minute-long waits pass at once on a simulated clock (the server's limiter never moves).
    settings = PrismSoakSettings(
        service_role_key=SERVICE_KEY, min_latency_samples=3, budget_clock=SimulatedClock(start)
    )
    with serve_in_thread(stingy) as url:
        env = replace(soaked.env, results_url=url, functions_url=f"{url}/functions/v1")
        result = soaked.soak(replace(OPTIONS, start=start), env=env, settings=settings)
    checks = _by_name(result)
    gating, latency = checks["token_gating"], checks["latency"]
    assert all(gating.evidence["cases_passed"].values()) and gating.evidence["probes"]["failed"] == 0
    assert gating.evidence["coverage"]["covered"] == [0] and not gating.evidence["coverage"]["enough"]
    assert gating.verdict == "INCONCLUSIVE"
    assert "do not cover enough of the window: 1 of 3 hours of the window covered" in gating.summary
    assert latency.evidence["samples"] >= 3 and latency.evidence["coverage"]["covered"] == [0]
    assert latency.verdict == "INCONCLUSIVE" and "1 of 3 hours" in latency.summary
    assert result.verdict == "INCONCLUSIVE"


def test_the_conversion_floor_fails_a_rate_shown_below_it_and_is_in_the_gate_report(soaked: Soaked) -> None:
    start = _window(15)
    soaked.baseline(start, started=200, completed=180, profiled=170)
    report = soaked.traffic(start, 60, seed=15, inject={"profile_write_fail": 0.4})
    failed_writes = report.injected_counts["profile_write_fail"]
    result = soaked.soak(replace(OPTIONS, start=start))
    floor = _by_name(result)["conversion_floor"]
    profile = _by_name(result)["conversion"].evidence["funnels"]["profile"]
    assert (floor.evidence["k"], floor.evidence["n"]) == (profile["k"], profile["n"]) == (60 - failed_writes, 60)
    assert floor.evidence["floor"] == 0.85 and floor.evidence["k"] / floor.evidence["n"] < 0.75
    assert floor.verdict == "FAIL" and "the rate is shown to be below the floor 85.0%" in floor.summary
    assert floor.evidence["decided"]["verdict"] == "FAIL"
    # The decision is taken at the look's share of alpha, as the non-inferiority test's are.
    decided_at = floor.evidence["decided"]["look"]
    assert result.measurements[decided_at - 1].check("conversion_floor").evidence["look_alpha"] == pytest.approx(  # type: ignore[union-attr]
        stats.SequentialPlan(12).nominal_alpha(decided_at)
    )
    assert result.verdict == "FAIL" and "conversion_floor" in result.reason
    gate = (soaked.artifacts / result.run_id / "staging_soak_gate.md").read_text()
    assert "| conversion_floor | FAIL | yes |" in gate
    assert "conversion floor 85.0% (exact one-sided binomial test" in gate
    # A lower floor, given as on the command line, is part of the soak's plan and is what the check tests.
    lower = soaked.soak(replace(OPTIONS, start=start, min_conversion=parse_min_conversion("30%")))
    assert _by_name(lower)["conversion_floor"].evidence["floor"] == 0.30
    assert _by_name(lower)["conversion_floor"].verdict == "PASS"


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_the_chart_and_rates_leave_out_sessions_that_had_not_had_time_to_finish(soaked: Soaked) -> None:
    start = _window(16)
    soaked.baseline(start, started=200, completed=180, profiled=170)
    soaked.traffic(start, 45, seed=16, duration="3h")
    result = soaked.soak(replace(OPTIONS, start=start, chart=True))
    out = soaked.artifacts / result.run_id
    with PrismSoakChecks(soaked.env, PrismSoakSettings()) as checks:
        buckets = checks.series(soaked.db, start, result.window_end, HOUR)
        guides = checks.chart_guides(result.measurements, result.window_end)
    # Hourly buckets; sessions started in the last hour had less than the hour of grace: pending, not failures.
    assert [b.rates["completion"][1] for b in buckets][2] == 0 and buckets[2].pending["completion"] > 0
    assert all(b.rates["completion"][1] > 0 for b in buckets[:2])
    judged = _by_name(result)["conversion"].evidence["funnels"]["completion"]["n"]
    assert sum(b.rates["completion"][1] for b in buckets) == judged
    assert guides.pending_after["completion"] == result.window_end - timedelta(hours=1)
    funnels = _by_name(result)["conversion"].evidence["funnels"]
    lines = {(line.series, line.style): line.value for line in guides.lines}
    assert lines[("completion", "baseline")] == pytest.approx(0.9)
    assert lines[("completion", "threshold")] == pytest.approx(funnels["completion"]["threshold"])
    assert lines[("profile", "threshold")] == pytest.approx(0.944444 - 0.05, abs=1e-5)
    assert lines[("profile", "floor")] == 0.85
    observability = (out / "staging_observability.md").read_text()
    assert f"none judged yet ({buckets[2].pending['completion']} pending)" in observability
    assert "had not had time to finish: they are left out of the rates" in observability
    # No error events: the chart is the rates panel and a sentence, not an empty second panel.
    width, height = _png_size(out / "staging_observability_chart.png")
    assert (width, height) == (810, 360)


def test_a_soak_of_a_production_environment_is_refused_unless_allowed(
    sqlite_template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "production.db"
    shutil.copyfile(sqlite_template, db_path)
    config = tmp_path / "gatefill.toml"
    config.write_text(
        f'[env.production]\ndatabase_url = "sqlite:///{db_path}"\nkind = "production"\n', encoding="utf-8"
    )

    def tables() -> set[str]:
        with Database(sqlite_env(db_path)) as db, db.connect() as conn:
            return {t for t in sa.inspect(conn).get_table_names() if t.startswith("gatefill_")}

    argv = ["--config", str(config), "soak", "--env", "production", "--from", "2024-01-01T00:00:00Z"]
    argv += ["--duration", "10m", "--interval", "5m", "--no-chart"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: environment 'production' is production") and "--allow-production" in err
    assert "\n" not in err and tables() == set()
    assert main([*argv, "--allow-production"]) == 3  # allowed: it runs (no traffic there, so INCONCLUSIVE)
    assert "gatefill_runs" in tables()
    assert main(["soak", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "Watch staging" not in help_text and "--allow-production" in help_text
