"""The README's walk-through, run as written right after the demo (as sqlite-utils runs the commands of its docs).

The commands come from the README's code block itself, not from a copy. Two stand-ins, both stated in the README:
``make demo`` (the Makefile's ``$(BIN)/gatefill demo``) runs as ``run_full_demo``, the function that command calls,
with ``fast`` and fewer soak respondents; and ``apply`` runs unthrottled, so the suite does not wait 117 s.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from gatefill.prism.sandbox.demo import run_full_demo

ROOT = Path(__file__).resolve().parents[1]
GATEFILL = "../.venv/bin/gatefill"  # what `make demo` installs, as seen from gatefill-demo/


def walkthrough() -> list[tuple[str, str]]:
    """The walk-through's code block as (command, comment) pairs, continuation lines joined."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### A walk through Phase 1 on the demo") :]
    start = section.index("```sh\n") + len("```sh\n")
    block = section[start : section.index("\n```", start)]
    pairs: list[tuple[str, str]] = []
    pending = ""
    for line in block.splitlines():
        code, _, comment = re.split(r"(\s+#\s)", line, maxsplit=1) if " # " in line else (line, "", "")
        code = pending + code.strip()
        if code.endswith("\\"):
            pending = code[:-1] + " "
            continue
        pending = ""
        pairs.append((code, comment.strip()))
    return pairs


def assert_short(output: Path) -> None:
    """The demo says what each step did in a line or two: no session ids while seeding, the verdict once."""
    text = output.read_text(encoding="utf-8")
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text), text
    assert len(text.splitlines()) < 40, text
    assert len(re.findall(r"^\s*final gate: ", text, re.M)) == 1 and "final gate: GO (" in text, text
    progress = re.findall(r"^apply: (\d+)/39 sessions", text, re.M)
    assert progress and progress[-1] == "39", text  # one line per batch (at most one a second), the last always


def test_the_walkthrough_is_read_from_the_readme() -> None:
    commands = [command for command, _ in walkthrough()]
    assert commands[0] == "make demo" and "$(BIN)/gatefill demo" in (ROOT / "Makefile").read_text()
    assert len(commands) == 7 and all(c.startswith(("cd gatefill-demo && ", GATEFILL)) for c in commands[1:])


def test_the_walkthrough_works_as_written_after_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "sk-readme-test-0123456789")
    cwd = tmp_path
    run_id = ""
    for command, comment in walkthrough():
        if command == "make demo":
            with (tmp_path / "demo.txt").open("w") as sink:
                state = run_full_demo(
                    tmp_path / "gatefill-demo",
                    Console(file=sink, width=120, soft_wrap=True),
                    fast=True,
                    soak_sessions=300,
                )
            if "final gate GO" in comment:
                assert state.steps["final_gate"]["verdict"] == "GO"
            assert_short(tmp_path / "demo.txt")
            continue
        if command.startswith("cd "):
            directory, _, command = command.removeprefix("cd ").partition(" && ")
            cwd = cwd / directory
        argv = shlex.split(command)
        assert argv[0] == GATEFILL, command
        argv = [sys.executable, "-m", "gatefill", *(run_id if a == "RUN" else a for a in argv[1:])]
        if argv[3] == "apply":
            argv += ["--rate", "unlimited"]
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
        expected = re.search(r"\(exit (\d)\)", comment)
        assert proc.returncode == (int(expected.group(1)) if expected else 0), (command, proc.stdout, proc.stderr)
        if argv[3] == "plan":
            run_id = re.search(r"^run (\S+) planned", proc.stdout, re.M).group(1)  # type: ignore[union-attr]
        for n in re.findall(r"(\d+) candidates", comment):
            assert f": {n} candidates" in proc.stdout, proc.stdout
        for n in re.findall(r"(\d+) sessions at", comment):
            assert f"written {n};" in proc.stdout, proc.stdout
        for verdict in re.findall(r"\b(PASS|HEALTHY)\b", comment):
            assert verdict in proc.stdout, proc.stdout
    assert run_id and (cwd / "artifacts" / run_id / "rollback_dry_run.md").exists()
