"""Finds the PRISM sessions whose derived rows are missing or stale and classifies each one, in set-based SQL.

Two stages per page, so that Python never holds more than one page of sessions:
1. keyset-paginated by session id (each page a range of ``span`` ids, its end read from the primary-key index), the
   sessions created since ``since`` that lack a v1.2 ``functions`` fc_scores row, lack a profile, or have a profile
   stamped with another results_version (outer joins answered by index range scans);
2. for those sessions only, ``page_size`` at a time, one grouped query each for answer counts and forced-choice
   answers (resolved or not).

Categories (a session is counted once, in the first that applies):
- blocked, never a candidate: ``not_completed``, ``insufficient_answers`` (< 148 answer rows, the platform's own
  completion threshold), ``no_fc_responses`` (FC needed but nothing to tally: the platform writes nothing),
  ``unresolvable_fc_options`` (FC answers exist but none points at a known option: the platform would write ``{}``);
- candidates: ``profile+fc`` (needs both), ``fc_only`` (has a profile), ``profile_only`` (has the FC row),
  ``stale_profile`` (profile from another results_version; rescored only when asked).
"""

from __future__ import annotations

from collections.abc import Iterator
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


def _page_end(after: str | None, span: int) -> sa.Select[Any]:
    """The id of the ``span``-th session after ``after`` (none: fewer remain), read from the primary-key index."""
    s = assessment_sessions
    query = sa.select(s.c.id).order_by(s.c.id).offset(span - 1).limit(1)
    return query.where(s.c.id > after) if after is not None else query


def _needs_work_page(
    since: datetime, after: str | None, upto: str | None, fc_version: str, engine_version: str
) -> sa.Select[Any]:
    """The sessions with ids in ``(after, upto]`` that lack a row or have a stale profile, in id order.

    A page is a range of ids, not "the next N that need work": with a LIMIT, the planner has to guess how many
    sessions pass the filter and, guessing few, hash-joined every remaining session on every page. A range of known
    size gets index range scans on all three tables whatever the share of sessions needing work. fc_scores (primary
    key session_id, version, fc_kind) and profiles (unique session_id) hold at most one row per session, so both are
    outer-joined rather than probed with EXISTS (which Postgres evaluated twice per session); the range is repeated
    on them because the planner does not carry it across an outer join.
    """
    s, p, f = assessment_sessions, profiles, fc_scores
    fc_on = sa.and_(f.c.session_id == s.c.id, f.c.version == fc_version, f.c.fc_kind == "functions")
    profile_on = p.c.session_id == s.c.id
    where = [s.c.created_at >= since]
    if after is not None:
        fc_on = sa.and_(fc_on, f.c.session_id > after)
        profile_on = sa.and_(profile_on, p.c.session_id > after)
        where.append(s.c.id > after)
    if upto is not None:
        fc_on = sa.and_(fc_on, f.c.session_id <= upto)
        profile_on = sa.and_(profile_on, p.c.session_id <= upto)
        where.append(s.c.id <= upto)
    r, fr, o = assessment_responses, fc_responses, fc_options
    # Counted in the select list, so only for the sessions that pass the filter (a scalar subquery per output row,
    # each an index scan of that one session's rows).
    answers = sa.select(sa.func.count()).where(r.c.session_id == s.c.id).scalar_subquery()
    fc_answers = sa.select(sa.func.count()).where(fr.c.session_id == s.c.id).scalar_subquery()
    fc_resolved = (
        sa.select(sa.func.count())
        .select_from(fr.join(o, o.c.id == fr.c.option_id))
        .where(fr.c.session_id == s.c.id)
        .scalar_subquery()
    )
    return (
        sa.select(
            s.c.id,
            s.c.status,
            s.c.created_at,
            s.c.completed_at,
            f.c.session_id.is_not(None).label("has_fc"),
            p.c.id.label("profile_id"),
            p.c.results_version,
            answers.label("answers"),
            fc_answers.label("fc_answers"),
            fc_resolved.label("fc_resolved"),
        )
        .select_from(s.outerjoin(f, fc_on).outerjoin(p, profile_on))
        .where(
            *where,
            sa.or_(f.c.session_id.is_(None), p.c.id.is_(None), p.c.results_version.is_distinct_from(engine_version)),
        )
        .order_by(s.c.id)
    )


def discover(
    conn: Connection,
    *,
    since: datetime,
    fc_version: str,
    engine_version: str,
    span: int = 20_000,
) -> Iterator[Finding]:
    """Yields every session created since ``since`` that needs work or is blocked, in session-id order.

    Each keyset page covers ``span`` sessions (a range of ids); Python holds one page's findings at a time.
    """
    after: str | None = None
    while True:
        upto = conn.execute(_page_end(after, span)).scalar_one_or_none()
        for row in conn.execute(_needs_work_page(since, after, upto, fc_version, engine_version)).all():
            finding = _finding(row, engine_version)
            if finding is not None:
                yield finding
        if upto is None:
            return
        after = upto


def _finding(row: Any, engine_version: str) -> Finding | None:
    has_profile = row.profile_id is not None
    category = classify(
        status=row.status,
        has_fc=bool(row.has_fc),
        has_profile=has_profile,
        profile_version=row.results_version,
        engine_version=engine_version,
        answers=row.answers,
        fc_answers=row.fc_answers,
        fc_resolved=row.fc_resolved,
    )
    if category is None:
        return None
    return Finding(
        session_id=row.id,
        category=category,
        status=row.status,
        created_at=row.created_at,
        completed_at=row.completed_at,
        has_fc=bool(row.has_fc),
        has_profile=has_profile,
        profile_version=row.results_version,
        answers=row.answers,
        fc_answers=row.fc_answers,
        fc_resolved=row.fc_resolved,
    )
