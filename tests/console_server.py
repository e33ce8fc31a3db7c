"""The console's test bench: a working directory with a gatefill.toml whose staging environment is a test's database
(its URL, with a password in it, given as an environment variable as an operator would), real runs made with the
CLI, and a real ``gatefill ui`` process on a free port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import Target

TOKEN = "tok-OPERATOR-5f1e9a77c3"
PASSWORD = "pw-DATABASE-48151623"
SERVICE_KEY = "sk-SERVICE-ROLE-0a1b2c3d4e"
SECRETS = (TOKEN, PASSWORD, SERVICE_KEY)


def _with_password(url: str) -> str:
    """The target's URL with a password in it (Postgres trusts local connections and ignores it; SQLite has none)."""
    return re.sub(r"^(postgresql(?:\+psycopg)?://[^:@/]+)@", rf"\1:{PASSWORD}@", url)


@dataclass
class Bench:
    """A working directory whose ``staging`` is the test's database, and the CLI run there."""

    work: Path
    env: dict[str, str]

    @classmethod
    def make(cls, tmp_path: Path, target: Target) -> Bench:
        work = tmp_path / "work"
        work.mkdir()
        (work / "gatefill.toml").write_text(
            'artifacts_dir = "artifacts"\n\n[env.staging]\nkind = "staging"\n\n[env.prod]\nkind = "production"\n',
            encoding="utf-8",
        )
        env = {
            **os.environ,
            "GATEFILL_ENV_STAGING_DATABASE_URL": _with_password(target.url),
            # A production that does not answer: the console shows the rest and never prints its password.
            "GATEFILL_ENV_PROD_DATABASE_URL": f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/prism",
            "SUPABASE_SERVICE_ROLE_KEY": SERVICE_KEY,
            "GATEFILL_UI_TOKEN": TOKEN,
            "COLUMNS": "200",
        }
        return cls(work, env)

    @classmethod
    def in_directory(cls, work: Path) -> Bench:
        """The CLI run in ``work`` with its own gatefill.toml (the demo's), plus the operator token."""
        return cls(work, {**os.environ, "GATEFILL_UI_TOKEN": TOKEN, "COLUMNS": "200"})

    def cli(self, *argv: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "gatefill", *argv],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check is not None:
            assert proc.returncode == check, (argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def plan(self, *extra: str) -> str:
        """``gatefill plan --env staging``: the planned run's id."""
        found = re.search(r"run (\S+) planned", self.cli("plan", "--env", "staging", *extra).stdout)
        assert found is not None
        return found.group(1)

    def start(self, *argv: str, stdout: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "gatefill", *argv],
            cwd=self.work,
            env=self.env,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )

    @contextmanager
    def console(self, *, token: bool = True, envs: Sequence[str] = ("staging", "prod")) -> Iterator[str]:
        """``gatefill ui`` on a free port (with the operator token, or read-only); yields its base URL."""
        argv = ["ui", "--port", "0", *[a for e in envs for a in ("--env", e)]]
        if token:
            argv += ["--auth-token-env", "GATEFILL_UI_TOKEN"]
        proc = self.start(*argv, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            found = re.search(r"(http://\S+?)/?$", line.strip())
            assert found is not None, (line, proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
            url = found.group(1)
            _wait_until_serving(url)
            yield url
        finally:
            stop(proc)


def _wait_until_serving(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url + "/static/console.css", timeout=2.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop(proc: subprocess.Popen[str], timeout: float = 15.0) -> int:
    """Ctrl-C, then a kill if it does not end in time; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode
