"""apply's and soak's metrics export: the node_exporter textfile (written atomically during and after real applies
on SQLite and Postgres, read back with prometheus_client's parser and compared with the ledger) and Debian's real
Pushgateway (the pushed series and their grouping key read back from its ``GET /metrics``; one that does not answer
never fails or slows the apply and is logged once, without the URL's credentials)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from gatefill import commands, ledger
from gatefill.apply import ApplyOptions
from gatefill.cli import main
from gatefill.config import MetricsSettings, Settings, load_settings
from gatefill.errors import ConfigError
from gatefill.job import Measurement
from gatefill.prometheus import Series, parse_series
from gatefill.soak import SoakOptions
from tests.conftest import Seeder, Target
from tests.console_server import Bench

PUSHGATEWAY = Path("/usr/bin/prometheus-pushgateway")
CREDENTIALS = "pushuser:pw-PUSH-31337"


@pytest.fixture
def bench(tmp_path: Path, target: Target, seeder: Seeder) -> Bench:
    seeder(target, "staging-2025-09-17")
    return Bench.make(tmp_path, target)


def _settings(bench: Bench, **metrics: float) -> Settings:
    settings = load_settings(bench.work / "gatefill.toml", environ=bench.env)
    return replace(settings, metrics=replace(settings.metrics, **metrics)) if metrics else settings


def _apply(bench: Bench, run_id: str, settings: Settings, **kw: object) -> commands.Applied:
    options = ApplyOptions(rate="unlimited", batch_size=5, approve_as="ana", health=False)
    return commands.apply(settings, run_id, env_name=None, options=options, override=None, **kw)  # type: ignore[arg-type]


def _value(series: Series, name: str, **labels: str) -> float:
    found = series.select(name, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0][1]


def _ledger_counts(target: Target, run_id: str) -> tuple[dict[str, int], int, int]:
    """The run's sessions by result, its committed batches, and every session result of the environment."""
    with target.db.connect() as conn:
        results = dict(ledger.result_counts(conn, run_id))
        b, s = ledger.batches, ledger.session_results
        batches = conn.execute(sa.select(sa.func.count()).where(b.c.run_id == run_id)).scalar_one()
        sessions = conn.execute(sa.select(sa.func.count()).select_from(s)).scalar_one()
    return results, int(batches), int(sessions)


def _check_against_ledger(series: Series, target: Target, run_id: str) -> None:
    results, batches, sessions = _ledger_counts(target, run_id)
    done = {labels["result"]: value for labels, value in series.select("gatefill_apply_sessions_done", run=run_id)}
    assert done == results
    assert _value(series, "gatefill_apply_batches_committed", run=run_id) == batches
    assert sum(v for _, v in series.select("gatefill_sessions", env="staging")) == sessions
    assert _value(series, "gatefill_ledger_up", env="staging") == 1


def test_textfile_follows_every_batch_and_is_never_seen_half_written(bench: Bench, target: Target) -> None:
    run_id = bench.plan("--rate", "unlimited")
    path = bench.work / "gatefill.prom"
    seen: list[int] = []
    reads: list[str] = []
    stop = threading.Event()

    def after_batch(done: int, total: int, elapsed: float) -> None:
        # The export runs before the progress callback: the file says what the ledger says now.
        series = parse_series(path.read_text(encoding="utf-8"))
        _check_against_ledger(series, target, run_id)
        assert _value(series, "gatefill_run_status", run=run_id, phase="apply", status="running") == 1
        seen.append(done)

    def reader() -> None:  # node_exporter's view: read the file over and over while it is being replaced
        while not stop.is_set():
            if path.exists():
                reads.append(path.read_text(encoding="utf-8"))

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        applied = _apply(bench, run_id, _settings(bench, interval=0.0), progress=after_batch, metrics_file=path)
    finally:
        stop.set()
        watcher.join()
    assert applied.exit_code == 0 and seen[-1] == 39 and len(seen) == 8
    final = parse_series(path.read_text(encoding="utf-8"))
    _check_against_ledger(final, target, run_id)
    assert _value(final, "gatefill_run_status", run=run_id, phase="apply", status="succeeded") == 1
    assert _value(final, "gatefill_apply_sessions_planned", run=run_id) == 39
    assert _value(final, "gatefill_apply_last_batch_sessions", run=run_id) == 4  # 39 = 7 x 5 + 4
    assert _value(final, "gatefill_batch_duration_seconds_count") == 8
    assert _value(final, "gatefill_runs", env="staging", phase="apply", status="succeeded") == 1
    assert len(reads) > 20
    for text in reads:  # every read is a whole exposition: it parses and ends with the last family
        assert text.endswith("\n") and "gatefill_apply_throttle_stopped{" in text, text[-200:]
        assert parse_series(text).select("gatefill_ledger_up")
    assert sorted(p.name for p in path.parent.glob("*.prom*")) == ["gatefill.prom"]  # no temporary file left
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # readable by node_exporter


