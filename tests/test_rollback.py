"""Rollback on SQLite and Postgres: exact restore by primary key, live rows untouched, conflicts, dry run, SQL script.

One module-scoped database per dialect is seeded with the staging scenario and backfilled by ``PrismJob`` in batches
(recording changes as apply does), while a "live" user adds sessions and edits a profile the run never touched; each
test then works on its own copy. Content digests cover every PRISM table: rows sorted by primary key, values
normalised, sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gatefill import ledger, rollback
from gatefill.commands import rollback_environment
from gatefill.db import Database, JSONValue, TextArray, UTCTimestamp, UUIDText
from gatefill.errors import DataError
from gatefill.job import RowChange, WrittenTable
from gatefill.jobs import get_job
from gatefill.ledger import IllegalTransition, RunNotFound, RunStatus
from gatefill.prism import schema
from gatefill.prism.job import PrismJob
from gatefill.prism.sandbox.seed import seed_scenario
from gatefill.reports.rollback import render_rollback, write_rollback_report
from gatefill.reports.rollback_sql import _literal, _sqlite_real, rollback_sql, write_rollback_sql
from gatefill.rollback import (
    RollbackConflicts,
    RollbackResult,
    RollbackVerificationFailed,
    load_changes,
    plan_rollback,
)
from tests.conftest import Target, create_pg_database, drop_pg_database, pg_env, sqlite_env

RUN = "apply-20250917T090000Z-rbtest"
APPLY_AT = datetime(2025, 9, 17, 9, 0, tzinfo=UTC)
ROLLBACK_AT = datetime(2025, 9, 17, 12, 0, tzinfo=UTC)
JOB = PrismJob()
TABLES = JOB.written_tables()
META = schema.METADATA
Excluded = Mapping[str, set[str]]


def rollback_run(
    db: Database, run_id: str, tables: Sequence[WrittenTable], *, artifacts_dir: Path, **options: Any
) -> RollbackResult:
    """A rollback as ``gatefill rollback`` runs it: the phase, its report, then its refusal or failure raised."""
    result = rollback.rollback_run(db, run_id, tables, artifacts_dir=artifacts_dir, **options)
    result = write_rollback_report(result, artifacts_dir)
    result.raise_for_verdict()
    return result


# ---------------------------------------------------------------------------------------------------- digests

Snapshot = dict[str, dict[str, str]]


def _pk(table: sa.Table) -> list[str]:
    return [c.name for c in table.primary_key.columns]


#: Tables the backfill or the live users write; every other PRISM table is hashed whole (faster, same strictness).
KEYED = frozenset({"assessment_sessions", "fc_scores", "profiles", "fn_logs"})


def snapshot(db: Database) -> Snapshot:
    """table → row_key → the row exactly as stored: SQLite's raw values, Postgres's canonical text of the row.

    Raw storage is stricter than value equality: JSON text, timestamp text and float bits must all be restored.
    Tables outside ``KEYED`` appear as one entry holding the hash of all their rows in primary-key order.
    """
    out: Snapshot = {}
    with db.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        for name, table in sorted(META.tables.items()):
            pk = _pk(table)
            if db.caps.dialect == "postgresql":
                query = (
                    f"SELECT {', '.join(f't.{c}::text' for c in pk)}, t::text FROM {name} t ORDER BY {', '.join(pk)}"
                )
            else:
                query = f"SELECT {', '.join(pk)}, * FROM {name} ORDER BY {', '.join(pk)}"
            cursor.execute(query)
            fetched = cursor.fetchall()
            if name not in KEYED:
                out[name] = {"<all rows>": f"{len(fetched)}:{hashlib.sha256(repr(fetched).encode()).hexdigest()}"}
                continue
            out[name] = {
                ledger.row_key(dict(zip(pk, row[: len(pk)], strict=True))): repr(tuple(row[len(pk) :]))
                for row in fetched
            }
        cursor.close()
    return out


def digests(db: Database | Snapshot, exclude: Excluded | None = None, only: Excluded | None = None) -> dict[str, str]:
    """table → row count and sha256 over its rows sorted by key; ``exclude`` drops keys, ``only`` keeps just those."""
    snap = snapshot(db) if isinstance(db, Database) else db
    out = {}
    for name, rows in snap.items():
        keys = sorted(rows)
        if exclude is not None:
            keys = [k for k in keys if k not in exclude.get(name, set())]
        if only is not None:
            keys = [k for k in keys if k in only.get(name, set())]
        h = hashlib.sha256()
        for key in keys:
            h.update(f"{key}\t{rows[key]}\n".encode())
        out[name] = f"{len(keys)}:{h.hexdigest()[:16]}"
    return out


# ---------------------------------------------------------------------------------------------------- applied data


@dataclass(frozen=True)
class Applied:
    """What the module's backfill did: digests before it, the live rows written meanwhile, the run's changes."""

    pre: dict[str, str]
    live: dict[str, set[str]]
    live_digest: dict[str, str]
    inserted: dict[str, list[str]]  # table → row_keys the run inserted
    updated: dict[str, list[str]]  # table → row_keys the run updated (before-images exist)


def _live_session(conn: sa.Connection, at: datetime, live: dict[str, set[str]]) -> None:
    """A respondent finishing while the backfill runs: session, fc_scores, profile and a log row of their own."""
    sid = str(uuid.uuid4())
    conn.execute(
        schema.assessment_sessions.insert().values(
            id=sid,
            started_at=at,
            created_at=at,
            updated_at=at,
            completed_at=at,
            status="completed",
            total_questions=248,
            completed_questions=248,
            share_token=str(uuid.uuid4()),
        )
    )
    conn.execute(
        schema.fc_scores.insert().values(
            session_id=sid,
            version="v1.2",
            fc_kind="functions",
            scores_json={"Te": 100, "Fi": 61.54, "Ne": 12.5},
            blocks_answered=6,
            created_at=at,
        )
    )
    pid = str(uuid.uuid4())
    conn.execute(
        schema.profiles.insert().values(
            id=pid,
            session_id=sid,
            type_code="LIVE",
            score_fit_raw=0.1 + 0.2,
            results_version="v1.2.1",
            share_token=str(uuid.uuid4()),
            created_at=at,
            updated_at=at,
        )
    )
    log_id = conn.execute(
        schema.fn_logs.insert()
        .values(evt="live_finalize", payload={"session_id": sid}, at=at)
        .returning(schema.fn_logs.c.id)
    ).scalar_one()
    live.setdefault("assessment_sessions", set()).add(ledger.row_key({"id": sid}))
    live.setdefault("fc_scores", set()).add(
        ledger.row_key({"session_id": sid, "version": "v1.2", "fc_kind": "functions"})
    )
    live.setdefault("profiles", set()).add(ledger.row_key({"id": pid}))
    live.setdefault("fn_logs", set()).add(ledger.row_key({"id": log_id}))


def _record(conn: sa.Connection, batch_no: int, changes: Sequence[Any], at: datetime) -> None:
    ledger.record_row_changes(conn, RUN, batch_no, changes, at=at, tables=TABLES)


def build_applied(db: Database) -> Applied:
    """Seeds, backfills in batches of 5 (with live writes in between) and returns what happened."""
    report = seed_scenario(db, "staging-2025-09-17")
    ledger.init_ledger(db)
    # A profile the run never touches, which a live user edits mid-run: it must keep the live edit.
    with db.connect() as conn:
        edited = conn.execute(
            sa.select(schema.profiles.c.id).where(schema.profiles.c.session_id == report.completed[0])
        ).scalar_one()
    live: dict[str, set[str]] = {"profiles": {ledger.row_key({"id": edited})}}
    pre = digests(db, exclude=live)
    with db.begin() as conn:
        ledger.create_run(
            conn,
            run_id=RUN,
            phase="apply",
            environment="test",
            job=JOB.name,
            versions=JOB.versions,
            params={},
            now=APPLY_AT,
        )
        ledger.transition(conn, RUN, RunStatus.RUNNING, now=APPLY_AT)
        candidates = [
            c
            for c in JOB.discover(conn, {"since": datetime(2025, 8, 1, tzinfo=UTC), "profiles": "stale"})
            if c.operations
        ]
    assert len(candidates) == 49  # 39 missing rows + 10 stale profiles rescored
    for batch_no, start in enumerate(range(0, len(candidates), 5)):
        at = APPLY_AT + timedelta(seconds=15 * batch_no)
        with db.begin() as conn:
            outcome = JOB.process_batch(conn, candidates[start : start + 5], now=at, run_id=RUN)
            _record(conn, batch_no, outcome.changes, at)
        if batch_no in (1, 6):
            with db.begin() as conn:
                _live_session(conn, at + timedelta(seconds=5), live)
        if batch_no == 3:
            with db.begin() as conn:
                conn.execute(
                    schema.profiles.update().where(schema.profiles.c.id == edited).values(type_code="EDITED-LIVE")
                )
    with db.begin() as conn:
        ledger.transition(conn, RUN, RunStatus.SUCCEEDED, now=APPLY_AT + timedelta(minutes=5))
        inserted: dict[str, list[str]] = {}
        updated: dict[str, list[str]] = {}
        for change in ledger.changes_for(conn, RUN):
            (inserted if change.before is None else updated).setdefault(change.table, []).append(change.row_key)
    assert len(inserted["fc_scores"]) == 39 and len(inserted["profiles"]) == 13 and len(updated["profiles"]) == 10
    return Applied(pre, live, digests(db, only=live), inserted, updated)


@pytest.fixture(scope="module")
def applied_sqlite(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Applied]:
    path = tmp_path_factory.mktemp("applied") / "applied.db"
    shutil.copyfile(sqlite_template, path)
    db = Database(sqlite_env(path))
    try:
        info = build_applied(db)
    finally:
        db.dispose()
    return path, info


@pytest.fixture(scope="module")
def applied_pg(pg_template: str) -> Iterator[tuple[str, Applied]]:
    name = create_pg_database(pg_template)
    db = Database(pg_env(name))
    try:
        info = build_applied(db)
    finally:
        db.dispose()
    yield name, info
    drop_pg_database(name)


@dataclass
class Case:
    """A private copy of the applied database of one dialect."""

    target: Target
    info: Applied
    artifacts: Path

    @property
    def db(self) -> Database:
        return self.target.db


@pytest.fixture(params=["sqlite", "postgresql"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    if request.param == "sqlite":
        source, info = request.getfixturevalue("applied_sqlite")
        path = tmp_path / "prism.db"
        shutil.copyfile(source, path)
        env = sqlite_env(path)
        db = Database(env)
        try:
            yield Case(Target("sqlite", env, db), info, tmp_path / "artifacts")
        finally:
            db.dispose()
        return
    template, info = request.getfixturevalue("applied_pg")
    name = create_pg_database(template)
    env = pg_env(name)
    db = Database(env)
    try:
        yield Case(Target("postgresql", env, db), info, tmp_path / "artifacts")
    finally:
        db.dispose()
        drop_pg_database(name)


def status_of(db: Database) -> RunStatus:
    with db.connect() as conn:
        return ledger.get_run(conn, RUN).status


def assert_restored(case: Case) -> None:
    """Each PRISM table equals its pre-apply content (live rows aside); the live rows are as their users left them."""
    snap = snapshot(case.db)
    assert digests(snap, exclude=case.info.live) == case.info.pre
    assert digests(snap, only=case.info.live) == case.info.live_digest


def failed_statement(done: subprocess.CompletedProcess[str], path: Path) -> str:
    """The script line a failed psql/sqlite3 run names in its error message."""
    found = re.search(r"(?:near line |\.sql:)(\d+)", done.stderr)
    assert found, done.stderr
    return path.read_text().splitlines()[int(found.group(1)) - 1]


def run_script(case: Case, path: Path) -> subprocess.CompletedProcess[str]:
    """Executes a rollback script the way an operator would: psql, or the sqlite3 shell reading stdin."""
    if case.target.dialect == "postgresql":
        url = case.target.url.replace("postgresql+psycopg://", "postgresql://", 1)
        cmd = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    db_path = case.target.url.removeprefix("sqlite:///")
    with path.open("rb") as script:
        done = subprocess.run(["sqlite3", db_path], stdin=script, capture_output=True, timeout=120, check=False)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


# ---------------------------------------------------------------------------------------------------- tests


def test_rollback_restores_pre_apply_content_and_leaves_live_rows_untouched(case: Case) -> None:
    info = case.info
    assert digests(case.db, exclude=info.live) != info.pre  # the backfill did change things

    result = rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts)

    assert result.verdict == "PASS" and result.committed and not result.dry_run and not result.forced
    counts = {t.table: t for t in result.tables}
    assert (counts["fc_scores"].inserted_by_run, counts["fc_scores"].deleted) == (39, 39)
    assert (counts["profiles"].inserted_by_run, counts["profiles"].deleted) == (13, 13)
    assert (counts["profiles"].updated_by_run, counts["profiles"].replaced, counts["profiles"].restored) == (10, 10, 10)
    n_logs = len(info.inserted["fn_logs"])
    assert (counts["fn_logs"].inserted_by_run, counts["fn_logs"].deleted, counts["fn_logs"].already_absent) == (
        n_logs,
        n_logs,
        0,
    )
    assert [c.evidence["measured"] for c in result.verification] == [
        c.evidence["expected"] for c in result.verification
    ]
    assert_restored(case)
    assert status_of(case.db) is RunStatus.ROLLED_BACK
    with case.db.connect() as conn:
        reason = conn.execute(
            sa.select(ledger.run_events.c.reason).where(
                ledger.run_events.c.run_id == RUN, ledger.run_events.c.to_status == "rolled_back"
            )
        ).scalar_one()
    assert reason == f"rollback: {13 + 39 + n_logs} inserted rows deleted, 10 before-images restored"

    report = (case.artifacts / RUN / "rollback_report.md").read_text()
    assert result.report_path == case.artifacts / RUN / "rollback_report.md"
    assert "**PASS**" in report and "succeeded → rolled_back" in report
    assert "| profiles | 13 | 13 | 0 | 10 | 10 |" in report and "| fc_scores | 39 | 39 | 0 | 0 | 0 |" in report
    assert "| profiles: before-images restored exactly | 10 | 10 | PASS |" in report
    lines = render_rollback(result)
    assert lines[0].endswith(": PASS") and any("10/10 before-images restored" in line for line in lines)

    # A second rollback of the same run is refused in one line, and changes nothing.
    with pytest.raises(IllegalTransition) as refused:
        rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts)
    assert "is rolled_back; it cannot become rolled_back" in str(refused.value) and "\n" not in str(refused.value)
    assert_restored(case)


def test_plan_is_read_only_lists_no_conflicts_and_counts_the_changes(case: Case) -> None:
    before = digests(case.db)
    with case.db.connect() as conn:
        plan = plan_rollback(conn, RUN, TABLES)
        changes = load_changes(conn, RUN, TABLES)
    assert plan.conflicts == () and plan.status is RunStatus.SUCCEEDED and plan.allowed
    assert plan.changes == len(changes) and [c.seq for c in changes] == sorted(c.seq for c in changes)
    n_logs = len(case.info.inserted["fn_logs"])
    assert {t.table: (t.inserted_by_run, t.updated_by_run) for t in plan.tables} == {
        "fc_scores": (39, 0),
        "profiles": (13, 10),
        "fn_logs": (n_logs, 0),
    }
    assert sum(not c.inserted and c.before is not None for c in changes) == 10
    assert all(isinstance(c.key["id"], int) for c in changes if c.table == "fn_logs")  # typed back from row_key
    assert digests(case.db) == before
    with pytest.raises(RunNotFound), case.db.connect() as conn:
        plan_rollback(conn, "apply-nope", TABLES)
    with pytest.raises(DataError, match="column types of table 'fc_scores'"), case.db.connect() as conn:
        # Without the definitions, SQLite could not tell JSON or timestamps from text.
        plan_rollback(conn, RUN, (WrittenTable("fc_scores", ("session_id", "version", "fc_kind")),))


def _make_conflicts(case: Case) -> dict[str, str]:
    """A live user edits a profile the run inserted and one it rescored, and deletes an fc_scores row it inserted."""
    info = case.info
    inserted_profile = json.loads(info.inserted["profiles"][0])["id"]
    updated_profile = json.loads(info.updated["profiles"][0])["id"]
    deleted_fc = json.loads(info.inserted["fc_scores"][0])
    with case.db.begin() as conn:
        for pid in (inserted_profile, updated_profile):
            conn.execute(schema.profiles.update().where(schema.profiles.c.id == pid).values(type_code="USER-EDIT"))
        conn.execute(
            schema.fc_scores.delete().where(
                schema.fc_scores.c.session_id == deleted_fc["session_id"],
                schema.fc_scores.c.version == deleted_fc["version"],
                schema.fc_scores.c.fc_kind == deleted_fc["fc_kind"],
            )
        )
    return {"inserted": inserted_profile, "updated": updated_profile, "fc": deleted_fc["session_id"]}


def test_conflicts_refuse_listing_the_rows_and_force_restores_anyway(case: Case) -> None:
    edited = _make_conflicts(case)
    everything = digests(case.db)

    with pytest.raises(RollbackConflicts) as refused:
        rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts)
    message = str(refused.value)
    assert "\n" not in message and refused.value.exit_code == 1
    assert message.startswith(f"rollback of run {RUN} refused, nothing changed: 3 row(s) changed since")
    assert edited["inserted"] in message and edited["updated"] in message and edited["fc"] in message
    assert "type_code" in message and "updated_at" in message  # the trigger re-stamped updated_at
    assert "deleted since the run wrote it" in message and message.endswith(
        "use --force to restore the before-images anyway"
    )
    assert digests(case.db) == everything and status_of(case.db) is RunStatus.SUCCEEDED
    report = (case.artifacts / RUN / "rollback_report.md").read_text()
    assert "**REFUSED**" in report and report.count('| profiles | `{"id":') == 2

    result = rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts, force=True)
    assert result.verdict == "PASS" and result.forced and len(result.conflicts) == 3
    counts = {t.table: t for t in result.tables}
    assert counts["fc_scores"].already_absent == 1 and counts["fc_scores"].deleted == 38
    assert_restored(case)  # the rescored profile is back to its before-image, the user's edit notwithstanding
    assert status_of(case.db) is RunStatus.ROLLED_BACK
    with case.db.connect() as conn:
        reason = conn.execute(
            sa.select(ledger.run_events.c.reason).where(
                ledger.run_events.c.run_id == RUN, ledger.run_events.c.to_status == "rolled_back"
            )
        ).scalar_one()
    assert reason is not None and reason.endswith("forced over 3 conflict(s)")
    assert "yes (--force)" in (case.artifacts / RUN / "rollback_report.md").read_text()


def test_dry_run_executes_verifies_and_changes_nothing(case: Case) -> None:
    everything = digests(case.db)
    result = rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts, dry_run=True)
    assert result.dry_run and not result.committed and result.verdict == "PASS"
    assert {t.table: (t.deleted, t.restored) for t in result.tables} == {
        "fc_scores": (39, 0),
        "profiles": (13, 10),
        "fn_logs": (len(case.info.inserted["fn_logs"]), 0),
    }
    assert digests(case.db) == everything and status_of(case.db) is RunStatus.SUCCEEDED
    report = (case.artifacts / RUN / "rollback_dry_run.md").read_text()
    assert result.report_path == case.artifacts / RUN / "rollback_dry_run.md"
    assert "DRY RUN" in report and "succeeded (unchanged)" in report
    assert "  nothing was changed (dry run)" in render_rollback(result)

    # With conflicts a dry run reports them instead of refusing.
    _make_conflicts(case)
    everything = digests(case.db)
    result = rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts, dry_run=True)
    assert len(result.conflicts) == 3 and result.verdict == "PASS" and digests(case.db) == everything


def test_sql_script_gives_the_same_and_refuses_a_second_run(case: Case, tmp_path: Path) -> None:
    path = write_rollback_sql(
        case.db, RUN, TABLES, tmp_path / "backfill_logs" / "rollback_2025-09-17.sql", now=ROLLBACK_AT
    )
    text = path.read_text()
    assert text.startswith(f"-- gatefill rollback of run {RUN}\n-- environment: test (")
    assert "-- ledger changes: " in text and "profiles: 13 inserted, 10 updated" in text
    assert "created_at >=" not in text and ">= '" not in text  # keys only, never a timestamp window

    done = run_script(case, path)
    assert done.returncode == 0, done.stderr
    assert_restored(case)
    assert status_of(case.db) is RunStatus.ROLLED_BACK
    finals = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(finals) == 4 and all(line.endswith("|0") for line in finals), done.stdout

    # A second execution stops at the ledger check and changes nothing.
    restored = digests(case.db)
    again = run_script(case, path)
    assert again.returncode != 0 and "run may become rolled_back: " in failed_statement(again, path)
    assert digests(case.db) == restored


def test_sql_script_refuses_when_rows_changed_since_unless_generated_with_force(case: Case, tmp_path: Path) -> None:
    guarded = write_rollback_sql(case.db, RUN, TABLES, tmp_path / "guarded.sql", now=ROLLBACK_AT)
    forced = write_rollback_sql(case.db, RUN, TABLES, tmp_path / "forced.sql", now=ROLLBACK_AT, guard=False)
    _make_conflicts(case)
    everything = digests(case.db)
    done = run_script(case, guarded)
    assert done.returncode != 0 and "'unchanged since the run wrote it: " in failed_statement(done, guarded)
    assert digests(case.db) == everything and status_of(case.db) is RunStatus.SUCCEEDED
    done = run_script(case, forced)
    assert done.returncode == 0, done.stderr
    assert_restored(case)


_TAMPER = {
    "sqlite": [
        "CREATE TRIGGER gf_tamper AFTER INSERT ON profiles BEGIN "
        "UPDATE profiles SET type_code = 'TAMPERED' WHERE id = NEW.id; END"
    ],
    "postgresql": [
        "CREATE FUNCTION gf_tamper() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN NEW.type_code := 'TAMPERED'; RETURN NEW; END $$",
        "CREATE TRIGGER gf_tamper BEFORE INSERT ON profiles FOR EACH ROW EXECUTE FUNCTION gf_tamper()",
    ],
}


def test_failed_verification_commits_nothing_live_or_scripted(case: Case, tmp_path: Path) -> None:
    """A trigger that alters restored rows: verification catches it and the transaction never commits."""
    script = write_rollback_sql(case.db, RUN, TABLES, tmp_path / "rollback.sql", now=ROLLBACK_AT)
    with case.db.begin() as conn:
        for statement in _TAMPER[case.target.dialect]:
            conn.exec_driver_sql(statement)
    everything = digests(case.db)

    dry = rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts, dry_run=True)
    assert dry.verdict == "FAIL" and not dry.verified  # what apply's gate looks at
    with pytest.raises(RollbackVerificationFailed) as failed:
        rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts)
    message = str(failed.value)
    assert "\n" not in message and "profiles: 0 of 10 rows equal their before-image in every column" in message
    assert "fc_scores" not in message  # only the failing checks are named
    report = (case.artifacts / RUN / "rollback_report.md").read_text()
    assert "**FAIL**" in report and "FAILED verification" in report
    assert "differs from its before-image: type_code" in report
    assert digests(case.db) == everything and status_of(case.db) is RunStatus.SUCCEEDED

    done = run_script(case, script)
    assert done.returncode != 0 and "'verify: equals its before-image: profiles " in failed_statement(done, script)
    assert digests(case.db) == everything and status_of(case.db) is RunStatus.SUCCEEDED


def _same_result(result: RollbackResult) -> tuple[RollbackResult, str]:
    """A result without its report path, and the report it wrote: what paging must not change."""
    assert result.report_path is not None
    return dataclasses.replace(result, report_path=None), result.report_path.read_text()


def test_page_boundaries_change_nothing(case: Case, tmp_path: Path) -> None:
    """Pages of 1, 2 and 7 changes give the one-page result, report and script, byte for byte, live and scripted."""
    _make_conflicts(case)
    everything = digests(case.db)
    one_page = 100_000

    def dry(page_size: int) -> tuple[RollbackResult, str]:
        return _same_result(
            rollback_run(
                case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts, dry_run=True, page_size=page_size
            )
        )

    def script(page_size: int, guard: bool = True) -> bytes:
        path = tmp_path / f"rollback_{page_size}_{guard}.sql"
        write_rollback_sql(case.db, RUN, TABLES, path, now=ROLLBACK_AT, guard=guard, page_size=page_size)
        return path.read_bytes()

    expected = dry(one_page)
    assert len(expected[0].conflicts) == 3 and expected[0].verdict == "PASS"
    with case.db.connect() as conn:
        in_memory = rollback_sql(
            conn,
            load_changes(conn, RUN, TABLES),
            TABLES,
            run_id=RUN,
            environment=case.db.env.name,
            database=case.db.display_url,
            generated_at=ROLLBACK_AT,
        ).encode()
        for page_size in (1, 2, 7):
            assert plan_rollback(conn, RUN, TABLES, page_size=page_size) == plan_rollback(
                conn, RUN, TABLES, page_size=one_page
            )
    assert script(one_page) == in_memory
    for page_size in (1, 2, 7):
        assert dry(page_size) == expected, page_size
        assert script(page_size) == in_memory, page_size
        assert script(page_size, guard=False) == script(one_page, guard=False), page_size
    assert not list(tmp_path.glob("*.partial"))

    # Verification problems (a trigger alters every restored row) are listed in the same order whatever the pages.
    with case.db.begin() as conn:
        for statement in _TAMPER[case.target.dialect]:
            conn.exec_driver_sql(statement)
    tampered = dry(one_page)
    assert tampered[0].verdict == "FAIL" and len(tampered[0].notes) == 10
    for page_size in (1, 2, 7):
        assert dry(page_size) == tampered, page_size
    with case.db.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER gf_tamper" + (" ON profiles" if case.target.dialect == "postgresql" else ""))
    assert digests(case.db) == everything

    result = rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts, force=True, page_size=3)
    assert result.committed and result.verdict == "PASS" and len(result.conflicts) == 3
    assert_restored(case)


def test_rollback_holds_at_most_two_pages_of_changes(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pass reads the ledger a page at a time: LedgerChange objects alive at once never exceed two pages (the
    page being read and the one just used), however many changes the run has."""
    alive = {"now": 0, "peak": 0, "made": 0}

    class Counted(rollback.LedgerChange):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            alive["now"] += 1
            alive["made"] += 1
            alive["peak"] = max(alive["peak"], alive["now"])

        def __del__(self) -> None:
            alive["now"] -= 1

    monkeypatch.setattr(rollback, "LedgerChange", Counted)
    page_size = 5
    with case.db.connect() as conn:
        n_changes = plan_rollback(conn, RUN, TABLES, page_size=page_size).changes
    assert n_changes > 20 * page_size
    for run in (
        lambda: rollback_run(
            case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts, dry_run=True, page_size=page_size
        ),
        lambda: write_rollback_sql(
            case.db, RUN, TABLES, tmp_path / "rollback.sql", now=ROLLBACK_AT, page_size=page_size
        ),
        lambda: rollback_run(case.db, RUN, TABLES, now=ROLLBACK_AT, artifacts_dir=case.artifacts, page_size=page_size),
    ):
        alive.update(now=0, peak=0, made=0)
        run()
        assert alive["made"] >= 2 * n_changes  # every pass read every change...
        assert alive["peak"] <= 2 * page_size, alive  # ...but never more than two pages of them at once
    assert_restored(case)


