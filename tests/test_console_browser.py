"""The operator console in a real browser: Playwright drives Debian's Chromium (one browser for the module) against a
real ``gatefill ui`` with runs made by the CLI on SQLite and Postgres.

An approval clicked in the page is a CLI approval (``gatefill gates`` lists it, ``gatefill apply`` proceeds); a running
apply's progress moves on the page without a reload; a browser without the token, or a POST without the page's CSRF
token, cannot approve.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import Seeder, Target
from tests.console_server import TOKEN, Bench, stop

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the console's browser tests need Debian's chromium; install it with "
            "`make chromium` (sudo apt-get update && sudo apt-get install -y chromium)",
            pytrace=False,
        )
    # Assertions wait as long as actions do: a CLI process starting on a busy machine takes seconds.
    expect.set_options(timeout=30_000)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


@pytest.fixture
def bench(tmp_path: Path, target: Target, seeder: Seeder) -> Bench:
    seeder(target, "staging-2025-09-17")
    return Bench.make(tmp_path, target)


def sign_in(page: Page, url: str, path: str) -> None:
    page.goto(url + path)
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.get_by_label("Operator token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(url + path)


def test_an_approval_clicked_in_the_page_is_a_cli_approval_and_unblocks_apply(bench: Bench, page: Page) -> None:
    run_id = bench.plan("--rate", "unlimited")
    blocked = bench.cli("apply", run_id, check=4)
    assert "not approved" in blocked.stderr
    with bench.console() as url:
        sign_in(page, url, f"/env/staging/runs/{run_id}/plan")
        expect(page.locator("code.hash")).to_have_text(re.compile(r"^[0-9a-f]{64}$"))
        page.get_by_label("Approver").fill("ana")
        page.get_by_label("Note").fill("reviewed in the console")
        page.get_by_role("button", name="Approve plan").click()
        expect(page.get_by_role("status")).to_have_text("Approved the plan gate.")
        expect(page.locator("ul.approvals")).to_contain_text("gate plan by ana")
        page.goto(url + "/gates")
        expect(page.locator("table.gates")).to_contain_text("reviewed in the console")
    gates = bench.cli("gates").stdout
    assert run_id in gates and "ana" in gates and "reviewed in the console" in gates
    assert f"run {run_id}: succeeded" in bench.cli("apply", run_id).stdout


def test_a_running_apply_moves_on_the_page_without_a_reload(bench: Bench, page: Page) -> None:
    run_id = bench.plan("--rate", "120/min", "--batch-size", "2")  # 39 sessions: about twenty seconds
    with bench.console() as url:
        sign_in(page, url, f"/env/staging/runs/{run_id}")
        expect(page.locator('[data-field="status"]')).to_have_text("planned")
        page.evaluate("window.__sameDocument = 'yes'")
        apply = bench.start("apply", run_id, "--approve-as", "ana")
        try:
            expect(page.locator('[data-field="status"]')).to_have_text("running", timeout=60_000)
            page.wait_for_function(
                "() => { const n = Number(document.querySelector('[data-field=\"done\"]').textContent);"
                " return n > 0 && n < 39; }",
                timeout=60_000,
            )
            expect(page.locator('[data-field="status"]')).to_have_text("succeeded", timeout=90_000)
            assert apply.wait(90) == 0
        finally:
            stop(apply)
        expect(page.locator('[data-field="done"]')).to_have_text("39")
        expect(page.locator("section.live")).to_have_attribute("data-done", "1")
        assert page.evaluate("window.__sameDocument") == "yes"  # the same document: nothing reloaded
        assert int(page.locator("section.live").get_attribute("data-updates") or 0) >= 3
        assert page.locator('[data-field="bar"]').evaluate("el => el.style.width") == "100%"


def test_without_the_token_nothing_can_be_approved(bench: Bench, page: Page) -> None:
    run_id = bench.plan()
    with bench.console(token=False) as url:
        page.goto(f"{url}/env/staging/runs/{run_id}/plan")
        expect(page.locator("code.command")).to_contain_text(f"gatefill approve {run_id} --gate plan")
        expect(page.get_by_role("button", name="Approve plan")).to_have_count(0)
        status = page.evaluate(
            """async (path) => (await fetch(path, {method: 'POST', body: new URLSearchParams(
                {gate: 'plan', by: 'eve', csrf: 'x'})})).status""",
            f"/env/staging/runs/{run_id}/approve",
        )
        assert status == 403
    assert "no approvals or overrides recorded" in bench.cli("gates").stdout


def test_a_post_without_the_pages_csrf_token_is_refused(bench: Bench, page: Page) -> None:
    run_id = bench.plan()
    post = """async ([path, csrf]) => (await fetch(path, {method: 'POST', redirect: 'manual',
        body: new URLSearchParams({gate: 'plan', by: 'mallory', csrf: csrf})})).status"""
    with bench.console() as url:
        sign_in(page, url, f"/env/staging/runs/{run_id}/plan")
        path = f"/env/staging/runs/{run_id}/approve"
        assert page.evaluate(post, [path, ""]) == 403
        assert page.evaluate(post, [path, "f" * 64]) == 403
        assert "no approvals or overrides recorded" in bench.cli("gates").stdout
        csrf = page.locator('input[name="csrf"]').first.get_attribute("value")
        assert page.evaluate(post, [path, csrf]) in (0, 303)  # the page's own token: recorded (0: opaque redirect)
    assert "mallory" in bench.cli("gates").stdout


def test_pause_stops_a_running_apply_after_its_batch_and_shows_how_to_resume(bench: Bench, page: Page) -> None:
    run_id = bench.plan("--rate", "60/min", "--batch-size", "1")  # a session a second: long enough to pause
    with bench.console() as url:
        sign_in(page, url, f"/env/staging/runs/{run_id}")
        apply = bench.start("apply", run_id, "--approve-as", "ana")
        try:
            expect(page.locator('[data-field="status"]')).to_have_text("running", timeout=60_000)
            page.reload()
            page.get_by_role("button", name="Pause after this batch").click()
            expect(page.get_by_role("status")).to_contain_text("pauses after its current batch")
            assert apply.wait(60) == 130  # as after Ctrl-C in its terminal
        finally:
            stop(apply)
        page.reload()
        expect(page.locator('[data-field="status"]')).to_have_text("paused")
        expect(page.locator("code.command").last).to_have_text(f"gatefill apply {run_id} --env staging")
    assert "paused" in bench.cli("status", run_id).stdout


@pytest.mark.slow
def test_the_demo_in_the_console_every_page_with_reports_and_the_soak_chart(tmp_path: Path, page: Page) -> None:
    """What the issue's newcomer sees after ``gatefill demo``: every run, the pipeline, the reports and the chart."""
    demo = tmp_path / "gatefill-demo"
    Bench.in_directory(tmp_path).cli("demo", "--fast", "--dir", str(demo))
    bench = Bench.in_directory(demo)
    with bench.console(token=False, envs=("staging", "production")) as url:
        page.goto(url + "/")
        for phase in ("apply", "soak", "pipeline"):
            expect(page.locator(f'table.runs a[href*="/runs/{phase}-"]').first).to_be_visible()
        page.goto(url + "/pipeline")
        expect(page.locator("p.ok")).to_contain_text("final gate GO")
        page.get_by_role("link", name="pipeline_final_gate.md").click()
        expect(page.locator("article.report h1").first).to_be_visible()
        page.goto(url + "/pipeline")
        page.locator('table.steps a[href*="/runs/soak-"]').first.click()
        expect(page.locator('[data-field="verdict"]')).to_have_text("PASS")
        chart = page.locator("img.chart")
        expect(chart).to_be_visible()
        assert chart.evaluate("img => img.complete && img.naturalWidth > 0")
        assert page.locator("table[data-looks] tbody tr").count() >= 2
        page.goto(url + "/gates")
        expect(page.locator("table.gates")).to_contain_text("demo")
        metrics = page.request.get(url + "/metrics").text()
        soak_check = r'gatefill_soak_check\{check="conversion",env="staging",run="soak-[^"]+",verdict="PASS"\} 1'
        assert re.search(soak_check, metrics)
