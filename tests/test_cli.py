"""The command line as users and scripts see it: exit codes, one-line errors, no secrets, every command helped."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.console import Console

from gatefill.cli import app, main
from gatefill.progress import apply_progress
from tests.conftest import Target

ROOT = Path(__file__).resolve().parents[1]


def all_commands() -> list[list[str]]:
    """Every command path of the Typer app, e.g. ['db', 'init']."""
    found: list[list[str]] = []

    def walk(group: typer.Typer, prefix: list[str]) -> None:
        for command in group.registered_commands:
            name = command.name or (command.callback.__name__ if command.callback else "")
            found.append([*prefix, name])
        for sub in group.registered_groups:
            assert sub.name and sub.typer_instance
            walk(sub.typer_instance, [*prefix, sub.name])

    walk(app, [])
    return found


def test_every_command_has_help_and_is_in_the_readme(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = all_commands()
    assert len(commands) >= 8
    for path in commands:
        assert main([*path, "--help"]) == 0, path
        assert "Usage:" in capsys.readouterr().out
        assert f"gatefill {' '.join(path)}" in readme, f"README does not mention `gatefill {' '.join(path)}`"


def write_config(tmp_path: Path, url: str, name: str = "staging") -> Path:
    path = tmp_path / "gatefill.toml"
    path.write_text(f'[env.{name}]\ndatabase_url = "{url}"\n', encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["db", "check", "--env", "nope"], "error: unknown environment 'nope'"),
        (["--config", "/nonexistent/gatefill.toml", "db", "check", "--env", "x"], "error: config file not found"),
        (["seed", "--env", "staging", "--scenario", "nope"], "error: "),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "sqlite:///staging.db")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_malformed_config_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gatefill.toml").write_text("[env.staging\n", encoding="utf-8")
    assert main(["db", "check", "--env", "staging"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_unreachable_database_message_hides_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "sqlite:///unused.db")
    monkeypatch.setenv("GATEFILL_ENV_STAGING_DATABASE_URL", "postgresql://postgres:Sup3rSecretPw@127.0.0.1:1/prism")
    assert main(["db", "init", "--env", "staging"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot connect to postgresql+psycopg://postgres:***@127.0.0.1:1/prism")
    assert "Sup3rSecretPw" not in err
    assert not list(tmp_path.glob("*.db"))


def test_missing_sqlite_database_is_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "sqlite:///staging.db")
    assert main(["db", "check", "--env", "staging"]) == 2
    assert "no such database file" in capsys.readouterr().err
    assert not (tmp_path / "staging.db").exists()


def test_db_init_and_check_through_the_cli(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "sqlite:///unused.db")
    monkeypatch.setenv("GATEFILL_ENV_STAGING_DATABASE_URL", target.url)
    assert main(["db", "init", "--env", "staging"]) == 0
    assert main(["db", "check", "--env", "staging"]) == 0
    assert "every required table and column is present" in capsys.readouterr().out
    with target.db.begin() as conn:
        conn.exec_driver_sql("DROP TABLE fn_logs")
    assert main(["db", "check", "--env", "staging"]) == 1
    assert "- fn_logs" in capsys.readouterr().out


def test_init_writes_a_commented_example_and_refuses_to_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0
    text = (tmp_path / "gatefill.toml").read_text(encoding="utf-8")
    assert "[env.staging]" in text and text.count("#") > 5
    assert main(["init"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_secrets_never_appear_in_anything_a_run_writes(tmp_path: Path, target: Target) -> None:
    """Runs real commands in a subprocess with a service key and a DB password set, then greps every output."""
    key = "sk-SERVICE-ROLE-0123456789abcdef"
    password = "pw-DATABASE-9876543210"
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, "sqlite:///unused.db", name="prod")
    env = {
        **os.environ,
        "SUPABASE_SERVICE_ROLE_KEY": key,
        "GATEFILL_ENV_PROD_DATABASE_URL": f"postgresql://postgres:{password}@127.0.0.1:1/prism",
        "GATEFILL_ENV_STAGING_DATABASE_URL": target.url,
    }
    outputs = []
    for argv in (
        ["db", "init", "--env", "prod"],
        ["db", "check", "--env", "prod"],
        ["--traceback", "db", "check", "--env", "prod"],
        ["db", "init", "--env", "staging"],
        ["db", "check", "--env", "staging"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "gatefill", *argv], cwd=work, env=env, capture_output=True, text=True, timeout=60
        )
        outputs.append(proc.stdout + proc.stderr)
    written = [p.read_bytes().decode("utf-8", "replace") for p in work.rglob("*") if p.is_file()]
    for text in outputs + written:
        assert key not in text
        assert password not in text
    assert re.search(r"error: cannot connect to .*\*\*\*@127\.0\.0\.1:1/prism", outputs[0])


def test_score_commands_stream_json_lines_and_stop_on_a_malformed_line() -> None:
    goldens = ROOT / "tests" / "prism" / "goldens"
    inputs = "".join(json.dumps(json.loads((goldens / f"g{i}.input.json").read_text())) + "\n" for i in range(1, 7))
    proc = subprocess.run(
        [sys.executable, "-m", "gatefill", "score", "profile"], input=inputs, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    outputs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert outputs == [json.loads((goldens / f"g{i}.output.json").read_text()) for i in range(1, 7)]
    bad = inputs.splitlines()[0] + "\n{not json\n"
    proc = subprocess.run(
        [sys.executable, "-m", "gatefill", "score", "profile"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert len(proc.stdout.splitlines()) == 1  # the good line was answered before the bad one stopped the stream
    assert proc.stderr.startswith("error: line 2: ") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "functions", "--env", "staging", "--port", "99999"], "error: Invalid value for '--port'"),
        (["serve", "functions", "--env", "staging", "--workers", "0"], "error: Invalid value for '--workers'"),
        (["approve"], "error: Missing argument 'RUN'"),
        (["nosuch"], "error: No such command 'nosuch'"),
        (["db", "nosuch"], "error: No such command 'nosuch'"),
        (["plan", "--env", "staging", "--batch-size", "x"], "error: Invalid value for '--batch-size'"),
        (["status", "--bogus"], "error: No such option: --bogus"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "sqlite:///staging.db")
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert not list(tmp_path.glob("*.db"))


def test_help_shows_flags_without_a_type_and_names_files_that_exist(capsys: pytest.CaptureFixture[str]) -> None:
    """``--force  <bool>`` reads as if it took a value; a help text pointing at a file points at one in the repo."""
    seen_flags = 0
    for path in [[], *all_commands()]:
        assert main([*path, "--help"]) == 0, path
        text = capsys.readouterr().out
        assert "<bool>" not in text, path
        seen_flags += len(re.findall(r"--help\s+Show this message", text))
        for named in re.findall(r"\b(?:spec|tests|src|bench|seeds)/[\w./*-]*\w", text):
            assert list(ROOT.glob(named)), f"`gatefill {' '.join(path)} --help` names {named}, which does not exist"
    assert seen_flags == len(all_commands()) + 1  # every screen's --help line lost its type, none was dropped


def test_apply_progress_off_a_terminal_is_a_line_per_batch_at_most_one_a_second() -> None:
    console = Console(file=io.StringIO(), width=100)  # a file: not a terminal
    with apply_progress(console) as progress:
        for done, elapsed in ((5, 15.0), (10, 30.0), (15, 30.4), (20, 45.0), (25, 45.1), (27, 45.2)):
            progress(done, 27, elapsed)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert lines == [
        "apply: 5/27 sessions, 15 s, 20.0/min",
        "apply: 10/27 sessions, 30 s, 20.0/min",
        "apply: 20/27 sessions, 45 s, 26.7/min",
        "apply: 27/27 sessions, 45 s, 35.8/min",
    ]
