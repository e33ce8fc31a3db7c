"""The seeded scenarios, checked against the database itself (never against the seeder's own report alone)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gatefill.db import Database, UTCTimestamp
from gatefill.errors import DatabaseError, UsageError
from gatefill.prism.sandbox.seed import SeedReport, seed_scenario
from gatefill.prism.schema import (
    PROFILE_RESULT_COLUMNS,
    assessment_responses,
    assessment_sessions,
    fc_options,
    fc_responses,
    fc_scores,
    fn_logs,
    profiles,
)
from gatefill.prism.scoring import ReferenceData, SessionInputs, score_fc_session, score_session
from tests.conftest import Target, create_pg_database, drop_pg_database, pg_env, sqlite_env

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
STAGING = "staging-2025-09-17"
PRODUCTION = "production-2025-09-18"
TEST_A = "618c5ea6-aeda-4084-9156-0aac9643afd3"
TEST_B = "070d9bf2-516f-44ee-87fc-017c7db9d29c"
DATA_TABLES = (assessment_sessions, assessment_responses, fc_responses, fc_scores, profiles, fn_logs)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def staging(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Database, SeedReport]]:
    """One seeded staging database per dialect, shared by the read-only tests of this module."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path_factory.mktemp("seed") / "staging.db"
        shutil.copyfile(template, path)
        db = Database(sqlite_env(path))
        name = None
    else:
        name = create_pg_database(request.getfixturevalue("pg_template"))
        db = Database(pg_env(name))
    try:
        yield db, seed_scenario(db, STAGING)
    finally:
        db.dispose()
        if name:
            drop_pg_database(name)


# Measured from the tables: completed since the window start, scorable (>= 148 answers, >= 1 resolvable FC answer).
_SCORABLE = """
    SELECT s.id FROM assessment_sessions s
    WHERE s.status = 'completed' AND s.created_at >= :since
      AND (SELECT count(*) FROM assessment_responses r WHERE r.session_id = s.id) >= 148
      AND EXISTS (SELECT 1 FROM fc_responses f JOIN fc_options o ON o.id = f.option_id WHERE f.session_id = s.id)
"""
_HAS_FC = (
    "EXISTS (SELECT 1 FROM fc_scores c WHERE c.session_id = s.id AND c.version = 'v1.2' AND c.fc_kind = 'functions')"
)
_HAS_PROFILE = "EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = s.id)"


def _sql(sql: str) -> sa.TextClause:
    """The statement with ``:since`` bound as a timestamp (SQLite compares the stored ISO text)."""
    clause = sa.text(sql)
    return clause.bindparams(sa.bindparam("since", SINCE, type_=UTCTimestamp())) if ":since" in sql else clause


def _ids(db: Database, where: str, base: str = _SCORABLE) -> set[str]:
    with db.connect() as conn:
        sql = f"SELECT id FROM assessment_sessions s WHERE s.id IN ({base}) AND {where}"
        return {str(r[0]) for r in conn.execute(_sql(sql))}


def test_staging_has_exactly_39_candidates_13_without_profile(staging: tuple[Database, SeedReport]) -> None:
    db, report = staging
    lacking_fc = _ids(db, f"NOT {_HAS_FC}")
    both = _ids(db, f"NOT {_HAS_FC} AND NOT {_HAS_PROFILE}")
    assert len(lacking_fc) == 39
    assert len(both) == 13
    assert lacking_fc - both == set(report.missing_fc_only)
    assert both == set(report.missing_both)
    assert sorted(lacking_fc) == report.candidates
    # Every other scorable session in the window is complete, or has a v1.2.0 profile (stale), never anything else.
    profile_versions = _ids(db, f"{_HAS_FC} AND {_HAS_PROFILE}")
    assert profile_versions == set(report.completed) | set(report.stale_profile)
    stale = _ids(db, "EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = s.id AND p.results_version = 'v1.2.0')")
    assert stale == set(report.stale_profile) and len(stale) == 10
    assert not _ids(db, f"{_HAS_FC} AND NOT {_HAS_PROFILE}")


