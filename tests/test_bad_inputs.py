"""Bad input through the command line: one line ``error: ...``, the exit code of its kind, and nothing written.

"Nothing written" is measured: a digest of every table of the environment's database and of every file under the
artifacts directory, taken before and after the command.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatefill import ledger
from gatefill.cli import main
from gatefill.db import Database
from gatefill.prism.sandbox.seed import TEST_SESSION_A
from gatefill.prism.schema import init_schema
from tests.conftest import Seeder, Target, sqlite_env, table_digests


@dataclass
class Lab:
    """A seeded staging environment (``target``) behind a gatefill.toml, and the command line pointed at it."""

    target: Target
    root: Path
    capsys: pytest.CaptureFixture[str]

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def run(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--config", str(self.root / "gatefill.toml"), *argv])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    def state(self) -> dict[str, str]:
        """Every table's rows and every artifact file, digested."""
        found = {f"table {name}": digest for name, digest in table_digests(self.target.db).items()}
        for path in sorted(self.artifacts.rglob("*")):
            if path.is_file():
                found[f"file {path.relative_to(self.root)}"] = hashlib.sha256(path.read_bytes()).hexdigest()
        return found

    def refused(self, *argv: str, says: str, exit_code: int = 2) -> str:
        """Runs a command that must be refused: its exit code, one line naming ``says``, nothing written."""
        before = self.state()
        code, out, err = self.run(*argv)
        assert code == exit_code, (argv, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert says in err, err
        assert self.state() == before, f"{argv} wrote something"
        return err

    def planned_run(self) -> str:
        code, out, err = self.run("plan", "--env", "staging", "--rate", "unlimited")
        assert code == 0, err
        return next(line.split()[1] for line in out.splitlines() if line.startswith("run "))


@pytest.fixture
def lab(target: Target, tmp_path: Path, capsys: pytest.CaptureFixture[str], seeder: Seeder) -> Lab:
    seeder(target, "staging-2025-09-17")
    production = tmp_path / "production.db"
    with Database(sqlite_env(production, "production", kind="production"), create=True) as db:
        init_schema(db)
    (tmp_path / "gatefill.toml").write_text(
        'artifacts_dir = "artifacts"\n'
        f'[env.staging]\ndatabase_url = "{target.url}"\nkind = "staging"\n'
        f'[env.production]\ndatabase_url = "sqlite:///{production}"\nkind = "production"\n',
        encoding="utf-8",
    )
    return Lab(target, tmp_path, capsys)


#: Apply options out of range, each with what the refusal says.
BAD_APPLY_OPTIONS = [
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--max-failures", "-1"], "--max-failures must be 0 or more, not -1"),
    (["--rate", "fast"], "not a rate: 'fast'"),
    (["--executor", "remote"], "unknown executor 'remote'"),
    (["--target-batch-time", "-1"], "--target-batch-time must be 0 (off) or more seconds, not -1.0"),
    (["--cool-down", "-5"], "--cool-down must be 0 or more seconds, not -5.0"),
    (["--min-batch-size", "0"], "--min-batch-size must be at least 1, not 0"),
    (["--min-batch-size", "9", "--max-batch-size", "3"], "--min-batch-size 9 is above --max-batch-size 3"),
]


def test_apply_options_out_of_range_are_refused_before_anything_is_written(lab: Lab) -> None:
    run_id = lab.planned_run()
    plan_file = lab.artifacts / run_id / "backfill_plan.json"
    for options, says in BAD_APPLY_OPTIONS:
        # --approve-as would record an approval, and a plan file register its run, were the options checked late.
        lab.refused("apply", run_id, "--approve-as", "tess", *options, says=says)
        lab.refused("apply", str(plan_file), "--approve-as", "tess", *options, says=says)


def test_a_priority_that_is_not_a_session_id_is_refused(lab: Lab) -> None:
    for bad in ("'; drop table profiles; --", "not-a-session", "618c5ea6-aeda-4084-9156"):
        says = f"--priority: {bad!r} is not a session id (a UUID)"
        lab.refused("plan", "--env", "staging", "--priority", TEST_SESSION_A, "--priority", bad, says=says)
        lab.refused("pipeline", "--staging", "staging", "--production", "production", "--priority", bad, says=says)


def test_a_priority_session_id_in_capitals_is_the_same_session(lab: Lab) -> None:
    code, out, err = lab.run("plan", "--env", "staging", "--priority", TEST_SESSION_A.upper())
    assert code == 0, err
    run_id = next(line.split()[1] for line in out.splitlines() if line.startswith("run "))
    body = json.loads((lab.artifacts / run_id / "backfill_plan.json").read_text())
    assert body["batches"][0] == {"batch_no": 1, "group": "priority", "keys": [TEST_SESSION_A]}
    assert body["totals"]["priority_not_found"] == []


def test_a_gate_must_fit_the_run_and_a_repeat_approval_records_nothing(lab: Lab) -> None:
    run_id = lab.planned_run()
    for gate, phase in (("soak", "soak"), ("production", "pipeline")):
        says = f"gate '{gate}' is approved on {phase} runs; {run_id} is an apply run (its gates: plan, review)"
        lab.refused("approve", run_id, "--gate", gate, "--by", "tess", says=says)
    lab.refused("approve", run_id, "--gate", "deploy", "--by", "tess", says="unknown gate 'deploy'")

    code, out, err = lab.run("approve", run_id, "--gate", "plan", "--by", "tess", "--note", "looked at it")
    assert code == 0, err
    first = lab.state()
    code, out, err = lab.run("approve", run_id, "--gate", "plan", "--by", "ola")
    assert code == 0, err
    assert out.startswith(f"plan of {run_id} was already approved by tess at ") and "(looked at it)" in out
    assert out.rstrip().endswith("nothing recorded") and out.count("\n") == 1
    assert lab.state() == first
    with lab.target.db.connect() as conn:
        assert [(a.gate, a.approved_by) for a in ledger.approvals_for(conn, run_id)] == [("plan", "tess")]


def test_only_a_run_that_changed_data_can_be_rolled_back_and_a_dry_run_never_replaces_a_real_report(lab: Lab) -> None:
    planned = lab.planned_run()
    lab.refused("rollback", planned, says=f"run {planned} cannot be rolled back: it is only planned")
    lab.refused("rollback", planned, "--dry-run", says="it is only planned: nothing was applied")

    applied = lab.planned_run()
    code, out, err = lab.run("apply", applied, "--approve-as", "tess")
    assert code == 0, err
    assert (lab.artifacts / applied / "rollback_dry_run.md").exists()  # the backfill gate's dry run
    assert not (lab.artifacts / applied / "rollback_report.md").exists()

    code, out, err = lab.run(
        "soak", "--env", "staging", "--after", applied, "--clock", "simulated", "--duration", "1h", "--interval", "30m",
        "--no-chart",
    )  # fmt: skip
    soak = re.findall(r"soak-[0-9TZ]+-[0-9a-f]+", out)[0]
    says = f"run {soak} cannot be rolled back: it is a soak run, which changes no data (only apply runs do)"
    lab.refused("rollback", soak, says=says)
    lab.refused("rollback", soak, "--dry-run", says=says)

    code, out, err = lab.run("rollback", applied)
    assert code == 0, err
    real = (lab.artifacts / applied / "rollback_report.md").read_text()
    assert "| mode | executed |" in real and "succeeded → rolled_back" in real
    err = lab.refused("rollback", applied, "--dry-run", says=f"run {applied} cannot be rolled back: it was rolled back")
    assert str(lab.artifacts / applied / "rollback_report.md") in err
    assert (lab.artifacts / applied / "rollback_report.md").read_text() == real
