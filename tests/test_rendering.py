"""Every report and every terminal view, rendered from real runs, reads as words: no Python text (dict or list
reprs, ``<... object at 0x...>``, ``None``, ``True``), no empty field where a value belongs, and at 80 columns no run
id or date cut short.

The runs: the demo's pipeline on SQLite and Postgres with a production that lacks three profiles (so its mini plan
is applied), then by hand a plan that finds nothing and its apply, a dry run and a real rollback of the production
apply, a health check, a repeated approval, and ``status`` of every run and ``gates``.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from rich.console import Console

from gatefill import ledger
from gatefill.cli import main
from gatefill.config import Settings
from gatefill.db import Database
from gatefill.prism.sandbox.demo import run_demo_pipeline, seed_demo
from gatefill.prism.schema import profiles
from tests.conftest import create_pg_database, drop_pg_database, pg_env, sqlite_env

#: Python's text for values, which a report must never show.
_PYTHON_TEXT = {
    "an object's repr": re.compile(r"<[\w .]+ at 0x[0-9a-f]+>|<built-in "),
    "a dict's or list's repr": re.compile(r"[{\[]'|'[}\]]"),
    "a class's repr": re.compile(r"\b(?:Counter|defaultdict|datetime\.datetime|Decimal|RunStatus)[(.]"),
    "a Python bool": re.compile(r"\b(?:True|False)\b"),
    "an empty field": re.compile(r"[;:,] *[;,]|\(\s*\)|: *\|"),
}
#: ``None`` is a word where a sentence starts with it (``None: every row ...``, ``- None found ...``).
_NONE = re.compile(r"\bNone\b")
_SENTENCE_NONE = re.compile(r"(?:^|\n|- |\| )None(?=[:.]| found| of )")


def python_text(text: str) -> list[str]:
    """Where ``text`` shows Python's text for a value, or an empty field: one entry per finding, with its line."""
    found = []
    for line in text.splitlines():
        if set(line.replace("|", "").strip()) <= {"", "-", ":"}:
            continue  # a Markdown table's header rule, or the empty header of a two-column facts table
        cells = re.split(r"(?<!\\)\|", line.strip())
        if line.lstrip().startswith("|") and any(not cell.strip() for cell in cells[1:-1]):
            found.append(f"an empty table cell: {line.strip()[:160]}")
        for what, pattern in _PYTHON_TEXT.items():
            if pattern.search(line):
                found.append(f"{what}: {line.strip()[:160]}")
        allowed = {m.start() + m.group(0).index("None") for m in _SENTENCE_NONE.finditer(line)}
        if any(m.start() not in allowed for m in _NONE.finditer(line)):
            found.append(f"None where a value belongs: {line.strip()[:160]}")
    return found


def test_the_check_finds_what_the_issue_saw() -> None:
    """Each kind of finding from issue 14, as it was printed, is caught (the check can fail)."""
    seen = [
        "| fc_scores | 39 | <built-in method update of dict object at 0x7fe986288c40> |",
        "| version_distribution | PASS | fc_scores {'v1.2/functions': 157}; profiles {'v1.2.1': 157} |",
        "| staging backfill gate | PASS | backfill_gate.md verdict PASS: {'written': 39} |",
        "run apply-1: succeeded; ; 0.0 s, measured 0.0 sessions/min",
        "  apply: {'run_id': 'apply-1', 'status': 'succeeded', 'verdict': 'PASS'}",
        "| soak | `soak-1` | None |",
        "healthy afterwards: True",
        "| plan | approval | tess | 2025-09-17 | |",
    ]
    for line in seen:
        assert python_text(line), line
    fine = [
        "None: every row the run wrote still holds, in every column, what the run wrote.",
        "- None found by the checks above.",
        "| | |",
        "|---|---:|---|",
        "| table | inserts | updates |",
        'completed sessions: 0 without a token; {"a": 1}',
    ]
    for line in fine:
        assert not python_text(line), line


@dataclass
class World:
    """The artifacts of the runs, and what each command printed (stdout and stderr), by name."""

    artifacts: Path
    printed: dict[str, str]
    run_ids: list[str]


