"""Real write failures inside finalize (a trigger refuses the row) on SQLite and Postgres: the failed write is named by
its own event and status, every write of the call is rolled back, the session is still completed, and the events are
those logged up to the failed write. On Postgres the writes go to the server in one pipelined batch, so this also
proves that a failure inside the batch is attributed to the statement that failed."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from gatefill.prism.platform.service import EVENTS
from gatefill.prism.schema import assessment_sessions, fc_scores, fn_logs, profiles
from tests.prism.conftest import Live, refused_writes


def _names(live: Live, session_id: str) -> list[str]:
    with live.db.connect() as conn:
        rows = conn.execute(sa.select(fn_logs.c.evt, fn_logs.c.payload).order_by(fn_logs.c.id)).all()
    return [r.evt for r in rows if r.payload and r.payload.get("session_id") == session_id]


def _rows(live: Live, table: sa.Table, session_id: str) -> list[Any]:
    with live.db.connect() as conn:
        return list(conn.execute(sa.select(table).where(table.c.session_id == session_id)))


def _status(live: Live, session_id: str) -> tuple[str, bool]:
    s = assessment_sessions
    with live.db.connect() as conn:
        row = conn.execute(sa.select(s.c.status, s.c.finalized_at).where(s.c.id == session_id)).one()
    return row.status, row.finalized_at is not None


def test_a_refused_profile_write_is_a_500_with_its_event_and_nothing_written(live: Live) -> None:
    r = live.respondent()
    with refused_writes(live, "profiles", r.session_id):
        resp = live.post("finalizeAssessment", {"session_id": r.session_id}, ip="10.77.0.1")
    assert resp.status_code == 500
    assert resp.json() == {"error": "profile write failed", "code": "PROFILE_WRITE_FAILED"}
    assert _rows(live, profiles, r.session_id) == []
    assert _rows(live, fc_scores, r.session_id) == []  # written before the profile, rolled back with it
    assert _status(live, r.session_id) == ("completed", True)
    names = _names(live, r.session_id)
    assert names[:4] == ["fc_scoring_start", "fc_tally_complete", "fc_scores_normalized", "fc_scoring_complete"]
    assert names[-1] == "profile_write_failed" and "finalize_complete" not in names
    assert set(names) <= set(EVENTS)
    # The same session scores once the table takes writes again.
    again = live.post("finalizeAssessment", {"session_id": r.session_id}, ip="10.77.0.1")
    assert again.status_code == 200 and len(_rows(live, profiles, r.session_id)) == 1


def test_a_refused_fc_write_is_a_500_fc_upsert_error_before_any_profile_event(live: Live) -> None:
    r = live.respondent()
    with refused_writes(live, "fc_scores", r.session_id):
        resp = live.post("finalizeAssessment", {"session_id": r.session_id}, ip="10.77.0.2")
    assert resp.status_code == 500
    assert resp.json() == {"error": "fc_scores write failed", "code": "FC_UPSERT_ERROR"}
    assert _rows(live, profiles, r.session_id) == [] and _rows(live, fc_scores, r.session_id) == []
    assert _status(live, r.session_id) == ("completed", True)
    assert _names(live, r.session_id) == [
        "fc_scoring_start",
        "fc_tally_complete",
        "fc_scores_normalized",
        "fc_upsert_error",
    ]


def test_a_refused_event_write_is_a_500_without_rows(live: Live) -> None:
    """A failure after the scoring writes (the events insert) is a plain database error: nothing of the call stays."""
    r = live.respondent()
    json_key = {"sqlite_key": "json_extract(NEW.payload, '$.session_id')", "pg_key": "NEW.payload->>'session_id'"}
    with refused_writes(live, "fn_logs", r.session_id, **json_key):
        resp = live.post("finalizeAssessment", {"session_id": r.session_id}, ip="10.77.0.3")
    assert resp.status_code == 500 and resp.json()["code"] == "DATABASE_ERROR"
    assert _rows(live, profiles, r.session_id) == [] and _rows(live, fc_scores, r.session_id) == []
    assert _status(live, r.session_id)[0] == "in_progress"
