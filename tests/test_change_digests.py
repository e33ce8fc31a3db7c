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
from gatefill.db import JSONValue, UTCTimestamp
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
    kinds = Counter((c.table, c.before is None) for c in changes)
    assert kinds[("fc_scores", True)] > 0 and kinds[("profiles", True)] > 0 and kinds[("profiles", False)] > 0
    # No after-image anywhere: a digest of the whole row, which is the row as it reads back now.
    assert all(c.after is None and c.after_columns is None and c.after_digest for c in changes)
    with target.db.connect() as conn:
        for c in changes:
            row = _row(conn, c.table, c.row_key)
            assert row is not None and row_digest(TABLES[c.table], row) == c.after_digest  # type: ignore[arg-type]

    gate = measure_backfill_gate(
        target.db, target.env, PrismJob(), run_id, clock=SimulatedClock(LATER), artifacts_dir=tmp_path / "art"
    )
    verdicts = {c.name: c.verdict for c in gate.checks}
    assert verdicts["rows_present_as_written"] == "PASS" and verdicts["rollback_dry_run"] == "PASS"

    # A live user edits a profile the run updated: that row is a conflict, named with the edited column.
    updated = next(c for c in changes if c.table == "profiles" and c.before is not None)
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
            row = _row(conn, c.table, c.row_key)
            if c.before is None:
                assert row is None
            else:
                assert row is not None and row_digest(schema.profiles, row) == row_digest(schema.profiles, c.before)


_OLD_CHANGES = """CREATE TABLE gatefill_changes (
    id {id} PRIMARY KEY, run_id TEXT NOT NULL REFERENCES gatefill_runs(id) ON DELETE CASCADE,
    batch_no INTEGER NOT NULL, table_name TEXT NOT NULL, row_key TEXT NOT NULL, session_id TEXT,
    "before" {json}, "after" {json} NOT NULL, at {ts} NOT NULL,
    CONSTRAINT gatefill_changes_run_row UNIQUE (run_id, table_name, row_key))"""


def _old_changes_table(conn: sa.Connection, pg: bool) -> sa.Table:
    """Creates the per-row changes table of a ledger older than digests and change sets."""
    conn.exec_driver_sql(
        _OLD_CHANGES.format(
            id="BIGSERIAL" if pg else "INTEGER", json="JSONB" if pg else "TEXT", ts="TIMESTAMPTZ" if pg else "TEXT"
        )
    )
    return sa.Table(
        "gatefill_changes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        *(sa.Column(n, sa.Text) for n in ("run_id", "table_name", "row_key", "session_id")),
        sa.Column("batch_no", sa.Integer),
        sa.Column("before", JSONValue()),
        sa.Column("after", JSONValue()),
        sa.Column("at", UTCTimestamp()),
    )


def test_change_sets_are_compact_and_read_back_whole(target: Target, seeder: Seeder, tmp_path: Path) -> None:
    """A set per batch and table: entries without trailing nulls, digests in base64url, and the candidate left out
    where a key column holds it (fc_scores, keyed by session); read back, every change has its candidate and the
    hex digest of the row as it is now."""
    run_id = _applied(target, seeder, tmp_path)
    with target.db.connect() as conn:
        sets = conn.execute(sa.select(ledger.change_sets).where(ledger.change_sets.c.run_id == run_id)).all()
        assert ledger.count_changes(conn, run_id) == sum(s.rows for s in sets) == len(_changes(target, run_id))
    keyed = {s.table_name: s.candidate_key for s in sets}
    assert keyed == {"fc_scores": "session_id", "profiles": None, "fn_logs": None}
    fc_entries = [e for s in sets if s.table_name == "fc_scores" for e in json.loads(s.entries)]
    assert fc_entries and all(len(e) == 2 and "." not in e[1] for e in fc_entries)  # [key, digest]: an insert
    changes = _changes(target, run_id)
    assert all(c.candidate for c in changes)
    assert all(c.candidate == c.key["session_id"] for c in changes if c.table == "fc_scores")
    with target.db.connect() as conn:
        assert all(row_digest(TABLES[c.table], _row(conn, c.table, c.row_key)) == c.after_digest for c in changes)  # type: ignore[arg-type]


