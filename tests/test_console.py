"""The operator console over plain HTTP (httpx) against a real ``gatefill ui`` process, with real runs made by the
CLI on SQLite and Postgres: every page renders them, writes obey the token and the CSRF token, and no secret is ever
rendered."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Seeder, Target
from tests.console_server import SECRETS, TOKEN, Bench

BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None, "no form with a CSRF token on the page"
    return found.group(1)


@pytest.fixture
def bench(tmp_path: Path, target: Target, seeder: Seeder) -> Bench:
    seeder(target, "staging-2025-09-17")
    return Bench.make(tmp_path, target)


def test_every_page_renders_real_runs_and_no_secret(bench: Bench) -> None:
    planned = bench.plan("--rate", "unlimited")
    applied = bench.plan("--rate", "unlimited")
    bench.cli("apply", applied, "--approve-as", "ana")
    with bench.console() as url, httpx.Client(base_url=url, headers=BEARER, timeout=30) as http:
        pages = {}
        for path in (
            "/",
            "/?phase=apply&status=planned",
            "/?env=prod",
            "/gates",
            "/pipeline",
            f"/env/staging/runs/{planned}",
            f"/env/staging/runs/{planned}/plan",
            f"/env/staging/runs/{applied}",
            f"/env/staging/runs/{applied}/files/backfill_summary.md",
            f"/env/staging/runs/{applied}/files/backfill_logs/execution_results.json",
            "/login",
        ):
            answer = http.get(path, follow_redirects=True)
            assert answer.status_code == 200, (path, answer.text[:500])
            pages[path] = answer.text
        assert http.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        metrics = _samples(http.get("/metrics").text)
        for path, text in pages.items():
            for secret in SECRETS:
                assert secret not in text, (path, "shows a secret")
    runs = pages["/"]
    assert planned in runs and applied in runs and "succeeded" in runs and "ana" in runs
    assert planned in pages["/?phase=apply&status=planned"] and applied not in pages["/?phase=apply&status=planned"]
    assert "No runs match these filters" in pages["/?env=prod"]  # the unreachable production is left out
    assert "Approve plan" in pages[f"/env/staging/runs/{planned}/plan"]
    assert re.search(r"plan hash <code class=\"hash\">[0-9a-f]{64}</code>", pages[f"/env/staging/runs/{planned}/plan"])
    run_page = pages[f"/env/staging/runs/{applied}"]
    assert '39</strong> of <span data-field="total">39</span> sessions' in run_page
    assert "backfill_summary.md" in run_page and "batches committed" in run_page
    # The pacer's first look lists every indicator it watched (N/A on SQLite, read on Postgres).
    section = run_page[run_page.index("Holds and throttle decisions") :][:3000]
    assert "Indicators watched: " in section and "replay_lag " in section, section
    assert "<td>size</td><td>batch_time</td>" in section  # batches sized to the target batch time
    planned_page = pages[f"/env/staging/runs/{planned}/plan"]
    assert "39 candidates to process in" in planned_page and "<td>priority</td>" not in planned_page
    assert "<table>" in pages[f"/env/staging/runs/{applied}/files/backfill_summary.md"]  # Markdown rendered
    assert '"run_id"' in pages[f"/env/staging/runs/{applied}/files/backfill_logs/execution_results.json"]
    gates = pages["/gates"]
    assert applied in gates and "ana" in gates and "plan" in gates
    assert metrics[("gatefill_runs", (("env", "staging"), ("phase", "apply"), ("status", "succeeded")))] == 1
    assert metrics[("gatefill_runs", (("env", "staging"), ("phase", "apply"), ("status", "planned")))] == 1
    assert metrics[("gatefill_sessions", (("env", "staging"), ("result", "written")))] == 39
    batches = run_page.count("<td>committed</td>")
    assert batches >= 8 and metrics[("gatefill_batch_duration_seconds_count", ())] == batches
    assert metrics[("gatefill_ledger_up", (("env", "staging"),))] == 1
    assert metrics[("gatefill_ledger_up", (("env", "prod"),))] == 0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_writes_need_the_token_and_a_valid_csrf_token(bench: Bench) -> None:
    run_id = bench.plan()
    approve = f"/env/staging/runs/{run_id}/approve"
    form = {"gate": "plan", "by": "mallory"}
    with bench.console() as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/").status_code == 401  # a script without the token reads nothing either
        assert http.get("/", headers={"Accept": "text/html"}).headers["location"].startswith("/login")
        assert http.post(approve, data=form).status_code == 401
        csrf = _csrf(http.get(f"/env/staging/runs/{run_id}/plan", headers=BEARER).text)
        assert http.post(approve, data=form, headers=BEARER).status_code == 403  # no CSRF token
        assert http.post(approve, data={**form, "csrf": "0" * 64}, headers=BEARER).status_code == 403
        assert http.post(approve, data={**form, "csrf": csrf}).status_code == 401  # a CSRF token is not the token
        login = http.get("/login")
        wrong = http.post("/login", data={"csrf": _csrf(login.text), "token": "guess", "next": "/"})
        assert wrong.status_code == 401 and "not the operator token" in wrong.text
        assert "gatefill_session" not in http.cookies
    assert "no approvals or overrides recorded" in bench.cli("gates").stdout

    with bench.console() as url, httpx.Client(base_url=url, timeout=30) as http:
        login = http.get("/login")
        assert http.post("/login", data={"token": TOKEN, "next": "/"}).status_code == 403  # login form's CSRF
        signed = http.post("/login", data={"csrf": _csrf(login.text), "token": TOKEN, "next": "/gates"})
        assert signed.status_code == 303 and signed.headers["location"] == "/gates"
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and TOKEN.lower() not in cookie
        csrf = _csrf(http.get(f"/env/staging/runs/{run_id}/plan").text)
        assert http.post(approve, data={"gate": "plan", "by": "bo"}).status_code == 403
        done = http.post(approve, data={"gate": "plan", "by": "bo", "note": "looks right", "csrf": csrf})
        assert done.status_code == 303
        assert "Approved the plan gate" in http.get(done.headers["location"]).text
    gates = bench.cli("gates").stdout
    assert "bo" in gates and "looks right" in gates and "mallory" not in gates


def test_without_a_token_the_console_is_read_only(bench: Bench) -> None:
    run_id = bench.plan()
    with bench.console(token=False) as url, httpx.Client(base_url=url, timeout=30) as http:
        page = http.get(f"/env/staging/runs/{run_id}/plan")
        assert page.status_code == 200 and run_id in page.text
        assert 'method="post"' not in page.text and "read-only" in page.text
        refused = http.post(f"/env/staging/runs/{run_id}/approve", data={"gate": "plan", "by": "eve", "csrf": "x"})
        assert refused.status_code == 403 and "read-only" in refused.text
        assert http.get("/login", follow_redirects=False).status_code == 303
    assert "no approvals or overrides recorded" in bench.cli("gates").stdout


def test_unknown_runs_files_and_environments_are_404_and_paths_stay_inside(bench: Bench) -> None:
    run_id = bench.plan()
    with bench.console() as url, httpx.Client(base_url=url, headers=BEARER, timeout=30) as http:
        assert http.get("/env/staging/runs/apply-nope").status_code == 404
        assert http.get("/env/elsewhere/runs/x").status_code == 404
        assert http.get(f"/env/staging/runs/{run_id}/files/..%2F..%2Fgatefill.toml").status_code == 404
        assert http.get(f"/env/staging/runs/{run_id}/files/nothing.md").status_code == 404
        answer = http.get("/")
        assert "default-src 'self'" in answer.headers["content-security-policy"]
        assert answer.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--host", "0.0.0.0"], {}, "error: refusing to serve the console on 0.0.0.0 without --auth-token-env"),
        (["--auth-token-env", "NO_SUCH_VAR"], {}, "error: --auth-token-env NO_SUCH_VAR: that environment variable"),
        (["--env", "nope"], {}, "error: unknown environment 'nope'"),
    ],
)
def test_bad_console_options_are_one_line_and_exit_2(
    tmp_path: Path, argv: list[str], env: dict[str, str], message: str
) -> None:
    (tmp_path / "gatefill.toml").write_text('[env.staging]\ndatabase_url = "sqlite:///s.db"\n', encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "gatefill", "ui", "--env", "staging", "--port", "0", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