def test_staging_plan_sessions_are_among_the_39(staging: tuple[Database, SeedReport]) -> None:
    _, report = staging
    assert report.priority == sorted([TEST_A, TEST_B])
    assert TEST_A in report.missing_fc_only and TEST_B in report.missing_both
    prefixes = sorted(s[:8] for s in report.recent_september)
    assert prefixes == sorted(["d5da8412", "fd85871b", "8c1c68bd", "21762d3d", "97a75815"])
    assert set(report.recent_september) <= set(report.candidates)
    september = [s for s in report.candidates if s not in report.priority + report.recent_september]
    assert len(september) == 32


def test_staging_traps_exist_and_are_not_candidates(staging: tuple[Database, SeedReport]) -> None:
    db, report = staging
    completed_in_window = "SELECT id FROM assessment_sessions WHERE status = 'completed' AND created_at >= :since"
    no_fc = _ids(db, "NOT EXISTS (SELECT 1 FROM fc_responses f WHERE f.session_id = s.id)", completed_in_window)
    assert no_fc == set(report.no_fc_responses) and len(no_fc) == 3
    unresolvable = _ids(
        db,
        "EXISTS (SELECT 1 FROM fc_responses f LEFT JOIN fc_options o ON o.id = f.option_id "
        "WHERE f.session_id = s.id AND o.id IS NULL)",
        completed_in_window,
    )
    assert unresolvable == set(report.unresolvable_fc_options) and len(unresolvable) == 1
    few = _ids(db, "(SELECT count(*) FROM assessment_responses r WHERE r.session_id = s.id) < 148", completed_in_window)
    assert few == set(report.insufficient_answers) and len(few) == 1
    for trap in (no_fc, unresolvable, few):
        assert not trap & set(report.candidates)
        assert not _ids(db, f"{_HAS_FC} OR {_HAS_PROFILE}", completed_in_window) & trap
    with db.connect() as conn:
        statuses = dict(conn.execute(sa.text("SELECT status, count(*) FROM assessment_sessions GROUP BY status")).all())
        unfinished_rows = conn.execute(
            sa.text(
                "SELECT count(*) FROM assessment_sessions s WHERE s.status <> 'completed' "
                f"AND ({_HAS_FC} OR {_HAS_PROFILE} OR s.completed_at IS NOT NULL)"
            )
        ).scalar_one()
    assert statuses["in_progress"] == len(report.in_progress) > 0
    assert statuses["abandoned"] == len(report.abandoned) > 0
    assert unfinished_rows == 0
    before = _ids(
        db, f"NOT ({_HAS_FC} AND {_HAS_PROFILE})", "SELECT id FROM assessment_sessions WHERE created_at < :since"
    )
    assert before == set(report.before_window_missing) and before


def test_staging_test_sessions_tally_to_the_worked_example(staging: tuple[Database, SeedReport]) -> None:
    db, _ = staging
    expected = {
        TEST_A: {"Te": 90, "Ti": 90, "Fe": 50, "Fi": 60, "Ne": 80, "Ni": 100, "Se": 70, "Si": 50},
        TEST_B: {"Te": 45.45, "Ti": 45.45, "Fe": 100, "Fi": 100, "Ne": 63.64, "Ni": 54.55, "Se": 72.73, "Si": 72.73},
    }
    with db.connect() as conn:
        options = {
            str(r.id): r.weights_json for r in conn.execute(sa.select(fc_options.c.id, fc_options.c.weights_json))
        }
        for sid, scores in expected.items():
            rows = conn.execute(
                sa.select(fc_responses.c.block_id, fc_responses.c.option_id, fc_options.c.option_code)
                .join(fc_options, fc_options.c.id == fc_responses.c.option_id)
                .where(fc_responses.c.session_id == sid)
            ).all()
            assert {r.option_code for r in rows} == {"A" if sid == TEST_A else "B"} and len(rows) == 6
            tally = score_fc_session([{"block_id": r.block_id, "option_id": r.option_id} for r in rows], options)
            assert tally.scores == scores and tally.blocks_answered == 6


def _inputs(conn: sa.Connection, sid: str, with_fc: bool) -> SessionInputs:
    r = assessment_responses
    answers = [
        dict(row._mapping)
        for row in conn.execute(
            sa.select(r.c.id, r.c.question_id, r.c.answer_value, r.c.created_at)
            .where(r.c.session_id == sid)
            .order_by(r.c.question_id)
        )
    ]
    fc = [
        dict(row._mapping)
        for row in conn.execute(
            sa.select(fc_responses.c.block_id, fc_responses.c.option_id).where(fc_responses.c.session_id == sid)
        )
    ]
    return SessionInputs(session_id=sid, answers=answers, fc_responses=fc if with_fc else [])


