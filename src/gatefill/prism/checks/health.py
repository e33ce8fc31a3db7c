"""The PRISM production health checks: read-only, set-based queries, each returned as a Check with its query and counts.

Every check looks at sessions created since ``since`` (the backfill window) unless it says otherwise; lists of
session ids are capped in the evidence (counts never are). A check with nothing to look at (e.g. no completed
sessions) is INCONCLUSIVE, never PASS.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill.artifacts import counts_text
from gatefill.db import format_utc
from gatefill.job import NOT_APPLICABLE, Check
from gatefill.prism import scoring
from gatefill.prism.discovery import MIN_ANSWERS
from gatefill.prism.schema import PRISM_TABLES, assessment_sessions, scoring_config

__all__ = ["LISTED", "health_checks", "newest_session_activity"]

#: How many session ids a check lists in its evidence (the counts are always complete).
LISTED = 50
_FULL_ANSWERS = 248
_FC_BLOCKS = 6


def _ids(conn: Connection, sql: str, params: dict[str, Any]) -> tuple[int, list[str]]:
    """How many ids ``sql`` selects, and the first LISTED of them in id order: one statement, counted in the database.

    ``q`` is referenced twice, so it is computed once (materialised) by the plan that suits the whole set; written as
    ``ORDER BY id LIMIT`` over ``sql`` directly, Postgres walks the sessions' primary key in order to serve the LIMIT
    and fetches every session's heap row at random (9 s instead of 1 s at a million sessions).
    """
    rows = conn.execute(
        sa.text(f"WITH q AS ({sql}) SELECT q.id, (SELECT count(*) FROM q) FROM q ORDER BY q.id LIMIT {LISTED}"), params
    ).all()
    return (int(rows[0][1]) if rows else 0), [str(r[0]) for r in rows]


def _verdict(bad: int, looked_at: int) -> str:
    if bad:
        return "FAIL"
    return "PASS" if looked_at else "INCONCLUSIVE"


def health_checks(
    conn: Connection,
    *,
    since: datetime,
    now: datetime,
    fc_version: str = scoring.FC_VERSION,
    engine_version: str = scoring.ENGINE_VERSION,
    row_level_security: bool,
    timings: dict[str, float] | None = None,
) -> list[Check]:
    """Runs every PRISM health check (read-only) and returns them in report order.

    ``timings``, when given, receives each check's wall time in seconds (the shared completed-session count is
    charged to the first check).
    """
    mark = time.perf_counter()
    p = _params(conn, since, now, fc_version, engine_version)
    completed_sql = "SELECT count(*) FROM assessment_sessions WHERE status = 'completed' AND created_at >= :since"
    completed = int(conn.execute(sa.text(completed_sql), p).scalar_one())
    checks: list[Check] = []

    def add(check: Check) -> None:
        nonlocal mark
        checks.append(check)
        if timings is not None:
            timings[check.name] = time.perf_counter() - mark
        mark = time.perf_counter()

    add(_missing_profiles(conn, p, completed))
    add(_missing_fc_scores(conn, p, completed))
    add(_versions(conn, p, completed))
    add(_completion_timestamps(conn, p, completed))
    counts = _answer_counts(conn, p)
    add(_sufficiency(counts, completed))
    add(_orphans(conn, counts))
    add(_tokens(conn, p, completed))
    add(_results_version(conn, engine_version))
    add(_rls(conn) if row_level_security else _no_rls(conn))
    return checks


def _params(conn: Connection, since: datetime, now: datetime, fc_version: str, engine_version: str) -> dict[str, Any]:
    """The bind parameters every check's query shares, in the form the connection's dialect compares."""
    p: dict[str, Any] = {"since": since, "now": now, "fcv": fc_version, "kind": scoring.FC_KIND, "ev": engine_version}
    if conn.dialect.name == "sqlite":
        # SQLite stores instants as fixed-width ISO text: compare text with text.
        p["since"], p["now"] = format_utc(since), format_utc(now)
    return p


def _missing_profiles(conn: Connection, p: dict[str, Any], completed: int) -> Check:
    """Completed sessions of the window without a profile."""
    sql = (
        "SELECT s.id FROM assessment_sessions s WHERE s.status = 'completed' AND s.created_at >= :since "
        "AND NOT EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = s.id)"
    )
    n, ids = _ids(conn, sql, p)
    return Check(
        "missing_profiles",
        _verdict(n, completed),
        f"{n} of {completed} completed sessions have no profile",
        {"completed": completed, "missing": n, "sessions": ids},
        sql,
    )


def _missing_fc_scores(conn: Connection, p: dict[str, Any], completed: int) -> Check:
    """Completed sessions of the window without this job's fc_scores row."""
    sql = (
        "SELECT s.id FROM assessment_sessions s WHERE s.status = 'completed' AND s.created_at >= :since "
        "AND NOT EXISTS (SELECT 1 FROM fc_scores f WHERE f.session_id = s.id AND f.version = :fcv "
        "AND f.fc_kind = :kind)"
    )
    n, ids = _ids(conn, sql, p)
    return Check(
        "missing_fc_scores",
        _verdict(n, completed),
        f"{n} of {completed} completed sessions have no {p['fcv']}/{scoring.FC_KIND} fc_scores row",
        {"completed": completed, "missing": n, "sessions": ids},
        sql,
    )


