"""Takes the README's screenshots of the operator console (``docs/screenshots/*.png``) from a real demo.

Builds ``gatefill demo --fast`` in a temporary directory, plans a run on its untouched ``walkthrough`` copy (the plan
under review), records one ``gatefill watch --env production --once`` (the Watch page), serves ``gatefill ui`` with
an operator token, signs in with Debian's Chromium through Playwright and photographs each page. Run it from the
repository: ``.venv/bin/python scripts/screenshots.py``.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

OUT = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"


def gatefill(*argv: str, cwd: Path, env: dict[str, str], ok: tuple[int, ...] = (0,)) -> str:
    proc = subprocess.run([sys.executable, "-m", "gatefill", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode not in ok:
        raise SystemExit(f"gatefill {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def first_link(page: Page, prefix: str) -> str:
    href = page.locator(f'a[href^="{prefix}"]').first.get_attribute("href")
    if href is None:
        raise SystemExit(f"no link to {prefix}* on the runs page")
    return href


def photograph(url: str, token: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1180, "height": 760})
        page.goto(url + "/login")
        page.get_by_label("Operator token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(url + "/")
        shots = {
            "runs": "/",
            "run": first_link(page, "/env/staging/runs/apply-"),
            "plan": first_link(page, "/env/walkthrough/runs/apply-") + "/plan",
            "soak": first_link(page, "/env/staging/runs/soak-"),
            "pipeline": "/pipeline",
            "gates": "/gates",
            "watch": "/watch",
        }
        for name, path in shots.items():
            page.goto(url + path)
            page.screenshot(path=OUT / f"{name}.png")
            print(f"{OUT / f'{name}.png'}: {path}")
        browser.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    env = {**os.environ, "GATEFILL_UI_TOKEN": token, "COLUMNS": "200"}
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "gatefill-demo"
        gatefill("demo", "--fast", "--dir", str(demo), cwd=Path(tmp), env=env)
        gatefill("plan", "--env", "walkthrough", cwd=demo, env=env)
        # Exit 1 is a FAILed check: a result to show like any other.
        gatefill("watch", "--env", "production", "--once", cwd=demo, env=env, ok=(0, 1))
        argv = ["ui", "--env", "staging", "--env", "production", "--env", "walkthrough", "--port", "0"]
        server = subprocess.Popen(
            [sys.executable, "-m", "gatefill", *argv, "--auth-token-env", "GATEFILL_UI_TOKEN"],
            cwd=demo,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            found = re.search(r"(http://\S+?)/?$", server.stdout.readline().strip())
            if found is None:
                raise SystemExit("gatefill ui did not start")
            time.sleep(1.0)
            photograph(found.group(1), token)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(15)


if __name__ == "__main__":
    main()