def test_a_ledger_from_before_digests_still_rolls_back_its_runs(target: Target, seeder: Seeder, tmp_path: Path) -> None:
    """A run recorded by an older gatefill (a row per change, whole after-images, no digest): ``init_ledger`` moves
    its changes into sets in their order, and rollback compares with the images (conflicts named by column, as they
    always were) and restores exactly."""
    run_id = _applied(target, seeder, tmp_path)
    recorded = _changes(target, run_id)
    pg = target.dialect != "sqlite"
    with target.db.begin() as conn:
        old = _old_changes_table(conn, pg)
        for c in recorded:
            image = _row(conn, c.table, c.row_key)
            plain = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in (image or {}).items()}
            values = {"run_id": run_id, "batch_no": c.batch_no, "table_name": c.table, "row_key": c.row_key}
            values |= {"session_id": c.candidate, "before": c.before, "after": plain, "at": START}
            conn.execute(old.insert().values(**values))
        conn.execute(ledger.change_sets.delete().where(ledger.change_sets.c.run_id == run_id))
    ledger.init_ledger(target.db)
    moved = _changes(target, run_id)
    with target.db.connect() as conn:
        assert not sa.inspect(conn).has_table("gatefill_changes")
    assert [(c.table, c.row_key, c.before) for c in moved] == [(c.table, c.row_key, c.before) for c in recorded]
    assert all(c.after is not None and c.after_digest is None for c in moved)
    inserted = next(c for c in moved if c.table == "profiles" and c.before is None)
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
    with target.db.connect() as conn:
        assert all((_row(conn, c.table, c.row_key) is None) == (c.before is None) for c in moved)


def test_the_old_changes_table_is_moved_into_change_sets(target: Target) -> None:
    """``init_ledger`` on a ledger whose gatefill_changes has the oldest columns (after NOT NULL, no digest): its
    rows become change sets (one per run, batch and table, in id order), the recorded after-images stay, and the old
    table is dropped; a second ``init_ledger`` changes nothing."""
    pg = target.dialect != "sqlite"
    with target.db.begin() as conn:
        for table in ledger.LEDGER_METADATA.sorted_tables:
            table.create(conn, checkfirst=True)
        ledger.create_run(
            conn, run_id="old", phase="apply", environment="test", job="j", versions={}, params={}, now=START
        )
        old = _old_changes_table(conn, pg)
        for i, (batch, table) in enumerate([(1, "t"), (1, "t"), (1, "u"), (2, "t")]):
            key, after = json.dumps({"id": str(i)}), {"id": i, "v": "x"}
            conn.execute(
                old.insert().values(run_id="old", batch_no=batch, table_name=table, row_key=key, after=after, at=START)
            )
    ledger.init_ledger(target.db)
    ledger.init_ledger(target.db)  # idempotent
    with target.db.connect() as conn:
        assert not sa.inspect(conn).has_table("gatefill_changes")
        sets = conn.execute(sa.select(ledger.change_sets).order_by(ledger.change_sets.c.id)).all()
        rows = ledger.changes_for(conn, "old")
        assert ledger.count_changes(conn, "old") == 4
    assert [(s.batch_no, s.table_name, s.rows) for s in sets] == [(1, "t", 2), (1, "u", 1), (2, "t", 1)]
    assert [(r.batch_no, r.table, r.key) for r in rows] == [
        (1, "t", {"id": "0"}),
        (1, "t", {"id": "1"}),
        (1, "u", {"id": "2"}),
        (2, "t", {"id": "3"}),
    ]
    assert all(r.after == {"id": int(r.key["id"]), "v": "x"} and r.after_digest is None and r.inserted for r in rows)
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