def _completion_timestamps(conn: Connection, p: dict[str, Any], completed: int) -> Check:
    """Completed sessions of the window that lack a completion or finalization instant."""
    sql = (
        "SELECT id FROM assessment_sessions WHERE status = 'completed' AND created_at >= :since "
        "AND (completed_at IS NULL OR finalized_at IS NULL)"
    )
    n, ids = _ids(conn, sql, p)
    return Check(
        "completion_timestamps",
        _verdict(n, completed),
        f"{n} of {completed} completed sessions lack completed_at or finalized_at",
        {"completed": completed, "lacking": n, "sessions": ids},
        sql,
    )


def _results_version(conn: Connection, engine_version: str) -> Check:
    """The database's scoring_config.results_version against the engine's."""
    # Through the Core table so the JSON value is decoded the same way on both dialects.
    value = conn.execute(sa.select(scoring_config.c.value).where(scoring_config.c.key == "results_version")).scalar()
    return Check(
        "results_version",
        "PASS" if value == engine_version else "FAIL",
        f"scoring_config.results_version = {value!r} (engine {engine_version})",
        {"scoring_config": value, "engine": engine_version},
        "SELECT value FROM scoring_config WHERE key = 'results_version'",
    )


def _no_rls(conn: Connection) -> Check:
    """The row-level-security check on a dialect without roles: N/A, with the reason."""
    return Check(
        "row_level_security",
        NOT_APPLICABLE,
        f"{conn.dialect.name} has no roles or row-level security: there is nothing to check",
        {"dialect": conn.dialect.name},
    )


def newest_session_activity(conn: Connection, since: datetime) -> tuple[datetime | None, str]:
    """The latest instant the platform stamped on a session of the window (created, completed or finalized), and
    the query that read it: what a report counting these sessions may not be dated before. (``updated_at`` is left
    out: the database's trigger stamps it with the database's own clock.)"""
    s = assessment_sessions
    query = sa.select(sa.func.max(s.c.created_at), sa.func.max(s.c.completed_at), sa.func.max(s.c.finalized_at))
    row = conn.execute(query.where(s.c.created_at >= since)).one()
    text = (
        "SELECT max(created_at), max(completed_at), max(finalized_at) FROM assessment_sessions "
        "WHERE created_at >= :since"
    )
    return max((at for at in row if at is not None), default=None), text


def _versions(conn: Connection, p: dict[str, Any], completed: int) -> Check:
    fc_sql = (
        "SELECT coalesce(f.version, 'NULL'), coalesce(f.fc_kind, 'NULL'), count(*) FROM fc_scores f "
        "JOIN assessment_sessions s ON s.id = f.session_id WHERE s.created_at >= :since GROUP BY 1, 2 ORDER BY 1, 2"
    )
    prof_sql = (
        "SELECT coalesce(p.results_version, 'NULL'), count(*) FROM profiles p "
        "JOIN assessment_sessions s ON s.id = p.session_id WHERE s.created_at >= :since GROUP BY 1 ORDER BY 1"
    )
    fc = {f"{v}/{k}": int(n) for v, k, n in conn.execute(sa.text(fc_sql), p)}
    prof = {str(v): int(n) for v, n in conn.execute(sa.text(prof_sql), p)}
    current_fc = f"{p['fcv']}/{p['kind']}"
    legacy_fc = sum(n for key, n in fc.items() if key != current_fc)
    legacy_profiles = sum(n for key, n in prof.items() if key != p["ev"])
    looked = sum(fc.values()) + sum(prof.values())
    return Check(
        "version_distribution",
        _verdict(legacy_fc + legacy_profiles, looked),
        f"fc_scores by version: {counts_text(fc)}; profiles by results_version: {counts_text(prof)} "
        f"(current: {current_fc}, {p['ev']}); "
        f"{legacy_fc} legacy fc rows, {legacy_profiles} legacy or NULL profiles",
        {
            "fc_scores": fc,
            "profiles": prof,
            "legacy_fc_scores": legacy_fc,
            "legacy_profiles": legacy_profiles,
            "completed_sessions": completed,
        },
        f"{fc_sql}; {prof_sql}",
    )