def test_textfile_at_most_once_a_second_then_once_at_the_end(bench: Bench, target: Target) -> None:
    run_id = bench.plan("--rate", "unlimited")
    path = bench.work / "node" / "gatefill.prom"
    path.parent.mkdir()
    writes: list[float] = []
    original = os.replace

    def counting_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == path:
            writes.append(time.monotonic())
        original(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", counting_replace)
        applied = _apply(bench, run_id, _settings(bench, interval=3600.0), metrics_file=path)
    assert applied.exit_code == 0
    assert len(writes) == 2  # when the run started, and at its end: every batch in between was within the hour
    _check_against_ledger(parse_series(path.read_text(encoding="utf-8")), target, run_id)


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--metrics-file", "metrics.txt", "the file name must end in .prom"),
        ("--metrics-file", "missing/dir/gatefill.prom", "does not exist"),
        ("--metrics-file", "adir.prom", "is a directory"),
        ("--pushgateway", "ftp://127.0.0.1:9091", "not an http(s) URL"),
        ("--pushgateway", "not a url", "not an http(s) URL"),
        ("--pushgateway", f"http://{CREDENTIALS}@127.0.0.1:port", "not an http(s) URL with a host: ***"),
        ("--pushgateway", f"ftp://{CREDENTIALS}@127.0.0.1:9091", "URL with a host: ftp://127.0.0.1:9091"),
    ],
)
def test_bad_metrics_targets_are_refused_before_anything_is_written(
    bench: Bench,
    target: Target,
    flag: str,
    value: str,
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_id = bench.plan("--rate", "unlimited")
    (bench.work / "adir.prom").mkdir()
    monkeypatch.chdir(bench.work)
    for key, setting in bench.env.items():
        monkeypatch.setenv(key, setting)
    before = sorted(p.relative_to(bench.work) for p in bench.work.rglob("*"))
    for argv in (
        ["apply", run_id, "--approve-as", "ana", flag, value],
        ["soak", "--env", "staging", "--after", run_id, "--clock", "simulated", "--duration", "1h", flag, value],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
        assert "pw-PUSH" not in err
    assert sorted(p.relative_to(bench.work) for p in bench.work.rglob("*")) == before
    with target.db.connect() as conn:
        assert ledger.get_run(conn, run_id).status is ledger.RunStatus.PLANNED
        assert [r.id for r in ledger.list_runs(conn, phase="soak")] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """Debian's Pushgateway on a free port, with no persistence; yields its base URL."""
    assert PUSHGATEWAY.is_file(), "prometheus-pushgateway is not installed (make pushgateway)"
    port = _free_port()
    log = tmp_path / "pushgateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(PUSHGATEWAY), f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_pushgateway_gets_the_runs_series_under_its_grouping_key(
    bench: Bench, target: Target, pushgateway: str, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = bench.plan("--rate", "unlimited")
    other = bench.plan("--rate", "unlimited")  # another run's series stay out of this run's group
    with_credentials = pushgateway.replace("http://", f"http://{CREDENTIALS}@")
    applied = _apply(bench, run_id, _settings(bench, interval=0.0), pushgateway=with_credentials)
    assert applied.exit_code == 0
    series = parse_series(httpx.get(f"{pushgateway}/metrics", timeout=10).text)
    group = {"job": "gatefill", "env": "staging", "run": run_id}
    _check_against_ledger_pushed(series, target, run_id, group)
    assert _value(series, "gatefill_run_status", **group, phase="apply", status="succeeded") == 1
    assert _value(series, "push_failure_time_seconds", **group) == 0
    assert _value(series, "push_time_seconds", **group) > 0
    assert not series.select("gatefill_run_status", run=other)
    assert not caplog.records


def _check_against_ledger_pushed(series: Series, target: Target, run_id: str, group: dict[str, str]) -> None:
    results, batches, _ = _ledger_counts(target, run_id)
    done = {labels["result"]: value for labels, value in series.select("gatefill_apply_sessions_done", **group)}
    assert done == results and sum(done.values()) == 39
    assert _value(series, "gatefill_apply_batches_committed", **group) == batches
    assert _value(series, "gatefill_apply_sessions_planned", **group) == 39
    assert _value(series, "gatefill_ledger_up", **group) == 1


def test_soak_exports_each_look_to_the_textfile_and_the_pushgateway(
    bench: Bench, target: Target, pushgateway: str
) -> None:
    applied = bench.plan("--rate", "unlimited")
    bench.cli("apply", applied, "--approve-as", "ana")
    path = bench.work / "soak.prom"
    looks: list[float] = []
    options = SoakOptions(duration=3600.0, interval=1800.0, after=applied, chart=False)

    def on_look(m: Measurement) -> None:
        looks.append(_value(parse_series(path.read_text(encoding="utf-8")), "gatefill_soak_looks"))

    result = commands.soak(
        _settings(bench),
        options,
        env_name="staging",
        clock="simulated",
        latency_p95_ms=1000.0,
        on_look=on_look,
        metrics_file=path,
        pushgateway=pushgateway,
    )
    with target.db.connect() as conn:
        stored = ledger.measurements_for(conn, result.run_id)
    assert looks == [float(n) for n in range(1, len(stored) + 1)] and len(stored) >= 2
    final = parse_series(path.read_text(encoding="utf-8"))
    pushed = parse_series(httpx.get(f"{pushgateway}/metrics", timeout=10).text)
    group = {"job": "gatefill", "env": "staging", "run": result.run_id}
    for series, labels in ((final, {"run": result.run_id}), (pushed, group)):
        assert _value(series, "gatefill_soak_looks", **labels) == len(stored)
        assert _value(series, "gatefill_soak_verdict", **labels, verdict=stored[-1].verdict) == 1
        assert _value(series, "gatefill_run_status", **labels, phase="soak", status=result.status.value) == 1
        checks = series.select("gatefill_soak_check", **labels)
        assert {(c["check"], c["verdict"]) for c, _ in checks} == {(c.name, c.verdict) for c in stored[-1].checks}


def test_an_unreachable_pushgateway_never_fails_the_apply_and_is_logged_once_without_credentials(
    bench: Bench, target: Target
) -> None:
    refused = f"http://{CREDENTIALS}@127.0.0.1:{_free_port()}"
    run_id = bench.plan("--rate", "unlimited", "--batch-size", "2")
    argv = ("apply", run_id, "--approve-as", "ana", "--no-health", "--pushgateway", refused)
    proc = bench.cli(*argv, "--metrics-file", "gatefill.prom")
    assert "backfill gate: PASS" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "metrics push" in line]
    assert len(lines) == 1, proc.stderr  # 20 batches and the start and the end: one line
    assert lines[0].startswith("metrics push to http://127.0.0.1:") and "ConnectError" in lines[0]
    written = [p.read_text(errors="replace") for p in bench.work.rglob("*") if p.is_file() and p.suffix != ".db"]
    for text in [proc.stdout, proc.stderr, *written]:
        assert "pw-PUSH" not in text and "pushuser" not in text
    results, _, _ = _ledger_counts(target, run_id)
    assert results == {"written": 39}
    assert _value(parse_series((bench.work / "gatefill.prom").read_text()), "gatefill_apply_sessions_done") == 39


def test_a_silent_pushgateway_never_slows_the_batches(
    bench: Bench, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """A Pushgateway that accepts connections and never answers: every push waits out its timeout on the push
    thread, none on the batch path (eight batches would take at least 8 x 5 s if they waited)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://{CREDENTIALS}@127.0.0.1:{silent.getsockname()[1]}"
        run_id = bench.plan("--rate", "unlimited")
        settings = _settings(bench, interval=0.0, push_timeout=5.0)
        with caplog.at_level(logging.WARNING, logger="gatefill.metrics"):
            applied = _apply(bench, run_id, settings, pushgateway=url)
    assert applied.exit_code == 0 and applied.result.batches_committed == 8
    assert applied.result.elapsed_seconds < 5.0
    messages = [r.getMessage() for r in caplog.records]
    assert "ReadTimeout" in messages[0] and len(set(messages)) == len(messages), messages  # once per kind
    assert not any("pw-PUSH" in m or "pushuser" in m for m in messages)


def test_metrics_section_of_gatefill_toml(tmp_path: Path) -> None:
    config = tmp_path / "gatefill.toml"
    config.write_text('[metrics]\npushgateway_url_env = "PUSH_URL"\npushgateway_url = "http://pg:9091"\n')
    assert load_settings(config, environ={}).metrics.pushgateway_url == "http://pg:9091"
    secret = f"http://{CREDENTIALS}@pg:9091"
    settings = load_settings(config, environ={"PUSH_URL": secret})
    assert settings.metrics.pushgateway_url == secret
    assert "pw-PUSH" not in repr(settings) and "pw-PUSH" not in repr(settings.metrics)
    assert load_settings(None, environ={}).metrics == MetricsSettings()
    config.write_text(f'[metrics]\npushgateway_url = "{secret}"\n')
    with pytest.raises(ConfigError, match="holds a password") as refused:
        load_settings(config, environ={})
    assert "pw-PUSH" not in str(refused.value)
    config.write_text('[metrics]\npushgateway = "http://pg:9091"\n')
    with pytest.raises(ConfigError, match=r"unknown \[metrics\] key"):
        load_settings(config, environ={})


def test_a_textfile_that_cannot_be_written_mid_run_is_logged_once_and_the_apply_goes_on(
    bench: Bench, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = bench.plan("--rate", "unlimited")
    folder = bench.work / "textfiles"
    folder.mkdir()
    path = folder / "gatefill.prom"

    def after_batch(done: int, total: int, elapsed: float) -> None:
        if folder.exists():  # node_exporter's directory goes away under the run
            path.unlink()
            folder.rmdir()

    with caplog.at_level(logging.WARNING, logger="gatefill.metrics"):
        applied = _apply(bench, run_id, _settings(bench, interval=0.0), progress=after_batch, metrics_file=path)
    assert applied.exit_code == 0 and applied.result.batches_committed == 8
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"metrics file {path} not written: No such file or directory"]
    assert _ledger_counts(target, run_id)[0] == {"written": 39}
