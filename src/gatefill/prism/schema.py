"""The PRISM tables as they were live on 2025-09-17, created on SQLite or Postgres, plus reference data and checks.

One SQLAlchemy Core definition serves both dialects (``gatefill.db`` types map uuid/jsonb/timestamptz/text[] to TEXT
on SQLite). On Postgres, ``init_schema`` also creates the Supabase roles (``anon``, ``authenticated``, ``service_role``
with BYPASSRLS) if missing, an ``auth`` schema with ``auth.uid()``/``auth.role()`` reading the request settings when
the database has no real one, the ``updated_at`` triggers, row-level security with the intended policies (owners read
their own rows through ``auth.uid()``, the service role writes, results are reachable only through the token check in
``get_results_by_session``) and the grants that go with them.

Deliberate departures from the declared migrations, each because the live data contradicts them:
- ``profiles.fc_coverage_bucket IN ('None','Partial','Full')`` and ``overlay_neuro/overlay_state IN ('+','–','0')``
  are not created: the engine writes ``'low'``/``'full'`` and ``'none'`` (spec §6.12), and production held 157 v1.2.1
  profiles written by that engine, so those CHECKs cannot have been in force.
- The ``tg_sessions_autocomplete_148`` trigger is not created: it would complete sessions behind the backs of the
  seeders and the simulator; seeded data contains the sessions it produced (completed with 148–247 answers) instead.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.compiler import compiles

from gatefill.db import Database, JSONValue, TextArray, UTCTimestamp, UUIDText
from gatefill.errors import SchemaMissing

__all__ = [
    "METADATA",
    "PRISM_TABLES",
    "SchemaReport",
    "check_schema",
    "init_schema",
    "insert_for",
    "load_reference_data",
    "missing_columns",
    "reference_rows",
    "require_schema",
]

METADATA = sa.MetaData()

_UUID_SQLITE = (
    "(lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || substr(lower(hex(randomblob(2))), 2)"
    " || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) || substr(lower(hex(randomblob(2))), 2) || '-'"
    " || lower(hex(randomblob(6))))"
)
_NOW_SQLITE = "(strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'))"


class _UUIDDefault(sa.sql.expression.FunctionElement[str]):
    """``gen_random_uuid()`` on Postgres, a random v4 UUID expression on SQLite."""

    type = sa.Text()
    inherit_cache = True


class _NowDefault(sa.sql.expression.FunctionElement[str]):
    """``now()`` on Postgres, fixed-width ISO-8601 UTC text on SQLite."""

    type = sa.Text()
    inherit_cache = True


@compiles(_UUIDDefault)
def _uuid_default_pg(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "gen_random_uuid()"


@compiles(_UUIDDefault, "sqlite")
def _uuid_default_sqlite(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return _UUID_SQLITE


@compiles(_NowDefault)
def _now_default_pg(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "now()"


@compiles(_NowDefault, "sqlite")
def _now_default_sqlite(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return _NOW_SQLITE


def _uuid_pk() -> sa.Column[str]:
    return sa.Column("id", UUIDText(), primary_key=True, server_default=_UUIDDefault())


def _ts(name: str, *, nullable: bool = True, now: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, UTCTimestamp(), nullable=nullable, server_default=_NowDefault() if now else None)


def _bigserial() -> sa.Column[int]:
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True)


# Columns the pipeline never reads or writes; `db check` does not demand them from an existing database.
_OPTIONAL = {"optional": True}
_DOUBLE = sa.Float(53)

assessment_sessions = sa.Table(
    "assessment_sessions",
    METADATA,
    _uuid_pk(),
    sa.Column("user_id", UUIDText()),
    sa.Column("session_type", sa.Text(), nullable=False, server_default="prism"),
    _ts("started_at", nullable=False, now=True),
    _ts("created_at", nullable=False, now=True),
    _ts("updated_at", nullable=False, now=True),
    _ts("completed_at"),
    _ts("finalized_at"),
    sa.Column("total_questions", sa.Integer()),
    sa.Column("completed_questions", sa.Integer(), server_default="0"),
    sa.Column("status", sa.Text(), server_default="in_progress"),
    sa.Column("email", sa.Text()),
    sa.Column("share_token", sa.Text(), nullable=False),
    _ts("share_token_expires_at"),
    sa.Column("metadata", JSONValue(), info=_OPTIONAL),
    sa.Column("ip_hash", sa.Text(), info=_OPTIONAL),
    sa.Column("ua_hash", sa.Text(), info=_OPTIONAL),
    sa.Column("country_iso2", sa.Text(), info=_OPTIONAL),
    sa.CheckConstraint("status IN ('in_progress','completed','abandoned')", name="assessment_sessions_status_check"),
    sa.UniqueConstraint("share_token", name="idx_assessment_sessions_share_token"),
)
sa.Index(
    "uq_active_session_per_email",
    assessment_sessions.c.email,
    unique=True,
    postgresql_where=sa.text("status = 'in_progress'"),
    sqlite_where=sa.text("status = 'in_progress'"),
)
sa.Index("ix_assessment_sessions_status_created", assessment_sessions.c.status, assessment_sessions.c.created_at)
sa.Index("ix_assessment_sessions_created", assessment_sessions.c.created_at)
sa.Index("ix_assessment_sessions_started", assessment_sessions.c.started_at)
# The soak's write_failures check looks for sessions finalized before a cutoff without a profile.
sa.Index("ix_assessment_sessions_finalized", assessment_sessions.c.finalized_at)
sa.Index("ix_assessment_sessions_user", assessment_sessions.c.user_id)

assessment_responses = sa.Table(
    "assessment_responses",
    METADATA,
    _uuid_pk(),
    sa.Column(
        "session_id",
        UUIDText(),
        sa.ForeignKey("assessment_sessions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("question_id", sa.Integer(), nullable=False),
    sa.Column("question_text", sa.Text(), nullable=False),
    sa.Column("question_type", sa.Text(), nullable=False),
    sa.Column("question_section", sa.Text(), nullable=False),
    sa.Column("answer_value", sa.Text()),
    sa.Column("answer_numeric", sa.Integer()),
    sa.Column("answer_array", TextArray()),
    sa.Column("answer_object", JSONValue()),
    sa.Column("response_time_ms", sa.Integer()),
    sa.Column("section_id", sa.Text(), info=_OPTIONAL),
    sa.Column("pair_group", sa.Text(), info=_OPTIONAL),
    sa.Column("value_coded", sa.Text(), info=_OPTIONAL),
    sa.Column("valid_bool", sa.Boolean(), server_default=sa.true(), info=_OPTIONAL),
    _ts("created_at", nullable=False, now=True),
    _ts("updated_at", nullable=False, now=True),
    sa.UniqueConstraint("session_id", "question_id", name="uniq_session_question"),
)

fc_blocks = sa.Table(
    "fc_blocks",
    METADATA,
    _uuid_pk(),
    sa.Column("version", sa.Text(), nullable=False, server_default="v1.2"),
    sa.Column("code", sa.Text(), nullable=False),
    sa.Column("title", sa.Text()),
    sa.Column("description", sa.Text()),
    sa.Column("order_index", sa.Integer()),
    sa.Column("is_active", sa.Boolean(), server_default=sa.true()),
    _ts("created_at", now=True),
    sa.UniqueConstraint("version", "code", name="fc_blocks_version_code_key"),
)

fc_options = sa.Table(
    "fc_options",
    METADATA,
    _uuid_pk(),
    sa.Column("block_id", UUIDText(), sa.ForeignKey("fc_blocks.id", ondelete="CASCADE"), nullable=False),
    sa.Column("option_code", sa.Text(), nullable=False),
    sa.Column("prompt", sa.Text()),
    sa.Column("weights_json", JSONValue(), nullable=False),
    sa.Column("order_index", sa.Integer()),
    _ts("created_at", now=True),
    sa.UniqueConstraint("block_id", "option_code", name="fc_options_block_id_option_code_key"),
)

fc_responses = sa.Table(
    "fc_responses",
    METADATA,
    # No foreign key to assessment_sessions until 2025-09-28 (spec §1.3): orphans are possible and health reports them.
    sa.Column("session_id", UUIDText(), primary_key=True),
    sa.Column("block_id", UUIDText(), sa.ForeignKey("fc_blocks.id", ondelete="RESTRICT"), primary_key=True),
    sa.Column("option_id", UUIDText(), sa.ForeignKey("fc_options.id", ondelete="RESTRICT"), nullable=False),
    _ts("answered_at", now=True),
)

fc_scores = sa.Table(
    "fc_scores",
    METADATA,
    sa.Column("session_id", UUIDText(), primary_key=True),
    sa.Column("version", sa.Text(), primary_key=True, server_default="v1.2"),
    sa.Column("fc_kind", sa.Text(), primary_key=True),
    sa.Column("scores_json", JSONValue(), nullable=False),
    sa.Column("blocks_answered", sa.Integer(), nullable=False),
    _ts("created_at", now=True),
    sa.CheckConstraint("fc_kind IN ('functions','types')", name="fc_scores_fc_kind_check"),
)
sa.Index("ix_fc_scores_created", fc_scores.c.created_at)

# Result columns of the flat 2025-09 profile row (spec §3.4 / §4.4a), in the engine's output order.
_PROFILE_RESULT_COLUMNS: list[sa.Column[Any]] = [
    sa.Column("type_code", sa.Text()),
    sa.Column("base_func", sa.Text()),
    sa.Column("creative_func", sa.Text()),
    sa.Column("top_types", JSONValue()),
    sa.Column("top_3_fits", JSONValue()),
    sa.Column("score_fit_raw", _DOUBLE),
    sa.Column("score_fit_calibrated", _DOUBLE),
    sa.Column("fit_band", sa.Text()),
    sa.Column("top_gap", _DOUBLE),
    sa.Column("close_call", sa.Boolean()),
    sa.Column("strengths", JSONValue()),
    sa.Column("dimensions", JSONValue()),
    sa.Column("dims_highlights", JSONValue()),
    sa.Column("blocks_norm", JSONValue()),
    sa.Column("neuro_mean", _DOUBLE),
    sa.Column("neuro_z", _DOUBLE),
    sa.Column("overlay_neuro", sa.Text()),
    sa.Column("overlay_state", sa.Text()),
    sa.Column("state_index", _DOUBLE),
    sa.Column("overlay", sa.Text()),
    sa.Column("validity_status", sa.Text()),
    sa.Column("validity", JSONValue()),
    sa.Column("confidence", sa.Text()),
    sa.Column("conf_raw", _DOUBLE),
    sa.Column("conf_calibrated", _DOUBLE),
    sa.Column("fc_answered_ct", sa.Integer()),
    sa.Column("fc_coverage_bucket", sa.Text()),
]

profiles = sa.Table(
    "profiles",
    METADATA,
    _uuid_pk(),
    sa.Column(
        "session_id",
        UUIDText(),
        sa.ForeignKey("assessment_sessions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("user_id", UUIDText()),
    *_PROFILE_RESULT_COLUMNS,
    sa.Column("version", sa.Text()),
    sa.Column("results_version", sa.Text(), server_default="v1.1"),
    sa.Column("share_token", sa.Text(), nullable=False, server_default=_UUIDDefault()),
    _ts("created_at", nullable=False, now=True),
    _ts("updated_at", nullable=False, now=True),
    _ts("submitted_at"),
    _ts("recomputed_at"),
    sa.UniqueConstraint("session_id", name="ux_profiles_session"),
    sa.UniqueConstraint("user_id", "session_id", name="profiles_user_id_session_id_key"),
    sa.UniqueConstraint("share_token", name="profiles_share_token_key"),
)
sa.Index("ix_profiles_created", profiles.c.created_at)
sa.Index("ix_profiles_updated", profiles.c.updated_at)
PROFILE_RESULT_COLUMNS: tuple[str, ...] = tuple(c.name for c in _PROFILE_RESULT_COLUMNS)

scoring_config = sa.Table(
    "scoring_config",
    METADATA,
    sa.Column("key", sa.Text(), primary_key=True),
    sa.Column("value", JSONValue(), nullable=False),
    _ts("updated_at", now=True),
)

assessment_scoring_key = sa.Table(
    "assessment_scoring_key",
    METADATA,
    sa.Column("question_id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("tag", sa.Text()),
    sa.Column("scale_type", sa.Text(), nullable=False),
    sa.Column("reverse_scored", sa.Boolean(), server_default=sa.false()),
    sa.Column("fc_map", JSONValue()),
    sa.Column("pair_group", sa.Text()),
    sa.Column("social_desirability", sa.Boolean(), server_default=sa.false()),
    sa.Column("weight", _DOUBLE, server_default="1"),
    # The live column is a Postgres enum; a CHECK keeps both dialects to the same set of values.
    sa.CheckConstraint(
        "scale_type IN ('META','LIKERT_1_5','LIKERT_1_7','STATE_1_7','FORCED_CHOICE_2','FORCED_CHOICE_4',"
        "'FORCED_CHOICE_5','select-all','ranking')",
        name="assessment_scoring_key_scale_type_check",
    ),
)

type_prototypes = sa.Table(
    "type_prototypes",
    METADATA,
    sa.Column("type_code", sa.Text(), primary_key=True),
    sa.Column("func", sa.Text(), primary_key=True),
    # The seat the function takes in that type (base, creative, role, ...): what score_prism hands the engine.
    sa.Column("block", sa.Text(), nullable=False),
)

calibration_model = sa.Table(
    "calibration_model",
    METADATA,
    _uuid_pk(),
    sa.Column("version", sa.Text(), nullable=False),
    sa.Column("stratum", JSONValue(), nullable=False),
    sa.Column("method", sa.Text()),
    sa.Column("knots", JSONValue(), nullable=False),
    _ts("trained_at", nullable=False, now=True),
)

fn_logs = sa.Table(
    "fn_logs",
    METADATA,
    _bigserial(),
    sa.Column("evt", sa.Text(), nullable=False),
    sa.Column("payload", JSONValue()),
    _ts("at", nullable=False, now=True),
)
sa.Index("ix_fn_logs_evt_at", fn_logs.c.evt, fn_logs.c.at)
sa.Index("ix_fn_logs_at", fn_logs.c.at)

results_token_access_logs = sa.Table(
    "results_token_access_logs",
    METADATA,
    _bigserial(),
    sa.Column("profile_id", UUIDText()),
    sa.Column("session_id", UUIDText()),
    sa.Column("token_hash", sa.Text(), nullable=False),
    sa.Column("success", sa.Boolean(), nullable=False),
    sa.Column("ip", sa.Text()),
    sa.Column("ua", sa.Text()),
    _ts("ts", now=True),
)
sa.Index("ix_results_token_access_logs_ts", results_token_access_logs.c.ts)

PRISM_TABLES: tuple[str, ...] = tuple(METADATA.tables)

# Postgres-only objects. Every statement is idempotent; roles are cluster-wide, so their creation tolerates a
# concurrent creator (parallel test databases on one server).
_PG_ROLES = """
DO $$
DECLARE r text;
BEGIN
  FOREACH r IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', r);
      EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
      END;
    END IF;
  END LOOP;
  IF NOT (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'service_role') THEN
    ALTER ROLE service_role BYPASSRLS;
  END IF;