#: Answers and FC answers per completed session in the window, counted set-based: each answers table is grouped by
#: session once (one scan, whatever the number of sessions) and joined to the window's sessions; the same groups give
#: the answers without a session. (A correlated count per session costs an index probe per session, and Postgres
#: evaluates it again for every reference to its column.) The grouped CTEs are referenced twice, so both dialects
#: materialise them: each answers table is read once for both checks.
_ANSWER_COUNTS = (
    "WITH a AS (SELECT session_id, count(*) AS n FROM assessment_responses GROUP BY session_id), "
    "f AS (SELECT session_id, count(*) AS n FROM fc_responses GROUP BY session_id), "
    "c AS (SELECT s.id, coalesce(a.n, 0) AS answers, coalesce(f.n, 0) AS fc FROM assessment_sessions s "
    "LEFT JOIN a ON a.session_id = s.id LEFT JOIN f ON f.session_id = s.id "
    "WHERE s.status = 'completed' AND s.created_at >= :since) "
    "SELECT 'totals' AS k, NULL AS id, "
    f"coalesce(sum(CASE WHEN answers < {MIN_ANSWERS} THEN 1 ELSE 0 END), 0) AS short, "
    f"coalesce(sum(CASE WHEN answers >= {MIN_ANSWERS} AND answers < {_FULL_ANSWERS} THEN 1 ELSE 0 END), 0) AS partial, "
    f"coalesce(sum(CASE WHEN fc < {_FC_BLOCKS} THEN 1 ELSE 0 END), 0) AS fc_short, "
    "(SELECT coalesce(sum(n), 0) FROM a "
    "WHERE NOT EXISTS (SELECT 1 FROM assessment_sessions s WHERE s.id = a.session_id)) "
    "AS orphan_answers, "
    "(SELECT coalesce(sum(n), 0) FROM f "
    "WHERE NOT EXISTS (SELECT 1 FROM assessment_sessions s WHERE s.id = f.session_id)) "
    "AS orphan_fc FROM c "
    f"UNION ALL SELECT * FROM (SELECT 'short', id, 0, 0, 0, 0, 0 FROM c WHERE answers < {MIN_ANSWERS} "
    f"ORDER BY id LIMIT {LISTED}) short_ids "
    f"UNION ALL SELECT * FROM (SELECT 'fc', id, 0, 0, 0, 0, 0 FROM c WHERE fc < {_FC_BLOCKS} "
    f"ORDER BY id LIMIT {LISTED}) fc_ids"
)


@dataclass(frozen=True)
class _AnswerCounts:
    """What the one pass over both answers tables found (counts exact, id lists capped at LISTED)."""

    short: int
    partial: int
    fc_short: int
    short_ids: list[str]
    fc_short_ids: list[str]
    orphan_answers: int
    orphan_fc: int


def _answer_counts(conn: Connection, p: dict[str, Any]) -> _AnswerCounts:
    totals: tuple[int, ...] = (0, 0, 0, 0, 0)
    short_ids: list[str] = []
    fc_short_ids: list[str] = []
    for kind, sid, *numbers in conn.execute(sa.text(_ANSWER_COUNTS), p):
        if kind == "totals":
            totals = tuple(int(n) for n in numbers)
        else:
            (short_ids if kind == "short" else fc_short_ids).append(str(sid))
    short, partial, fc_short, orphan_answers, orphan_fc = totals
    return _AnswerCounts(short, partial, fc_short, sorted(short_ids), sorted(fc_short_ids), orphan_answers, orphan_fc)


def _sufficiency(counts: _AnswerCounts, completed: int) -> Check:
    return Check(
        "answer_sufficiency",
        _verdict(counts.short, completed),
        f"{counts.short} completed sessions with < {MIN_ANSWERS} answers, {counts.partial} with {MIN_ANSWERS}-"
        f"{_FULL_ANSWERS - 1}, {counts.fc_short} with fewer than {_FC_BLOCKS} FC answers",
        {
            "completed": completed,
            "below_148": counts.short,
            "below_148_sessions": counts.short_ids,
            "partial_148_to_247": counts.partial,
            "fc_below_6": counts.fc_short,
            "fc_below_6_sessions": counts.fc_short_ids,
        },
        _ANSWER_COUNTS,
    )