def _assert_rescored(db: Database, sids: list[str], with_fc: bool) -> None:
    """The stored rows equal what score_session computes from the stored answers right now."""
    ref = ReferenceData.from_package()
    with db.connect() as conn:
        for sid in sids:
            result = score_session(_inputs(conn, sid, with_fc), ref, datetime.now(UTC))
            stored = conn.execute(sa.select(profiles).where(profiles.c.session_id == sid)).one()._mapping
            assert result.profile_row is not None
            for column in PROFILE_RESULT_COLUMNS:
                assert stored[column] == result.profile_row[column], (sid, column)
            fc = conn.execute(sa.select(fc_scores.c.scores_json).where(fc_scores.c.session_id == sid)).scalar()
            assert fc == (result.fc_scores_row["scores_json"] if with_fc and result.fc_scores_row else None)


def test_staging_derived_rows_come_from_the_scorer(staging: tuple[Database, SeedReport]) -> None:
    db, report = staging
    _assert_rescored(db, report.completed[:4] + report.stale_profile[:1], with_fc=True)
    _assert_rescored(db, report.missing_fc_only[:3], with_fc=False)
    with db.connect() as conn:
        versions = dict(
            conn.execute(sa.text("SELECT results_version, count(*) FROM profiles GROUP BY results_version")).all()
        )
        types = conn.execute(sa.text("SELECT count(DISTINCT type_code) FROM profiles")).scalar_one()
    assert set(versions) == {"v1.2.0", "v1.2.1"}
    assert types >= 8  # latent types vary, so scored types do


def test_staging_timestamps_and_tokens_are_consistent(staging: tuple[Database, SeedReport]) -> None:
    db, _ = staging
    bad = {
        "completed without completed_at": "status = 'completed' AND completed_at IS NULL",
        "expiry not completed_at + 30 days": "status = 'completed' AND share_token_expires_at IS NULL",
        "unfinished with completed_at": "status <> 'completed' AND completed_at IS NOT NULL",
        "created after completed": "completed_at < created_at",
        "finalized before completed": "finalized_at < completed_at",
        "completed_questions off": "completed_questions <> (SELECT count(*) FROM assessment_responses r "
        "WHERE r.session_id = assessment_sessions.id)",
    }
    with db.connect() as conn:
        for what, where in bad.items():
            n = conn.execute(sa.text(f"SELECT count(*) FROM assessment_sessions WHERE {where}")).scalar_one()
            assert n == 0, what
        late = conn.execute(
            sa.text(
                "SELECT count(*) FROM assessment_responses r JOIN assessment_sessions s ON s.id = r.session_id "
                "WHERE r.created_at < s.started_at OR (s.completed_at IS NOT NULL AND r.created_at > s.completed_at)"
            )
        ).scalar_one()
        assert late == 0
        answers = conn.execute(
            sa.text("SELECT answer_value FROM assessment_responses WHERE question_id IN (129, 222) LIMIT 20")
        ).all()
        assert all(len(a[0]) > 1 for a in answers)  # FC answers are label text, never a bare letter
        odd = conn.execute(
            sa.text("SELECT count(*) FROM assessment_responses WHERE answer_value IN ('', 'n/a')")
        ).scalar_one()
        assert odd > 0
        no_key = conn.execute(sa.text("SELECT count(*) FROM assessment_responses WHERE question_id > 246")).scalar_one()
        assert no_key > 0


def test_staging_foreign_keys_enforced_again_after_the_trap(staging: tuple[Database, SeedReport]) -> None:
    db, report = staging
    row = {
        "session_id": report.completed[0],
        "block_id": "550e8400-e29b-41d4-a716-446655440001",
        "option_id": "00000000-0000-4000-8000-000000000000",
    }
    with pytest.raises(DatabaseError), db.begin() as conn:
        conn.execute(sa.delete(fc_responses).where(fc_responses.c.session_id == row["session_id"]))
        conn.execute(sa.insert(fc_responses).values(**row))