def _cli(config: Path, *argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--config", str(config), *argv])
    return code, out.getvalue() + err.getvalue()


def _pair(dialect: str, tmp: Path, created: list[str], request: pytest.FixtureRequest) -> Settings:
    if dialect == "sqlite":
        staging = sqlite_env(tmp / "staging.db", "staging")
        production = sqlite_env(tmp / "production.db", "production", kind="production")
    else:
        template = request.getfixturevalue("pg_template")
        created += [create_pg_database(template), create_pg_database(template)]
        staging = pg_env(created[0], "staging")
        production = pg_env(created[1], "production", kind="production")
    return Settings(
        path=None,
        root=tmp,
        artifacts_dir=tmp / "artifacts",
        environments={"staging": staging, "production": production},
    )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("rendering")
    created: list[str] = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SUPABASE_SERVICE_ROLE_KEY", "sk-rendering-test-0123456789")
            mp.setenv("COLUMNS", "80")
            yield _build(_pair(request.param, tmp, created, request), tmp)
    finally:
        for name in created:
            drop_pg_database(name)


def _build(settings: Settings, tmp: Path) -> World:
    with (tmp / "demo.txt").open("w") as sink:
        console = Console(file=sink, width=80, soft_wrap=True)
        seed_demo(settings, console, create=True)
        with Database(settings.env("production")) as db, db.begin() as conn:
            victims = [r[0] for r in conn.execute(sa.select(profiles.c.session_id).order_by(profiles.c.session_id))]
            conn.execute(profiles.delete().where(profiles.c.session_id.in_(victims[:3])))
        state = run_demo_pipeline(settings, console, fast=True, soak_sessions=300, approver="tess")
    assert state.done and "production_apply" in state.steps, state.log
    config = tmp / "gatefill.toml"
    config.write_text(
        f'artifacts_dir = "{settings.artifacts_dir}"\n'
        + "".join(
            f'[env.{n}]\ndatabase_url = "{e.database_url}"\nkind = "{e.kind}"\n'
            for n, e in settings.environments.items()
        ),
        encoding="utf-8",
    )
    printed = {"demo": (tmp / "demo.txt").read_text()}
    steps = state.steps
    production_apply = steps["production_apply"]["run_id"]

    code, printed["plan (nothing to do)"] = _cli(config, "plan", "--env", "staging", "--rate", "unlimited")
    empty = re.search(r"^run (\S+) planned", printed["plan (nothing to do)"], re.M)
    assert code == 0 and empty, printed["plan (nothing to do)"]
    code, printed["approve (no note)"] = _cli(config, "approve", empty.group(1), "--gate", "plan", "--by", "tess")
    assert code == 0, printed["approve (no note)"]
    code, printed["apply (nothing to do)"] = _cli(config, "apply", empty.group(1))
    assert code == 0, printed["apply (nothing to do)"]
    code, printed["approve (again)"] = _cli(config, "approve", state.run_id, "--gate", "production", "--by", "ola")
    assert code == 0, printed["approve (again)"]
    code, printed["rollback --dry-run"] = _cli(config, "rollback", production_apply, "--dry-run")
    assert code == 0, printed["rollback --dry-run"]
    code, printed["rollback"] = _cli(config, "rollback", production_apply)
    assert code == 0, printed["rollback"]
    code, printed["health"] = _cli(config, "health", "--env", "production")
    assert code == 1, printed["health"]  # the rollback took the three profiles away again

    run_ids = []
    for env in settings.environments.values():
        with Database(env) as db, db.connect() as conn:
            run_ids += [r.id for r in ledger.list_runs(conn, limit=100)]
    for run_id in run_ids:
        code, printed[f"status {run_id}"] = _cli(config, "status", run_id)
        assert code == 0, printed[f"status {run_id}"]
    code, printed["status"] = _cli(config, "status")
    code, printed["gates"] = _cli(config, "gates")
    return World(settings.artifacts_dir, printed, run_ids)


def test_every_report_reads_as_words(world: World) -> None:
    reports = sorted(world.artifacts.rglob("*.md"))
    names = {p.name for p in reports}
    assert {
        "backfill_plan.md",
        "prod_mini_backfill_plan.md",
        "backfill_summary.md",
        "backfill_gate.md",
        "rollback_dry_run.md",
        "rollback_report.md",
        "staging_observability.md",
        "staging_soak_gate.md",
        "prod_health_check.md",
        "pipeline_final_gate.md",
    } <= names, names
    found = [f"{p.relative_to(world.artifacts)}: {line}" for p in reports for line in python_text(p.read_text())]
    assert not found, "\n".join(found)


def test_every_terminal_view_reads_as_words(world: World) -> None:
    assert len(world.printed) >= 10
    found = [f"{name}: {line}" for name, text in world.printed.items() for line in python_text(text)]
    assert not found, "\n".join(found)
    assert (
        "nothing left to do" in world.printed["apply (nothing to do)"]
        or "no session to process" in (world.printed["apply (nothing to do)"])
    )


def test_status_and_gates_keep_ids_and_dates_whole_at_80_columns(world: World) -> None:
    for name in ("status", "gates"):
        text = world.printed[name]
        assert "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= 80, text
    for run_id in world.run_ids[:20]:  # status lists the 20 most recent
        assert run_id in world.printed["status"]
    gated = {run_id for run_id in world.run_ids if f"run {run_id}" in world.printed["gates"]}
    assert len(gated) >= 4, world.printed["gates"]  # plan, review, soak, production and the mini plan's approvals
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", world.printed["gates"])