def _orphans(conn: Connection, counts: _AnswerCounts) -> Check:
    found: dict[str, int] = {}
    queries = []
    for table in ("profiles", "fc_scores"):
        sql = (
            f"SELECT count(*) FROM {table} t WHERE NOT EXISTS "
            f"(SELECT 1 FROM assessment_sessions s WHERE s.id = t.session_id)"
        )
        queries.append(sql)
        found[table] = int(conn.execute(sa.text(sql)).scalar_one())
    # The answers tables' orphans come from the answer_sufficiency pass, which grouped them by session already.
    found["fc_responses"] = counts.orphan_fc
    found["assessment_responses"] = counts.orphan_answers
    queries.append("fc_responses, assessment_responses: orphan_fc, orphan_answers of the answer_sufficiency query")
    total = sum(found.values())
    return Check(
        "orphans",
        "FAIL" if total else "PASS",
        "rows without a session: " + ", ".join(f"{t} {n}" for t, n in found.items()),
        found,
        "; ".join(queries),
    )


def _tokens(conn: Connection, p: dict[str, Any], completed: int) -> Check:
    base = "FROM assessment_sessions WHERE status = 'completed' AND created_at >= :since"
    missing = int(
        conn.execute(sa.text(f"SELECT count(*) {base} AND (share_token IS NULL OR share_token = '')"), p).scalar_one()
    )
    expired = int(
        conn.execute(
            sa.text(f"SELECT count(*) {base} AND (share_token_expires_at IS NULL OR share_token_expires_at <= :now)"), p
        ).scalar_one()
    )
    dup_sql = (
        "SELECT count(*) FROM (SELECT share_token FROM assessment_sessions GROUP BY share_token HAVING count(*) > 1) d"
    )
    duplicated = int(conn.execute(sa.text(dup_sql)).scalar_one())
    bad = missing + duplicated
    return Check(
        "share_tokens",
        _verdict(bad, completed),
        f"completed sessions: {missing} without a token, {expired} expired or without expiry (reported); "
        f"{duplicated} tokens shared by several sessions",
        {"completed": completed, "missing": missing, "expired_or_no_expiry": expired, "duplicated": duplicated},
        f"SELECT count(*) {base} AND share_token missing | expired at :now; {dup_sql}",
    )


_REQUIRED_POLICIES: dict[str, Sequence[str]] = {
    "profiles": ("profiles_owner_read", "profiles_service_role"),
    "assessment_sessions": ("sessions_owner_read",),
    "fc_scores": ("fc_scores_service_role",),
}


def _rls(conn: Connection) -> Check:
    rows = conn.execute(
        sa.text(
            "SELECT c.relname, c.relrowsecurity FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relname = ANY(:t) AND c.relkind = 'r'"
        ),
        {"t": list(PRISM_TABLES)},
    ).all()
    rls_off = sorted(name for name, on in rows if not on)
    policies = {
        (t, pol)
        for t, pol in conn.execute(
            sa.text("SELECT tablename, policyname FROM pg_policies WHERE schemaname = current_schema()")
        )
    }
    missing = [f"{t}.{pol}" for t, names in _REQUIRED_POLICIES.items() for pol in names if (t, pol) not in policies]
    visible = _anon_visible_profiles(conn)
    bad = len(rls_off) + len(missing) + (visible if isinstance(visible, int) else 0)
    return Check(
        "row_level_security",
        "FAIL" if bad else "PASS",
        f"RLS off on {rls_off or 'no table'}; missing policies {missing or 'none'}; "
        f"profiles visible to anon: {visible}",
        {"rls_off": rls_off, "missing_policies": missing, "anon_visible_profiles": visible},
        "pg_class.relrowsecurity, pg_policies; SET LOCAL ROLE anon; SELECT count(*) FROM profiles",
    )


def _anon_visible_profiles(conn: Connection) -> int | str:
    """Rows of profiles the ``anon`` role can see: 0, or 'no access' when the privilege is revoked (also 0 rows)."""
    with conn.begin_nested() as probe:
        try:
            conn.execute(sa.text("SET LOCAL ROLE anon"))
            result: int | str = int(conn.execute(sa.text("SELECT count(*) FROM profiles")).scalar_one())
        except sa.exc.ProgrammingError:
            result = "no access (privilege revoked)"
        probe.rollback()
    conn.execute(sa.text("RESET ROLE"))
    return result
