"""The PRISM schema on SQLite and Postgres: tables, constraints, triggers, reference data, roles, RLS, db check."""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from gatefill.db import Database
from gatefill.errors import DatabaseError, SchemaMissing
from gatefill.prism import schema
from gatefill.prism.schema import (
    PRISM_TABLES,
    assessment_responses,
    assessment_sessions,
    check_schema,
    fc_scores,
    init_schema,
    load_reference_data,
    profiles,
    require_schema,
)
from tests.conftest import Target, pg_env


def new_session(conn: sa.Connection, **values: object) -> str:
    sid = str(uuid.uuid4())
    row = {"id": sid, "share_token": str(uuid.uuid4()), "status": "completed", **values}
    conn.execute(assessment_sessions.insert().values(**row))
    return sid


def test_all_tables_and_reference_data(target: Target) -> None:
    with target.db.connect() as conn:
        names = set(sa.inspect(conn).get_table_names())
        counts = {
            t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
            for t in ("assessment_scoring_key", "fc_blocks", "fc_options", "type_prototypes")
        }
        version = conn.execute(sa.text("SELECT value FROM scoring_config WHERE key = 'results_version'")).scalar_one()
    assert set(PRISM_TABLES) <= names
    assert len(PRISM_TABLES) == 13
    assert counts == {"assessment_scoring_key": 246, "fc_blocks": 6, "fc_options": 24, "type_prototypes": 128}
    assert version in ("v1.2.1", '"v1.2.1"')


def test_init_is_idempotent_and_never_overwrites_live_config(target: Target) -> None:
    with target.db.begin() as conn:
        conn.execute(sa.text("UPDATE scoring_config SET value = :v WHERE key = 'results_version'"), {"v": '"v9"'})
    init_schema(target.db)
    added = load_reference_data(target.db)
    assert added == dict.fromkeys(added, 0)
    with target.db.connect() as conn:
        value = conn.execute(
            sa.select(schema.scoring_config.c.value).where(schema.scoring_config.c.key == "results_version")
        )
        assert value.scalar_one() == "v9"


def test_constraints_hold(target: Target) -> None:
    with target.db.begin() as conn:
        sid = new_session(conn)
    bad_writes = [
        lambda c: new_session(c, status="done"),
        lambda c: c.execute(assessment_sessions.insert().values(id=str(uuid.uuid4()))),  # share_token NOT NULL
        lambda c: new_session(c, share_token=c.execute(sa.select(assessment_sessions.c.share_token)).scalar_one()),
        lambda c: c.execute(
            fc_scores.insert().values(
                session_id=sid, version="v1.2", fc_kind="legacy", scores_json={}, blocks_answered=0
            )
        ),
        lambda c: c.execute(profiles.insert().values(session_id=str(uuid.uuid4()))),  # FK to sessions
    ]
    for write in bad_writes:
        with pytest.raises(DatabaseError), target.db.begin() as conn:
            write(conn)
    answer = {
        "session_id": sid,
        "question_id": 17,
        "question_text": "q",
        "question_type": "likert",
        "question_section": "s",
        "answer_value": "4",
    }
    with target.db.begin() as conn:
        conn.execute(assessment_responses.insert().values(**answer))
    with pytest.raises(DatabaseError), target.db.begin() as conn:
        conn.execute(assessment_responses.insert().values(**answer))  # uniq_session_question
    with target.db.begin() as conn:
        conn.execute(profiles.insert().values(session_id=sid))
        conn.execute(
            fc_scores.insert().values(session_id=sid, fc_kind="functions", scores_json={"Ti": 100.0}, blocks_answered=6)
        )
    with pytest.raises(DatabaseError), target.db.begin() as conn:
        conn.execute(profiles.insert().values(session_id=sid))  # one profile per session
    with target.db.begin() as conn:
        row = conn.execute(sa.select(fc_scores)).one()
        assert row.version == "v1.2" and row.scores_json == {"Ti": 100}
        conn.execute(assessment_sessions.delete().where(assessment_sessions.c.id == sid))
        # Answers and profile cascade; fc_scores has no foreign key (as live), so it stays as an orphan.
        assert conn.execute(sa.select(sa.func.count()).select_from(profiles)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(assessment_responses)).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(fc_scores)).scalar_one() == 1


def test_partial_unique_email_only_for_in_progress(target: Target) -> None:
    with target.db.begin() as conn:
        new_session(conn, email="a@example.org", status="completed")
        new_session(conn, email="a@example.org", status="completed")
        new_session(conn, email="a@example.org", status="in_progress")
    with pytest.raises(DatabaseError), target.db.begin() as conn:
        new_session(conn, email="a@example.org", status="in_progress")


def test_defaults_and_updated_at_trigger(target: Target) -> None:
    old = datetime(2025, 9, 1, tzinfo=UTC)
    with target.db.begin() as conn:
        sid = new_session(conn, created_at=old, updated_at=old, started_at=old)
        conn.execute(profiles.insert().values(session_id=sid, created_at=old, updated_at=old))
    time.sleep(0.01)
    with target.db.begin() as conn:
        conn.execute(profiles.update().where(profiles.c.session_id == sid).values(type_code="LII"))
        row = conn.execute(sa.select(profiles)).one()
    assert uuid.UUID(row.id).version == 4
    assert uuid.UUID(row.share_token)
    assert row.results_version == "v1.1"
    assert row.created_at == old
    assert row.updated_at > old + timedelta(days=365)