END $$;
"""

# auth.uid()/auth.role() as Supabase defines them, reading PostgREST's request settings; only where no real
# Supabase auth schema provides them.
_PG_AUTH = """
CREATE SCHEMA IF NOT EXISTS auth;
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = 'auth' AND p.proname = 'uid') THEN
    CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $f$
      SELECT nullif(coalesce(current_setting('request.jwt.claim.sub', true),
                             (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')), '')::uuid
    $f$;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = 'auth' AND p.proname = 'role') THEN
    CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $f$
      SELECT nullif(coalesce(current_setting('request.jwt.claim.role', true),
                             (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')), '')::text
    $f$;
  END IF;
END $$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
"""

_PG_TRIGGERS = """
CREATE OR REPLACE FUNCTION public.update_updated_at_column() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at = now();
  RETURN NEW;
END $$;
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['assessment_sessions', 'assessment_responses', 'profiles'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'update_' || t || '_updated_at'
                   AND tgrelid = ('public.' || t)::regclass) THEN
      EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON public.%I FOR EACH ROW '
                     'EXECUTE FUNCTION public.update_updated_at_column()', 'update_' || t || '_updated_at', t);
    END IF;
  END LOOP;
END $$;
"""

_SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER IF NOT EXISTS update_{t}_updated_at AFTER UPDATE ON {t} FOR EACH ROW
    BEGIN UPDATE {t} SET updated_at = {_NOW_SQLITE} WHERE rowid = NEW.rowid; END"""
    for t in ("assessment_sessions", "assessment_responses", "profiles")
]

# (table, policy, command, roles, USING, WITH CHECK). Owners read their own rows; the frontend (anon) may create
# sessions and answers; the service role manages everything (redundant with BYPASSRLS, kept as upstream has it);
# nobody but the service role and the SECURITY DEFINER token check reads profiles of other people.
_OWNER_SESSION = "EXISTS (SELECT 1 FROM assessment_sessions s WHERE s.id = session_id AND s.user_id = auth.uid())"
_POLICIES: list[tuple[str, str, str, str, str | None, str | None]] = [
    ("assessment_sessions", "sessions_owner_read", "SELECT", "authenticated", "user_id = auth.uid()", None),
    ("assessment_sessions", "as_anon_insert", "INSERT", "anon, authenticated", None, "true"),
    ("assessment_sessions", "sessions_service_role", "ALL", "service_role", "true", "true"),
    ("assessment_responses", "responses_owner_read", "SELECT", "authenticated", _OWNER_SESSION, None),
    ("assessment_responses", "responses_anon_insert", "INSERT", "anon, authenticated", None, "true"),
    ("assessment_responses", "responses_service_role", "ALL", "service_role", "true", "true"),
    ("fc_responses", "fc_responses_owner_read", "SELECT", "authenticated", _OWNER_SESSION, None),
    ("fc_responses", "fc_responses_insert", "INSERT", "anon, authenticated", None, "true"),
    ("fc_responses", "fc_responses_service_role", "ALL", "service_role", "true", "true"),
    ("fc_scores", "fc_scores_owner_read", "SELECT", "authenticated", _OWNER_SESSION, None),
    ("fc_scores", "fc_scores_service_role", "ALL", "service_role", "true", "true"),
    ("profiles", "profiles_owner_read", "SELECT", "authenticated", "user_id = auth.uid()", None),
    ("profiles", "profiles_service_role", "ALL", "service_role", "true", "true"),
    ("fc_blocks", "fc_blocks_public_read", "SELECT", "anon, authenticated", "true", None),
    ("fc_blocks", "fc_blocks_service_role", "ALL", "service_role", "true", "true"),
    ("fc_options", "fc_options_public_read", "SELECT", "anon, authenticated", "true", None),
    ("fc_options", "fc_options_service_role", "ALL", "service_role", "true", "true"),
    ("assessment_scoring_key", "scoring_key_service_role", "ALL", "service_role", "true", "true"),
    ("type_prototypes", "type_prototypes_public_read", "SELECT", "anon, authenticated", "true", None),
    ("type_prototypes", "type_prototypes_service_role", "ALL", "service_role", "true", "true"),
    ("scoring_config", "scoring_config_service_role", "ALL", "service_role", "true", "true"),
    ("calibration_model", "calibration_model_service_role", "ALL", "service_role", "true", "true"),
    ("fn_logs", "fn_logs_service_role", "ALL", "service_role", "true", "true"),
    ("results_token_access_logs", "token_logs_service_role", "ALL", "service_role", "true", "true"),
]

#: Table privileges per role, matching the policies (RLS filters rows; privileges decide if a table is reachable).
_GRANTS = """
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
GRANT ALL ON ALL TABLES IN SCHEMA public TO service_role;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO service_role;
REVOKE ALL ON profiles, scoring_config, calibration_model, fn_logs, results_token_access_logs, fc_scores,
              assessment_scoring_key FROM anon, public;
GRANT SELECT ON profiles, fc_scores, assessment_sessions, assessment_responses, fc_responses TO authenticated;
GRANT INSERT ON assessment_sessions, assessment_responses, fc_responses TO anon, authenticated;
GRANT SELECT ON fc_blocks, fc_options, type_prototypes TO anon, authenticated;
"""

# The results token check (the intent of get_results_by_session, 2025-09-17): the token must equal the completed
# session's share_token and must not be expired; any other case is ACCESS_DENIED without saying whether the session
# exists. Every call is logged with the token's sha256, never the token.
_PG_RESULTS_FUNCTION = """
CREATE OR REPLACE FUNCTION public.get_results_by_session(session_id uuid, t text DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
  s assessment_sessions%ROWTYPE;
  p profiles%ROWTYPE;
  ok boolean;
BEGIN
  SELECT * INTO s FROM assessment_sessions WHERE id = get_results_by_session.session_id;
  ok := s.id IS NOT NULL AND s.status = 'completed' AND (
          (t IS NOT NULL AND s.share_token = t
             AND (s.share_token_expires_at IS NULL OR s.share_token_expires_at > now()))
          OR (t IS NULL AND s.user_id IS NOT NULL AND s.user_id = auth.uid()));
  INSERT INTO results_token_access_logs (profile_id, session_id, token_hash, success)
  VALUES (NULL, get_results_by_session.session_id,
          encode(sha256(convert_to(coalesce(t, ''), 'UTF8')), 'hex'), ok);
  IF NOT ok THEN
    RETURN jsonb_build_object('error', 'access denied', 'code', 'ACCESS_DENIED');
  END IF;
  SELECT * INTO p FROM profiles WHERE profiles.session_id = s.id;
  IF p.id IS NULL THEN
    RETURN jsonb_build_object('error', 'profile not found', 'code', 'PROFILE_NOT_FOUND');
  END IF;
  RETURN jsonb_build_object('success', true,
    'profile', jsonb_build_object('id', p.id, 'session_id', p.session_id, 'type_code', p.type_code,
      'version', p.version, 'overlay', p.overlay, 'conf_calibrated', p.conf_calibrated,
      'score_fit_calibrated', p.score_fit_calibrated, 'created_at', p.created_at, 'top_types', p.top_types,
      'confidence', p.confidence, 'fit_band', p.fit_band),
    'session', jsonb_build_object('id', s.id, 'status', s.status, 'completed_at', s.completed_at));
EXCEPTION WHEN OTHERS THEN
  RETURN jsonb_build_object('error', 'internal error', 'code', 'INTERNAL_ERROR');
END $$;
REVOKE ALL ON FUNCTION public.get_results_by_session(uuid, text) FROM public;
GRANT EXECUTE ON FUNCTION public.get_results_by_session(uuid, text) TO anon, authenticated, service_role;
"""


def insert_for(conn: Connection | Dialect, table: sa.Table) -> Any:
    """The dialect's INSERT construct for ``table`` (both offer ``on_conflict_do_nothing``/``..._do_update``)."""
    dialect = conn if isinstance(conn, Dialect) else conn.dialect
    if dialect.name == "postgresql":
        return pg_dialect.insert(table)
    return sqlite_dialect.insert(table)


def _run_script(conn: Connection, sql: str) -> None:
    """Runs a Postgres script as is: without parameters the driver leaves ``%I`` in format() calls alone."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


def _create_policies(conn: Connection) -> None:
    existing = {
        (r.tablename, r.policyname)
        for r in conn.execute(sa.text("SELECT tablename, policyname FROM pg_policies WHERE schemaname = 'public'"))
    }
    for table in PRISM_TABLES:
        conn.exec_driver_sql(f"ALTER TABLE public.{table} ENABLE ROW LEVEL SECURITY")
    for table, name, command, roles, using, check in _POLICIES:
        if (table, name) in existing:
            continue
        sql = f'CREATE POLICY "{name}" ON public.{table} FOR {command} TO {roles}'
        if using is not None:
            sql += f" USING ({using})"
        if check is not None:
            sql += f" WITH CHECK ({check})"
        conn.exec_driver_sql(sql)


def init_schema(db: Database) -> None:
    """Creates, idempotently, every PRISM table, index and trigger (and on Postgres the roles, auth, RLS, grants)."""
    with db.begin() as conn:
        if db.caps.roles:
            # Serialise concurrent initialisations of the same database (CREATE TABLE IF NOT EXISTS races otherwise).
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('gatefill.prism.schema'))"))
            _run_script(conn, _PG_ROLES)
            _run_script(conn, _PG_AUTH)
        METADATA.create_all(conn, checkfirst=True)
        if db.caps.roles:
            _run_script(conn, _PG_TRIGGERS)
            _create_policies(conn)
            _run_script(conn, _GRANTS)
            _run_script(conn, _PG_RESULTS_FUNCTION)
        else:
            for statement in _SQLITE_TRIGGERS:
                conn.exec_driver_sql(statement)


def _data_text(name: str) -> str:
    return resources.files("gatefill.prism").joinpath("data", name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class ReferenceRows:
    """The rows of the PRISM reference tables as shipped with gatefill (spec/data), ready to insert."""

    scoring_key: list[dict[str, Any]]
    fc_blocks: list[dict[str, Any]]
    fc_options: list[dict[str, Any]]
    type_prototypes: list[dict[str, Any]]
    scoring_config: list[dict[str, Any]]


def _csv_bool(text: str) -> bool:
    return text.strip().lower() == "true"


@cache
def reference_rows() -> ReferenceRows:
    """Parses the shipped reference data once."""
    key_rows = []
    for row in csv.DictReader(_data_text("assessment_scoring_key.csv").splitlines()):
        key_rows.append(
            {
                "question_id": int(row["question_id"]),
                "tag": row["tag"] or None,
                "scale_type": row["scale_type"],
                "reverse_scored": _csv_bool(row["reverse_scored"]),
                "fc_map": json.loads(row["fc_map"]) if row["fc_map"] else None,
                "pair_group": row["pair_group"] or None,
                "social_desirability": _csv_bool(row["social_desirability"]),
                "weight": float(row["weight"]) if row["weight"] else 1.0,
            }
        )
    seed = json.loads(_data_text("fc_seed_v1.2.json"))
    protos = json.loads(_data_text("type_prototypes.json"))
    proto_rows = [
        {"type_code": t, "func": func, "block": seat}
        for t in protos["type_order"]
        for seat, func in protos["prototypes"][t].items()
    ]
    return ReferenceRows(
        scoring_key=key_rows,
        fc_blocks=[dict(b) for b in seed["fc_blocks"]],
        fc_options=[dict(o) for o in seed["fc_options"]],
        type_prototypes=proto_rows,
        scoring_config=[{"key": k, "value": v} for k, v in SCORING_CONFIG_PRE_0928.items()],
    )


#: ``scoring_config`` as seeded by the migrations before 2025-09-28 (scoring spec §4.2, left column; data model §1.5).
#: Keys the engine ignores carry the values those migrations wrote; they are kept so the table looks as it did.
SCORING_CONFIG_PRE_0928: dict[str, Any] = {
    "results_version": "v1.2.1",
    "softmax_temp": 1.0,
    "fc_expected_min": 24,
    "conf_raw_params": {"a": 0.25, "b": 0.35, "c": 0.2},
    "fit_band_thresholds": {"high_fit": 60, "moderate_fit": 45, "high_gap": 5, "moderate_gap": 2},
    "conf_band_cuts": {"high": 0.75, "moderate": 0.55},
    "dim_thresholds": {"one": 2.5, "two": 3.0, "three": 3.5},
    "neuro_norms": {"mean": 3.5, "sd": 1.0},
    "fit_bands": {"high": 60, "moderate": 45},
    "fit_calibration": {"method": "none"},
    "fc_block_map_default": {},
    "enforce_type_guard": False,
}


def load_reference_data(db: Database, *, now: datetime | None = None) -> dict[str, int]:
    """Inserts the shipped reference rows that are missing; returns how many rows each table gained.

    Existing rows are left as they are (a live ``scoring_config`` is never overwritten), except the v1.2 FC seed,
    which upstream re-asserts on every run (``ON CONFLICT (id) DO UPDATE``).
    """
    ref = reference_rows()
    stamp = now or datetime.now(UTC)
    added: dict[str, int] = {}
    with db.begin() as conn:
        added["assessment_scoring_key"] = _insert_missing(conn, assessment_scoring_key, ref.scoring_key)
        added["type_prototypes"] = _insert_missing(conn, type_prototypes, ref.type_prototypes)
        config_rows = [{**r, "updated_at": stamp} for r in ref.scoring_config]
        added["scoring_config"] = _insert_missing(conn, scoring_config, config_rows)
        for table, rows in ((fc_blocks, ref.fc_blocks), (fc_options, ref.fc_options)):
            before = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            stmt = insert_for(conn, table)
            updatable = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in ("id", "created_at")}
            conn.execute(stmt.on_conflict_do_update(index_elements=["id"], set_=updatable), rows)
            added[table.name] = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() - before
    return added


def _insert_missing(conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> int:
    before = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
    conn.execute(insert_for(conn, table).on_conflict_do_nothing(), list(rows))
    return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() - before)


@dataclass(frozen=True)
class SchemaReport:
    """What ``check_schema`` found: missing tables/columns, reference-data and security findings."""

    missing: list[str]
    reference: dict[str, str]
    security: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.missing


def _required_columns() -> dict[str, list[str]]:
    return {
        name: [c.name for c in table.columns if not c.info.get("optional")] for name, table in METADATA.tables.items()
    }


def missing_columns(conn: Connection, tables: Iterable[str] | None = None) -> list[str]:
    """Required PRISM tables and ``table.column`` names absent from the connected database (read-only)."""
    wanted = set(tables) if tables is not None else set(PRISM_TABLES)
    inspector = sa.inspect(conn)
    present = set(inspector.get_table_names())
    missing: list[str] = []
    for table, columns in _required_columns().items():
        if table not in wanted:
            continue
        if table not in present:
            missing.append(table)
            continue
        have = {c["name"] for c in inspector.get_columns(table)}
        missing.extend(f"{table}.{c}" for c in columns if c not in have)
    return missing


def check_schema(db: Database, tables: Iterable[str] | None = None) -> SchemaReport:
    """Read-only: lists required tables/columns that are missing, plus reference-data and RLS findings."""
    wanted = set(tables) if tables is not None else set(PRISM_TABLES)
    reference: dict[str, str] = {}
    security: dict[str, str] = {}
    with db.connect() as conn:
        missing = missing_columns(conn, wanted)
        if not missing and wanted >= set(PRISM_TABLES):
            reference = _reference_findings(conn)
            if db.caps.row_level_security:
                security = _security_findings(conn)
    return SchemaReport(missing=missing, reference=reference, security=security)


def _count(conn: Connection, sql: str) -> int:
    return int(conn.execute(sa.text(sql)).scalar_one())


def _reference_findings(conn: Connection) -> dict[str, str]:
    found: dict[str, str] = {}
    n_key = _count(conn, "SELECT count(*) FROM assessment_scoring_key")
    found["assessment_scoring_key"] = f"{n_key} rows"
    n_blocks = _count(conn, "SELECT count(*) FROM fc_blocks WHERE version = 'v1.2' AND is_active")
    n_opts = _count(
        conn, "SELECT count(*) FROM fc_options o JOIN fc_blocks b ON b.id = o.block_id WHERE b.version = 'v1.2'"
    )
    found["fc seed v1.2"] = f"{n_blocks} active blocks, {n_opts} options"
    n_protos = _count(conn, "SELECT count(*) FROM type_prototypes")
    found["type_prototypes"] = f"{n_protos} rows" + ("" if n_protos == 128 else " (engine falls back to built-ins)")
    value = conn.execute(sa.select(scoring_config.c.value).where(scoring_config.c.key == "results_version")).first()
    found["scoring_config.results_version"] = json.dumps(value[0]) if value else "absent"
    return found


def _security_findings(conn: Connection) -> dict[str, str]:
    rows = conn.execute(
        sa.text(
            "SELECT c.relname, c.relrowsecurity, count(p.policyname) AS policies FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public' "
            "LEFT JOIN pg_policies p ON p.schemaname = 'public' AND p.tablename = c.relname "
            "WHERE c.relname = ANY(:names) GROUP BY c.relname, c.relrowsecurity"
        ),
        {"names": list(PRISM_TABLES)},
    )
    found = {}
    for name, rls, policies in rows:
        found[name] = f"RLS {'on' if rls else 'OFF'}, {policies} policies"
    bypass = conn.execute(sa.text("SELECT rolbypassrls FROM pg_roles WHERE rolname = 'service_role'")).first()
    found["service_role"] = "absent" if bypass is None else ("BYPASSRLS" if bypass[0] else "no BYPASSRLS")
    return found


def require_schema(db: Database, tables: Iterable[str] | None = None) -> None:
    """Raises ``SchemaMissing`` (exit 2) unless the tables and columns the pipeline needs exist."""
    report = check_schema(db, tables)
    if report.missing:
        raise SchemaMissing(db.display_url, report.missing)