def test_rollback_command_glue(case: Case) -> None:
    dry = rollback_environment(
        case.target.env, RUN, dry_run=True, force=False, artifacts_dir=case.artifacts, now=ROLLBACK_AT, find_job=get_job
    )
    assert dry.verdict == "PASS" and not dry.committed and dry.database == case.target.env.display_url
    real = rollback_environment(
        case.target.env, RUN, dry_run=False, force=False, artifacts_dir=case.artifacts, find_job=get_job
    )
    assert real.committed and real.status_after is RunStatus.ROLLED_BACK
    assert_restored(case)


def test_unknown_run_and_missing_ledger_are_usage_errors(target: Target, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    with pytest.raises(RunNotFound, match="it has no run ledger"):
        rollback_environment(target.env, RUN, dry_run=True, force=False, artifacts_dir=artifacts, find_job=get_job)
    ledger.init_ledger(target.db)
    with pytest.raises(RunNotFound) as unknown:
        rollback_environment(
            target.env, "apply-nope", dry_run=False, force=False, artifacts_dir=artifacts, find_job=get_job
        )
    assert unknown.value.exit_code == 2 and "unknown run 'apply-nope'" in str(unknown.value)
    assert not artifacts.exists()  # nothing written for a run that does not exist


# ---------------------------------------------------------------------------------------------------- literals


def test_sqlite_real_literals_are_exact() -> None:
    rng = random.Random(11)
    values = [0.1, 1 / 3, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, -123.456, 2.0**60 + 2**8, 90.0]
    values += [rng.random() * 10 ** rng.randint(-320, 300) * rng.choice((1, -1)) for _ in range(3000)]
    with sqlite3.connect(":memory:") as conn:
        for start in range(0, len(values), 200):
            part = values[start : start + 200]
            got = conn.execute("SELECT " + ", ".join(_sqlite_real(v) for v in part)).fetchone()
            assert list(got) == part
    assert _sqlite_real(0.5) == "(CAST(1 AS REAL) / 2)" and _sqlite_real(90.0) == "90.0"


KINDS = sa.MetaData()
odd = sa.Table(
    "gatefill_rollback_odd",
    KINDS,
    sa.Column("id", UUIDText(), primary_key=True),
    sa.Column("n", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("label", sa.Text()),
    sa.Column("doc", JSONValue()),
    sa.Column("tags", TextArray()),
    sa.Column("at", UTCTimestamp()),
    sa.Column("x", sa.Float(53)),
    sa.Column("flag", sa.Boolean()),
    sa.Column("big", sa.BigInteger()),
)
ODD_TABLES = (WrittenTable("gatefill_rollback_odd", ("id", "n")),)
NASTY = [
    "it's a 'quote'",
    "back\\slash \\x41 E'\\n'",
    "line\nbreak\r\nCRLF\ttab",
    "Ünïcödé 😀 — “curly” \u2028",
    "'); DROP TABLE profiles; --",
    "$$dollar$$ $gatefill$",
    "",
]


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in values.items()}


def _raw(db: Database) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM gatefill_rollback_odd ORDER BY id, n")]


def test_script_literals_round_trip_every_column_kind_exactly(target: Target, tmp_path: Path) -> None:
    rng = random.Random(5)
    KINDS.create_all(target.db.engine)
    ledger.init_ledger(target.db)
    originals = []
    for i, text in enumerate(NASTY):
        originals.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "n": i,
                "label": text,
                "doc": {"s": text, "list": [1, 2.5, -0.001, 1e300, 5e-324, True, None], "k'ey": {"nested": text}},
                "tags": [text, "b", "NULL", 'with "dq"'] if i % 3 else [],
                "at": datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) + timedelta(days=i, microseconds=i),
                "x": rng.random() * 10 ** rng.randint(-300, 300),
                "flag": bool(i % 2),
                "big": 2**62 + i,
            }
        )
    originals.append(
        {"id": str(uuid.uuid4()), "n": 99, **{c: None for c in ("label", "doc", "tags", "at", "x", "flag", "big")}}
    )
    with target.db.begin() as conn:
        conn.execute(odd.insert(), originals)
    raw_before = _raw(target.db)
    with target.db.begin() as conn:
        ledger.create_run(
            conn, run_id="odd", phase="apply", environment="test", job="odd", versions={}, params={}, now=APPLY_AT
        )
        stored = [dict(r._mapping) for r in conn.execute(sa.select(odd))]
        changes = []
        for row in stored:
            new = {**row, "label": "changed", "x": math.pi, "doc": {"v": 2}}
            conn.execute(odd.update().where(odd.c.id == row["id"], odd.c.n == row["n"]).values(**new))
            changes.append((row, new))
        fresh = {"id": str(uuid.uuid4()), "n": 7, "label": "inserted by the run", "doc": [1], "at": APPLY_AT, "x": 0.1}
        conn.execute(odd.insert().values(**fresh))
        after_fresh = dict(conn.execute(sa.select(odd).where(odd.c.n == 7)).one()._mapping)
        recorded = [RowChange(odd.name, {"id": b["id"], "n": b["n"]}, _plain(b), a, "odd") for b, a in changes]
        recorded.append(RowChange(odd.name, {"id": fresh["id"], "n": 7}, None, after_fresh, "odd"))
        ledger.record_row_changes(
            conn, "odd", 0, recorded, at=APPLY_AT, tables=(WrittenTable(odd.name, ("id", "n"), odd),)
        )
        ledger.transition(conn, "odd", RunStatus.CANCELLED, now=APPLY_AT)
    assert _raw(target.db) != raw_before

    with target.db.connect() as conn:
        script = rollback_sql(
            conn,
            load_changes(conn, "odd", ODD_TABLES, metadata=KINDS),
            ODD_TABLES,
            run_id="odd",
            environment="test",
            database=target.env.display_url,
            generated_at=ROLLBACK_AT,
            metadata=KINDS,
        )
    path = tmp_path / "odd.sql"
    path.write_text(script, encoding="utf-8")
    probe = Case(target, Applied({}, {}, {}, {}, {}), tmp_path)
    done = run_script(probe, path)
    assert done.returncode == 0, done.stderr
    assert _raw(target.db) == raw_before  # byte-for-byte on SQLite, value-for-value through psycopg on Postgres

    # The live rollback of the same changes (re-applied) restores the same bytes.
    with target.db.begin() as conn:
        conn.execute(odd.delete())
        conn.execute(odd.insert(), [a for _, a in changes] + [after_fresh])
        conn.execute(ledger.runs.update().where(ledger.runs.c.id == "odd").values(status="cancelled"))
    result = rollback_run(target.db, "odd", ODD_TABLES, now=ROLLBACK_AT, artifacts_dir=tmp_path, metadata=KINDS)
    assert result.verdict == "PASS" and _raw(target.db) == raw_before

    # Float literals evaluate to the very same double on this dialect, across the whole exponent range.
    pg = target.dialect == "postgresql"
    floats = [rng.random() * 10 ** rng.randint(-320, 300) * rng.choice((1, -1)) for _ in range(1000)]
    with target.db.connect() as conn:
        for start in range(0, len(floats), 250):
            part = floats[start : start + 250]
            got = conn.exec_driver_sql("SELECT " + ", ".join(_literal("float", v, pg) for v in part)).one()
            assert list(got) == part
