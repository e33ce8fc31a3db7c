"""Finds the PRISM sessions whose derived rows are missing or stale and classifies each one, in set-based SQL.

Two stages per page, so that Python never holds more than one page of sessions:
1. keyset-paginated by session id, the sessions created since ``since`` that lack a v1.2 ``functions`` fc_scores row,
   lack a profile, or have a profile stamped with another results_version (anti-joins answered from indexes);
2. for that page only, one grouped query each for answer counts and forced-choice answers (resolved or not).

Categories (a session is counted once, in the first that applies):
- blocked, never a candidate: ``not_completed``, ``insufficient_answers`` (< 148 answer rows, the platform's own
  completion threshold), ``no_fc_responses`` (FC needed but nothing to tally: the platform writes nothing),
  ``unresolvable_fc_options`` (FC answers exist but none points at a known option: the platform would write ``{}``);
- candidates: ``profile+fc`` (needs both), ``fc_only`` (has a profile), ``profile_only`` (has the FC row),
  ``stale_profile`` (profile from another results_version; rescored only when asked).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill.prism.schema import (
    assessment_responses,
    assessment_sessions,
    fc_options,
    fc_responses,
    fc_scores,
    profiles,
)

__all__ = [
    "BLOCKED_CATEGORIES",
    "CANDIDATE_CATEGORIES",
    "MIN_ANSWERS",
    "Finding",
    "classify",
    "discover",
]

#: The platform's completion threshold (trigger ``tg_sessions_autocomplete_148``): fewer answers cannot be scored
#: as a completed assessment.
MIN_ANSWERS = 148
CANDIDATE_CATEGORIES = ("profile+fc", "fc_only", "profile_only", "stale_profile")
BLOCKED_CATEGORIES = ("not_completed", "insufficient_answers", "no_fc_responses", "unresolvable_fc_options")


@dataclass(frozen=True)
class Finding:
    """One session that lacks or has stale derived rows, with the evidence its category rests on."""

    session_id: str
    category: str
    status: str | None
    created_at: datetime
    completed_at: datetime | None
    has_fc: bool
    has_profile: bool
    profile_version: str | None
    answers: int
    fc_answers: int
    fc_resolved: int

    @property
    def blocked(self) -> bool:
        return self.category in BLOCKED_CATEGORIES

    @property
    def needs_fc(self) -> bool:
        return not self.has_fc

    @property
    def needs_profile(self) -> bool:
        return not self.has_profile


def classify(
    *,
    status: str | None,
    has_fc: bool,
    has_profile: bool,
    profile_version: str | None,
    engine_version: str,
    answers: int,
    fc_answers: int,
    fc_resolved: int,
) -> str | None:
    """The category of one session, or None when nothing about it needs work."""
    stale = has_profile and profile_version != engine_version
    if has_fc and has_profile and not stale:
        return None
    if status != "completed":
        return "not_completed"
    if answers < MIN_ANSWERS:
        return "insufficient_answers"
    if not has_fc and fc_answers == 0:
        return "no_fc_responses"
    if not has_fc and fc_resolved == 0:
        return "unresolvable_fc_options"
    if not has_fc:
        return "fc_only" if has_profile else "profile+fc"
    if not has_profile:
        return "profile_only"
    return "stale_profile"


def _needs_work_page(
    since: datetime, after: str | None, fc_version: str, engine_version: str, limit: int
) -> sa.Select[Any]:
    s, p = assessment_sessions, profiles
    has_fc = (
        sa.select(sa.literal(1))
        .where(fc_scores.c.session_id == s.c.id, fc_scores.c.version == fc_version, fc_scores.c.fc_kind == "functions")
        .exists()
    )
    query = (
        sa.select(
            s.c.id,
            s.c.status,
            s.c.created_at,
            s.c.completed_at,
            has_fc.label("has_fc"),
            p.c.id.label("profile_id"),
            p.c.results_version,
        )
        .select_from(s.outerjoin(p, p.c.session_id == s.c.id))
        .where(
            s.c.created_at >= since,
            sa.or_(~has_fc, p.c.id.is_(None), p.c.results_version.is_distinct_from(engine_version)),
        )
        .order_by(s.c.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(s.c.id > after)
    return query


def _answer_counts_query(ids: Sequence[str]) -> sa.Select[Any]:
    r = assessment_responses
    return sa.select(r.c.session_id, sa.func.count()).where(r.c.session_id.in_(ids)).group_by(r.c.session_id)


def _fc_counts_query(ids: Sequence[str]) -> sa.Select[Any]:
    f, o = fc_responses, fc_options
    return (
        sa.select(f.c.session_id, sa.func.count(), sa.func.count(o.c.id))
        .select_from(f.outerjoin(o, o.c.id == f.c.option_id))
        .where(f.c.session_id.in_(ids))
        .group_by(f.c.session_id)
    )


def _answer_counts(conn: Connection, ids: Sequence[str]) -> dict[str, int]:
    return {sid: n for sid, n in conn.execute(_answer_counts_query(ids))}


def _fc_counts(conn: Connection, ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    return {sid: (n, resolved) for sid, n, resolved in conn.execute(_fc_counts_query(ids))}


def discover(
    conn: Connection,
    *,
    since: datetime,
    fc_version: str,
    engine_version: str,
    page_size: int = 2000,
) -> Iterator[Finding]:
    """Yields every session created since ``since`` that needs work or is blocked, in session-id order."""
    after: str | None = None
    while True:
        page = conn.execute(_needs_work_page(since, after, fc_version, engine_version, page_size)).all()
        if not page:
            return
        ids = [row.id for row in page]
        answers = _answer_counts(conn, ids)
        fc = _fc_counts(conn, ids)
        for row in page:
            n_fc, n_resolved = fc.get(row.id, (0, 0))
            has_profile = row.profile_id is not None
            category = classify(
                status=row.status,
                has_fc=bool(row.has_fc),
                has_profile=has_profile,
                profile_version=row.results_version,
                engine_version=engine_version,
                answers=answers.get(row.id, 0),
                fc_answers=n_fc,
                fc_resolved=n_resolved,
            )
            if category is None:
                continue
            yield Finding(
                session_id=row.id,
                category=category,
                status=row.status,
                created_at=row.created_at,
                completed_at=row.completed_at,
                has_fc=bool(row.has_fc),
                has_profile=has_profile,
                profile_version=row.results_version,
                answers=answers.get(row.id, 0),
                fc_answers=n_fc,
                fc_resolved=n_resolved,
            )
        after = ids[-1]
