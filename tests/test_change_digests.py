"""The ledger keeps a digest of what a batch wrote, not its after-image: rollback, its dry run and the gate compare
rows with it exactly (inserted rows, updated rows, a live edit after the apply), on SQLite, Postgres and through
PgBouncer; ledgers written before digests still roll back their runs from their after-images."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ApplyOptions, apply_plan, measure_backfill_gate
from gatefill.clock import SimulatedClock
from gatefill.images import row_digest
from gatefill.ledger import RunStatus
from gatefill.plan import PlanParams, build_plan
from gatefill.prism import schema
from gatefill.prism.job import PrismJob
from gatefill.rollback import RollbackConflicts, rollback_run
from tests.conftest import Seeder, Target

pytestmark = pytest.mark.pooled

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)
LATER = datetime(2025, 9, 18, 9, 0, tzinfo=UTC)
TABLES = {t.name: t.table for t in PrismJob().written_tables()}


def _applied(target: Target, seeder: Seeder, tmp_path: Path) -> str:
    seeder(target, "staging-2025-09-17")
    files = build_plan(
        target.db,
        target.env,
        PrismJob(),
        PlanParams(since=SINCE, profiles="stale"),
        now=START,
        artifacts_dir=tmp_path / "art",
    )
    result = apply_plan(
        target.db,
        target.env,
        PrismJob(),
        files.plan,
        options=ApplyOptions(rate="unlimited", batch_size=7, approve_as="tester"),
        clock=SimulatedClock(START),
        artifacts_dir=tmp_path / "art",
    )
    assert result.status is RunStatus.SUCCEEDED
    return result.run_id


def _changes(target: Target, run_id: str) -> list[Any]:
    with target.db.connect() as conn:
        return list(ledger.changes_for(conn, run_id))


def _row(conn: sa.Connection, table: str, row_key: str) -> dict[str, Any] | None:
    t = TABLES[table]
    assert t is not None
    key = {k: int(v) if table == "fn_logs" else v for k, v in json.loads(row_key).items()}
    found = conn.execute(sa.select(t).where(*(t.c[k] == v for k, v in key.items()))).first()
    return dict(found._mapping) if found is not None else None


def test_digests_only_where_written_and_a_live_edit_is_a_named_conflict(
    target: Target, seeder: Seeder, tmp_path: Path
) -> None:
    run_id = _applied(target, seeder, tmp_path)
    changes = _changes(target, run_id)
    kinds = Counter((c.table_name, c.before is None) for c in changes)
    assert kinds[("fc_scores", True)] > 0 and kinds[("profiles", True)] > 0 and kinds[("profiles", False)] > 0
    # No after-image anywhere: a digest of the whole row, which is the row as it reads back now.
    assert all(c.after is None and c.after_columns is None and c.after_digest for c in changes)
    with target.db.connect() as conn:
        for c in changes:
            row = _row(conn, c.table_name, c.row_key)
            assert row is not None and row_digest(TABLES[c.table_name], row) == c.after_digest  # type: ignore[arg-type]

    gate = measure_backfill_gate(
        target.db, target.env, PrismJob(), run_id, clock=SimulatedClock(LATER), artifacts_dir=tmp_path / "art"
    )
    verdicts = {c.name: c.verdict for c in gate.checks}
    assert verdicts["rows_present_as_written"] == "PASS" and verdicts["rollback_dry_run"] == "PASS"

    # A live user edits a profile the run updated: that row is a conflict, named with the edited column.
    updated = next(c for c in changes if c.table_name == "profiles" and c.before is not None)
    pid = json.loads(updated.row_key)["id"]
    with target.db.begin() as conn:
        conn.execute(schema.profiles.update().where(schema.profiles.c.id == pid).values(type_code="LIVE"))
    gate = measure_backfill_gate(
        target.db, target.env, PrismJob(), run_id, clock=SimulatedClock(LATER), artifacts_dir=tmp_path / "art"
    )
    assert {c.name: c.verdict for c in gate.checks}["rows_present_as_written"] == "FAIL"
    with pytest.raises(RollbackConflicts) as refused:
        rollback_run(
            target.db, run_id, PrismJob().written_tables(), now=LATER, artifacts_dir=tmp_path / "art"
        ).raise_for_verdict()
    assert len(refused.value.conflicts) == 1 and "type_code" in refused.value.conflicts[0].columns
    assert pid in str(refused.value)

    # Forced, the before-images come back exactly and every row the run inserted is gone.
    done = rollback_run(
        target.db, run_id, PrismJob().written_tables(), now=LATER, artifacts_dir=tmp_path / "art", force=True
    )
    assert done.verdict == "PASS" and done.committed
    with target.db.connect() as conn:
        for c in changes:
            row = _row(conn, c.table_name, c.row_key)
            if c.before is None:
                assert row is None
            else:
                assert row is not None and row_digest(schema.profiles, row) == row_digest(schema.profiles, c.before)


def test_a_ledger_from_before_digests_still_rolls_back_its_runs(target: Target, seeder: Seeder, tmp_path: Path) -> None:
    """Its changes hold whole after-images and no digest: rollback compares with the images (conflicts named by
    column, as they always were) and restores exactly."""
    run_id = _applied(target, seeder, tmp_path)
    with target.db.begin() as conn:
        for c in _changes(target, run_id):
            image = _row(conn, c.table_name, c.row_key)
            plain = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in (image or {}).items()}
            conn.execute(
                ledger.changes.update()
                .where(ledger.changes.c.id == c.id)
                .values(after=plain, after_digest=None, after_columns=None)
            )
    assert all(c.after is not None and c.after_digest is None for c in _changes(target, run_id))
    inserted = next(c for c in _changes(target, run_id) if c.table_name == "profiles" and c.before is None)
    with target.db.begin() as conn:
        conn.execute(
            schema.profiles.update()
            .where(schema.profiles.c.id == json.loads(inserted.row_key)["id"])
            .values(type_code="LIVE")
        )
    with pytest.raises(RollbackConflicts) as refused:
        rollback_run(
            target.db, run_id, PrismJob().written_tables(), now=LATER, artifacts_dir=tmp_path / "art"
        ).raise_for_verdict()
    assert [c.row_key for c in refused.value.conflicts] == [inserted.row_key]
    assert "type_code" in refused.value.conflicts[0].columns
    done = rollback_run(
        target.db, run_id, PrismJob().written_tables(), now=LATER, artifacts_dir=tmp_path / "art", force=True
    )
    assert done.verdict == "PASS" and done.committed


_OLD_CHANGES = """CREATE TABLE gatefill_changes (
    id {id} PRIMARY KEY, run_id TEXT NOT NULL REFERENCES gatefill_runs(id) ON DELETE CASCADE,
    batch_no INTEGER NOT NULL, table_name TEXT NOT NULL, row_key TEXT NOT NULL, session_id TEXT,
    "before" {json}, "after" {json} NOT NULL, at {ts} NOT NULL,
    CONSTRAINT gatefill_changes_run_row UNIQUE (run_id, table_name, row_key))"""


def test_the_old_changes_table_is_upgraded_in_place_keeping_its_rows(target: Target) -> None:
    """``init_ledger`` on a ledger whose gatefill_changes has the old columns (after NOT NULL, no digest): the
    digest columns are added, ``after`` may be NULL, and the recorded after-images stay."""
    pg = target.dialect != "sqlite"
    with target.db.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS gatefill_changes")
        for table in ledger.LEDGER_METADATA.sorted_tables:
            if table is not ledger.changes:
                table.create(conn, checkfirst=True)
        conn.exec_driver_sql(
            _OLD_CHANGES.format(
                id="BIGSERIAL" if pg else "INTEGER",
                json="JSONB" if pg else "TEXT",
                ts="TIMESTAMPTZ" if pg else "TEXT",
            )
        )
        ledger.create_run(
            conn, run_id="old", phase="apply", environment="test", job="j", versions={}, params={}, now=START
        )
        conn.exec_driver_sql(
            'INSERT INTO gatefill_changes (run_id, batch_no, table_name, row_key, "before", "after", at) '
            "VALUES ('old', 1, 't', '{\"id\":\"1\"}', NULL, '{\"id\": 1, \"v\": \"x\"}', '2025-09-17T18:05:30Z')"
        )
    ledger.init_ledger(target.db)
    ledger.init_ledger(target.db)  # idempotent
    with target.db.connect() as conn:
        columns = {c["name"]: c for c in sa.inspect(conn).get_columns("gatefill_changes")}
        rows = list(ledger.changes_for(conn, "old"))
    assert {"after_digest", "after_columns"} <= set(columns) and columns["after"]["nullable"]
    assert len(rows) == 1 and rows[0].after == {"id": 1, "v": "x"} and rows[0].after_digest is None