def _norm(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float):
        return repr(value)
    return value


def _digest(db: Database) -> str:
    h = hashlib.sha256()
    with db.connect() as conn:
        for table in DATA_TABLES:
            order = list(table.primary_key.columns)
            for row in conn.execute(sa.select(table).order_by(*order)):
                h.update(repr(tuple(_norm(v) for v in row)).encode())
    return h.hexdigest()


def test_same_seed_same_database_on_both_dialects(sqlite_target: Target, pg_target: Target) -> None:
    first = seed_scenario(sqlite_target.db, STAGING)
    second = seed_scenario(pg_target.db, STAGING)
    assert _digest(sqlite_target.db) == _digest(pg_target.db)
    assert first.categories == second.categories and first.counts == second.counts


def test_other_seed_other_database(sqlite_target: Target, tmp_path: Path, sqlite_template: Path) -> None:
    other_path = tmp_path / "other.db"
    shutil.copyfile(sqlite_template, other_path)
    other = Database(sqlite_env(other_path))
    try:
        one = seed_scenario(sqlite_target.db, "synthetic", sessions=30, seed=1)
        two = seed_scenario(other, "synthetic", sessions=30, seed=2)
        assert _digest(sqlite_target.db) != _digest(other)
        assert one.completed != two.completed
    finally:
        other.dispose()


def test_production_is_all_complete(target: Target) -> None:
    report = seed_scenario(target.db, PRODUCTION)
    db = target.db
    completed = "SELECT id FROM assessment_sessions WHERE status = 'completed' AND created_at >= :since"
    assert len(_ids(db, "true", completed)) == 157
    assert not _ids(db, f"NOT ({_HAS_FC} AND {_HAS_PROFILE})", completed)
    v121 = "EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = s.id AND p.results_version = 'v1.2.1')"
    assert len(_ids(db, v121, completed)) == 157
    assert report.candidates == [] and len(report.completed) == 157
    assert report.in_progress and report.abandoned and report.before_window
    assert not _ids(
        db, f"NOT ({_HAS_FC} AND {_HAS_PROFILE})", "SELECT id FROM assessment_sessions WHERE status = 'completed'"
    )


def test_synthetic_counts_fraction_and_integrity(target: Target) -> None:
    report = seed_scenario(target.db, "synthetic", sessions=200, missing_fraction=0.1, seed=7)
    db = target.db
    every = "SELECT id FROM assessment_sessions"
    assert len(_ids(db, "s.status = 'completed'", every)) == 200
    assert _ids(db, f"NOT {_HAS_FC} AND NOT {_HAS_PROFILE}", every) == set(report.missing_both)
    assert _ids(db, f"NOT {_HAS_FC} AND {_HAS_PROFILE}", every) == set(report.missing_fc_only)
    assert len(report.missing_both) == len(report.missing_fc_only) == 10
    with db.connect() as conn:
        counts = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in DATA_TABLES}
        orphans = conn.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM assessment_responses r WHERE NOT EXISTS "
                "(SELECT 1 FROM assessment_sessions s WHERE s.id = r.session_id)) + "
                "(SELECT count(*) FROM fc_responses f WHERE NOT EXISTS (SELECT 1 FROM fc_options o "
                "WHERE o.id = f.option_id)) + (SELECT count(*) FROM profiles p WHERE NOT EXISTS "
                "(SELECT 1 FROM assessment_sessions s WHERE s.id = p.session_id))"
            )
        ).scalar_one()
        outside = conn.execute(
            _sql(
                "SELECT count(*) FROM assessment_responses r JOIN assessment_sessions s ON s.id = r.session_id "
                "WHERE r.created_at < s.started_at OR r.created_at > s.completed_at OR r.updated_at <> r.created_at "
                "OR s.created_at < :since"
            )
        ).scalar_one()
    assert counts == {
        "assessment_sessions": 200,
        "assessment_responses": 200 * 248,
        "fc_responses": 1200,
        "fc_scores": 180,
        "profiles": 190,
        "fn_logs": 0,
    }
    assert {k: v for k, v in report.counts.items()} == counts
    assert orphans == 0 and outside == 0
    _assert_rescored(db, report.completed[:3], with_fc=True)
    _assert_rescored(db, report.missing_fc_only[:2], with_fc=False)