def test_db_check_lists_missing_tables_and_columns_without_changing_anything(target: Target) -> None:
    assert check_schema(target.db).ok
    with target.db.begin() as conn:
        conn.execute(sa.text("DROP TABLE results_token_access_logs"))
        conn.execute(sa.text("ALTER TABLE fc_scores DROP COLUMN blocks_answered"))
    report = check_schema(target.db)
    assert report.missing == ["fc_scores.blocks_answered", "results_token_access_logs"]
    with pytest.raises(SchemaMissing, match="lacks 2 required"):
        require_schema(target.db)
    with target.db.connect() as conn:
        assert "results_token_access_logs" not in sa.inspect(conn).get_table_names()


def test_db_check_on_empty_postgres_database(empty_pg: str) -> None:
    db = Database(pg_env(empty_pg))
    try:
        report = check_schema(db)
        assert sorted(report.missing) == sorted(PRISM_TABLES)
        with db.connect() as conn:
            assert sa.inspect(conn).get_table_names() == []
    finally:
        db.dispose()


@pytest.mark.postgres
def test_supabase_roles_auth_and_rls(pg_target: Target) -> None:
    db = pg_target.db
    owner = str(uuid.uuid4())
    with db.begin() as conn:
        mine = new_session(conn, user_id=owner)
        theirs = new_session(conn, user_id=str(uuid.uuid4()))
        conn.execute(
            profiles.insert(), [{"session_id": mine, "user_id": owner}, {"session_id": theirs, "user_id": None}]
        )
    with db.connect() as conn:
        roles = dict(
            conn.execute(
                sa.text(
                    "SELECT rolname, rolbypassrls FROM pg_roles "
                    "WHERE rolname IN ('anon','authenticated','service_role')"
                )
            ).all()
        )
        assert roles == {"anon": False, "authenticated": False, "service_role": True}
        rls = dict(
            conn.execute(
                sa.text("SELECT relname, relrowsecurity FROM pg_class WHERE relname = ANY(:t) AND relkind = 'r'"),
                {"t": list(PRISM_TABLES)},
            ).all()
        )
        assert rls == dict.fromkeys(PRISM_TABLES, True)
    # anon cannot read profiles at all; an authenticated user sees exactly their own; service_role sees all.
    with pytest.raises(DatabaseError, match="permission denied"), db.begin() as conn:
        conn.execute(sa.text("SET LOCAL ROLE anon"))
        conn.execute(sa.text("SELECT count(*) FROM profiles")).scalar_one()
    with db.begin() as conn:
        conn.execute(sa.text("SET LOCAL ROLE authenticated"))
        conn.execute(sa.text("SELECT set_config('request.jwt.claim.sub', :u, true)"), {"u": owner})
        assert conn.execute(sa.text("SELECT auth.uid()::text")).scalar_one() == owner
        assert conn.execute(sa.text("SELECT session_id::text FROM profiles")).scalars().all() == [mine]
        conn.execute(sa.text("RESET ROLE"))
        conn.execute(sa.text("SET LOCAL ROLE service_role"))
        assert conn.execute(sa.text("SELECT count(*) FROM profiles")).scalar_one() == 2
    assert check_schema(db).security["service_role"] == "BYPASSRLS"


@pytest.mark.postgres
def test_results_token_check_function(pg_target: Target) -> None:
    db = pg_target.db
    now = datetime.now(UTC)
    with db.begin() as conn:
        ok = new_session(conn, share_token="tok-ok", share_token_expires_at=now + timedelta(days=30))
        expired = new_session(conn, share_token="tok-old", share_token_expires_at=now - timedelta(days=1))
        open_ = new_session(conn, share_token="tok-open", status="in_progress")
        no_profile = new_session(conn, share_token="tok-np")
        conn.execute(profiles.insert(), [{"session_id": s, "type_code": "LII"} for s in (ok, expired, open_)])

    def call(session_id: str, token: str | None) -> dict[str, object]:
        with db.begin() as conn:
            conn.execute(sa.text("SET LOCAL ROLE anon"))
            result: dict[str, object] = conn.execute(
                sa.text("SELECT get_results_by_session(CAST(:s AS uuid), :t)"), {"s": session_id, "t": token}
            ).scalar_one()
            return result

    assert call(ok, "tok-ok")["success"] is True
    denied = {"error": "access denied", "code": "ACCESS_DENIED"}
    assert call(ok, "wrong") == denied
    assert call(ok, "tok-open") == denied  # another session's token
    assert call(ok, None) == denied
    assert call(expired, "tok-old") == denied
    assert call(open_, "tok-open") == denied  # not completed
    assert call(str(uuid.uuid4()), "tok-ok") == denied  # unknown session: same answer, no existence leak
    assert call(no_profile, "tok-np")["code"] == "PROFILE_NOT_FOUND"
    with db.connect() as conn:
        logged = conn.execute(sa.text("SELECT token_hash, success FROM results_token_access_logs ORDER BY id")).all()
    assert len(logged) == 8
    assert logged[0] == (hashlib.sha256(b"tok-ok").hexdigest(), True)
    assert all("tok-" not in h for h, _ in logged)