@pytest.mark.parametrize(
    ("scenario", "kwargs", "message"),
    [
        ("staging", {}, "unknown scenario"),
        ("synthetic", {"sessions": 0}, "sessions must be"),
        ("synthetic", {"sessions": True}, "sessions must be"),
        ("synthetic", {"missing_fraction": 1.5}, "missing_fraction must be"),
        (STAGING, {"sessions": 10}, "fixed size"),
        (STAGING, {"now": datetime(2025, 9, 1, tzinfo=UTC)}, "cannot be earlier"),
        (STAGING, {"now": datetime(2025, 9, 20)}, "time zone"),
    ],
)
def test_refusals_write_nothing(sqlite_target: Target, scenario: str, kwargs: dict[str, Any], message: str) -> None:
    before = _digest(sqlite_target.db)
    with pytest.raises(UsageError, match=message) as info:
        seed_scenario(sqlite_target.db, scenario, **kwargs)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert _digest(sqlite_target.db) == before


def test_existing_data_refused_unless_replace(target: Target) -> None:
    db = target.db
    seed_scenario(db, "synthetic", sessions=20, seed=3)
    before = _digest(db)
    with pytest.raises(UsageError, match="already holds PRISM data"):
        seed_scenario(db, PRODUCTION)
    assert _digest(db) == before
    with db.connect() as conn:
        reference = conn.execute(sa.select(sa.func.count()).select_from(fc_options)).scalar_one()
    report = seed_scenario(db, "synthetic", sessions=30, seed=4, replace=True)
    assert report.replaced["assessment_sessions"] == 20
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(assessment_sessions)).scalar_one() == 30
        assert conn.execute(sa.select(sa.func.count()).select_from(fc_options)).scalar_one() == reference


def test_report_renders_and_serialises(staging: tuple[Database, SeedReport]) -> None:
    _, report = staging
    text = report.render()
    assert "missing_fc_only" in text and TEST_A in text and "rows written" in text
    data = report.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["categories"]["missing_both"] == report.missing_both
    assert len(data["candidates"]) == 39


def test_fast_uuid_matches_the_standard_library() -> None:
    import random
    import uuid

    from gatefill.prism.sandbox.seed import _uuid

    a, b = random.Random(5), random.Random(5)
    for _ in range(200):
        assert _uuid(a) == str(uuid.UUID(int=b.getrandbits(128), version=4))


def test_parallel_bulk_load_on_postgres(pg_target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    import gatefill.prism.sandbox.seed as seed_module

    monkeypatch.setattr(seed_module, "_PARALLEL_MIN", 40)  # the helper connection, at test size
    monkeypatch.setattr(seed_module, "_QUEUE_STEP", 3)  # both connections take ranges from the queue
    report = seed_scenario(pg_target.db, "synthetic", sessions=60, seed=9)
    assert any("second connection" in note for note in report.notes)
    with pg_target.db.connect() as conn:
        per_session = conn.execute(
            sa.text(
                "SELECT count(*), min(n), max(n) FROM "
                "(SELECT count(*) AS n FROM assessment_responses GROUP BY session_id) x"
            )
        ).one()
    assert tuple(per_session) == (60, 248, 248)
    assert report.counts["assessment_responses"] == 60 * 248


def test_failed_parallel_load_leaves_nothing(pg_target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    import gatefill.prism.sandbox.seed as seed_module

    def broken(self: object, sink: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(seed_module, "_PARALLEL_MIN", 40)
    monkeypatch.setattr(seed_module._Synthetic, "_write_fc_responses", broken)
    before = _digest(pg_target.db)
    with pytest.raises(RuntimeError, match="disk on fire"):
        seed_scenario(pg_target.db, "synthetic", sessions=60, seed=9)
    assert _digest(pg_target.db) == before


def test_arguments_validate_without_a_database() -> None:
    from gatefill.prism.sandbox.seed import validate_seed_arguments

    assert validate_seed_arguments(STAGING) == datetime(2025, 9, 17, 8, tzinfo=UTC)
    assert validate_seed_arguments(PRODUCTION) == datetime(2025, 9, 18, 0, 10, tzinfo=UTC)
    with pytest.raises(UsageError, match="sessions must be"):
        validate_seed_arguments("synthetic", sessions=-1)
