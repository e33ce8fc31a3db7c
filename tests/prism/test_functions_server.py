"""The PRISM functions over real HTTP (uvicorn on 127.0.0.1) on SQLite and Postgres: contracts, rows, events, tokens,
limits, faults and secrets."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gatefill.clock import SimulatedClock
from gatefill.config import Environment
from gatefill.errors import ConfigError, SchemaMissing, UsageError
from gatefill.prism import scoring
from gatefill.prism.inputs import load_reference_data_from_db, load_session_inputs
from gatefill.prism.platform.server import RateLimiter, create_app, serve_functions
from gatefill.prism.platform.service import EVENTS, Faults
from gatefill.prism.sandbox.simulator import new_respondent, write_answers, write_session
from gatefill.prism.schema import (
    assessment_responses,
    assessment_sessions,
    fc_scores,
    fn_logs,
    profiles,
    results_token_access_logs,
    scoring_config,
)
from tests.conftest import Target, pg_env
from tests.prism.conftest import KEY_ENV, SERVICE_KEY, Live, run_server

# The functions server also runs through PgBouncer in transaction mode here (the `pooled` parameter of `live`).
pytestmark = pytest.mark.pooled


def _ip() -> str:
    """A client address of this test's own, so the module server's rate limiter never mixes tests."""
    return f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


def _events(live: Live, session_id: str) -> list[tuple[str, dict[str, Any], datetime]]:
    with live.db.connect() as conn:
        rows = conn.execute(sa.select(fn_logs.c.evt, fn_logs.c.payload, fn_logs.c.at).order_by(fn_logs.c.id)).all()
    return [(r.evt, r.payload, r.at) for r in rows if r.payload and r.payload.get("session_id") == session_id]


def _names(live: Live, session_id: str) -> list[str]:
    return [name for name, _, _ in _events(live, session_id)]


def _one(live: Live, table: sa.Table, session_id: str) -> list[dict[str, Any]]:
    with live.db.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(table).where(table.c.session_id == session_id)).mappings()]


def _session(live: Live, session_id: str) -> dict[str, Any]:
    with live.db.connect() as conn:
        row = conn.execute(sa.select(assessment_sessions).where(assessment_sessions.c.id == session_id)).mappings()
        return dict(row.one())


def _now_header(at: datetime) -> dict[str, str]:
    return {"x-gatefill-now": at.isoformat()}


def _finalize(live: Live, session_id: str, **kwargs: Any) -> httpx.Response:
    return live.post("finalizeAssessment", {"session_id": session_id}, ip=kwargs.pop("ip", _ip()), **kwargs)


# ====================================================================================================================
# The functions compute what the library computes and write what they say


def test_score_fc_session_equals_library_and_upserts_keeping_created_at(live: Live) -> None:
    r = live.respondent()
    at = datetime(2025, 9, 17, 18, 0, tzinfo=UTC)
    first = live.post("score_fc_session", {"session_id": r.session_id}, key=True, headers=_now_header(at))
    assert first.status_code == 200, first.text
    with live.db.connect() as conn:
        inputs = load_session_inputs(conn, [r.session_id])[r.session_id]
        ref = load_reference_data_from_db(conn)
    expected = scoring.score_fc_session(inputs.fc_responses, ref.fc_options, "functions")
    body = first.json()
    assert body == {
        "session_id": r.session_id,
        "version": "v1.2",
        "basis": "functions",
        "blocks_answered": 6,
        "scores": expected.scores,
    }
    # The package's own reference data gives the same tally (the DB holds the shipped seed).
    assert scoring.score_fc_session(inputs.fc_responses, scoring.ReferenceData.from_package().fc_options) == expected
    later = at + timedelta(hours=1)
    again = live.post("score_fc_session", {"session_id": r.session_id}, key=True, headers=_now_header(later))
    assert again.status_code == 200
    rows = _one(live, fc_scores, r.session_id)
    assert len(rows) == 1
    assert rows[0]["created_at"] == at  # kept on re-runs, as the upsert upstream
    assert rows[0]["scores_json"] == expected.scores and rows[0]["blocks_answered"] == 6
    names = _names(live, r.session_id)
    once = ["fc_scoring_start", "fc_tally_complete", "fc_scores_normalized", "fc_scoring_complete"]
    assert names == once + once


def test_score_fc_session_without_responses_writes_nothing(live: Live) -> None:
    r = live.respondent(fc=False)
    resp = live.post("score_fc_session", {"session_id": r.session_id, "version": "v1.1"}, key=True)
    assert resp.status_code == 200
    assert resp.json() == {
        "session_id": r.session_id,
        "version": "v1.1",
        "basis": "functions",
        "blocks_answered": 0,
        "scores": {},
        "info": "no fc responses",
    }
    assert _one(live, fc_scores, r.session_id) == []
    assert _names(live, r.session_id) == ["fc_version_mismatch", "fc_scoring_start", "fc_no_responses"]


def test_score_prism_equals_score_session_row_for_row(live: Live) -> None:
    r = live.respondent()
    at = datetime(2025, 9, 17, 19, 0, tzinfo=UTC)
    assert live.post("score_fc_session", {"session_id": r.session_id}, key=True).status_code == 200
    resp = live.post(
        "score_prism", {"session_id": r.session_id, "engine_version": "x"}, key=True, headers=_now_header(at)
    )
    assert resp.status_code == 200, resp.text
    with live.db.connect() as conn:
        inputs = load_session_inputs(conn, [r.session_id], with_fc_responses=False)[r.session_id]
    expected = scoring.score_session(inputs, scoring.ReferenceData.from_package(), at, None)
    assert expected.profile_row is not None
    body = resp.json()
    assert body["status"] == "success"
    assert body["profile"] == json.loads(json.dumps(expected.profile_row))
    assert body["gap_to_second"] == expected.profile_row["top_gap"]
    stored = _one(live, profiles, r.session_id)
    assert len(stored) == 1
    for key, value in expected.profile_row.items():
        if key.endswith("_at") and value is not None:
            assert stored[0][key] == at, key
        else:
            assert json.loads(json.dumps(stored[0][key])) == json.loads(json.dumps(value)), key
    assert stored[0]["results_version"] == "v1.2.1" and stored[0]["recomputed_at"] is None
    assert "fc_scores_loaded" in _names(live, r.session_id)


def test_score_prism_without_fc_row_takes_the_legacy_branch(live: Live) -> None:
    r = live.respondent()
    resp = live.post("score_prism", {"session_id": r.session_id}, key=True)
    assert resp.status_code == 200
    names = _names(live, r.session_id)
    assert "fc_fallback_legacy" in names and "fc_no_responses" not in names


def test_score_prism_without_answers_is_400(live: Live) -> None:
    r = live.respondent(answers=False)
    resp = live.post("score_prism", {"session_id": r.session_id}, key=True)
    assert resp.status_code == 400
    assert resp.json() == {"error": "no responses", "code": "NO_RESPONSES"}
    assert _one(live, profiles, r.session_id) == []


def test_stored_results_version_drift_is_logged_and_the_row_still_says_v121(live: Live) -> None:
    r = live.respondent()
    with live.db.begin() as conn:
        conn.execute(sa.update(scoring_config).where(scoring_config.c.key == "results_version").values(value="v1.3.0"))
    try:
        resp = live.post("score_prism", {"session_id": r.session_id}, key=True)
    finally:
        with live.db.begin() as conn:
            conn.execute(
                sa.update(scoring_config).where(scoring_config.c.key == "results_version").values(value="v1.2.1")
            )
    assert resp.status_code == 200
    override = [p for name, p, _ in _events(live, r.session_id) if name == "engine_version_override"]
    assert override and override[0]["db_version"] == "v1.3.0" and override[0]["engine_version"] == "v1.2.1"
    assert _one(live, profiles, r.session_id)[0]["results_version"] == "v1.2.1"


def test_finalize_completes_the_session_and_rescoring_keeps_one_profile(live: Live) -> None:
    r = live.respondent()
    at = datetime(2025, 9, 17, 20, 0, tzinfo=UTC)
    resp = _finalize(live, r.session_id, key=True, headers=_now_header(at))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ok"] is True and body["status"] == "success" and body["session_id"] == r.session_id
    assert body["share_token"] == r.share_token  # the existing token is kept
    assert body["results_url"] == f"{live.base_url}/results/{r.session_id}?t={r.share_token}"
    session = _session(live, r.session_id)
    assert session["status"] == "completed"
    assert session["completed_at"] == session["finalized_at"] == at
    assert session["share_token_expires_at"] == at + timedelta(days=30)
    assert session["completed_questions"] == 248
    assert len(_one(live, fc_scores, r.session_id)) == 1
    first = _one(live, profiles, r.session_id)
    assert len(first) == 1 and first[0]["submitted_at"] == at and first[0]["recomputed_at"] is None
    names = _names(live, r.session_id)
    assert names[-1] == "finalize_complete" and "fc_scores_loaded" in names
    later = at + timedelta(minutes=5)
    assert _finalize(live, r.session_id, key=True, headers=_now_header(later)).status_code == 200
    second = _one(live, profiles, r.session_id)
    assert len(second) == 1 and second[0]["id"] == first[0]["id"]
    assert second[0]["submitted_at"] == at and second[0]["created_at"] == at and second[0]["recomputed_at"] == later
    assert _session(live, r.session_id)["share_token_expires_at"] == at + timedelta(days=30)


def test_finalize_of_an_unknown_session_is_422_and_writes_no_rows(live: Live) -> None:
    sid = str(uuid.uuid4())
    resp = _finalize(live, sid)
    assert resp.status_code == 422
    assert resp.json() == {"error": "no responses", "code": "NO_RESPONSES"}
    assert _one(live, profiles, sid) == [] and _one(live, fc_scores, sid) == []


# ====================================================================================================================
# Authentication


@pytest.mark.parametrize("name", ["score_fc_session", "score_prism"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic {key}", "Bearer", "Bearer {key}x"])
def test_scoring_functions_need_the_service_role_key(live: Live, name: str, authorization: str | None) -> None:
    r = live.respondent()
    # The key is filled in here, not in the parameters: test ids are printed.
    headers = {"authorization": authorization.format(key=SERVICE_KEY)} if authorization is not None else {}
    resp = live.post(name, {"session_id": r.session_id}, headers=headers)
    assert resp.status_code == 401
    assert resp.json() == {"error": "missing or invalid service-role key", "code": "UNAUTHORIZED"}
    assert _names(live, r.session_id) == []


def test_create_app_refuses_to_start_without_the_key_and_names_only_the_variable(live: Live) -> None:
    env = Environment("keyless", "staging", live.env.database_url, service_role_key_env="GATEFILL_TEST_UNSET_KEY")
    with pytest.raises(ConfigError, match="GATEFILL_TEST_UNSET_KEY"):
        create_app(env, live.db)


def test_serve_functions_refuses_fault_injection_on_production_and_taken_ports(live: Live) -> None:
    prod = Environment("prod", "production", live.env.database_url, service_role_key_env=KEY_ENV)
    with pytest.raises(UsageError, match="production"):
        serve_functions(prod, allow_fault_injection=True)
    port = int(live.base_url.rsplit(":", 1)[1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, SERVICE_KEY)
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_functions(live.env, port=port)


def test_serve_functions_needs_the_schema(empty_pg: str) -> None:
    with pytest.raises(SchemaMissing, match="gatefill db init"):
        serve_functions(pg_env(empty_pg))


# ====================================================================================================================
# The results token matrix


def _results(live: Live, session_id: str, token: str | None, ip: str) -> httpx.Response:
    body: dict[str, Any] = {"session_id": session_id}
    if token is not None:
        body["share_token"] = token
    return live.post("get-results-by-session", body, ip=ip)


def test_results_token_matrix(live: Live) -> None:
    ip = _ip()
    done = live.respondent()
    other = live.respondent()
    unfinished = live.respondent()
    no_profile = live.respondent()
    expired = live.respondent()
    for r in (done, other, no_profile, expired):
        assert _finalize(live, r.session_id, ip=ip).status_code == 200
    with live.db.begin() as conn:
        conn.execute(sa.delete(profiles).where(profiles.c.session_id == no_profile.session_id))
        conn.execute(
            sa.update(assessment_sessions)
            .where(assessment_sessions.c.id == expired.session_id)
            .values(share_token_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    cases = [
        (done.session_id, None, 401, "TOKEN_REQUIRED"),
        (done.session_id, "", 401, "TOKEN_REQUIRED"),
        (done.session_id, "not-the-token", 403, "ACCESS_DENIED"),
        (done.session_id, other.share_token, 403, "ACCESS_DENIED"),  # another session's valid token
        (done.session_id, done.share_token.upper(), 403, "ACCESS_DENIED"),
        (done.session_id, done.share_token + "x" * 300, 403, "ACCESS_DENIED"),
        (str(uuid.uuid4()), done.share_token, 403, "ACCESS_DENIED"),  # unknown session: no existence leak
        (unfinished.session_id, unfinished.share_token, 403, "ACCESS_DENIED"),  # not completed
        (expired.session_id, expired.share_token, 403, "ACCESS_DENIED"),
        (no_profile.session_id, no_profile.share_token, 404, "PROFILE_NOT_FOUND"),
    ]
    for session_id, token, status, code in cases:
        resp = _results(live, session_id, token, ip)
        assert resp.status_code == status, (session_id, token, resp.text)
        assert resp.json() == {"error": resp.json()["error"], "code": code}
    ok = _results(live, done.session_id, done.share_token, ip)
    assert ok.status_code == 200
    body = ok.json()
    assert body["status"] == "success" and body["profile"]["session_id"] == done.session_id
    assert body["session"] == {
        "id": done.session_id,
        "status": "completed",
        "completed_at": body["session"]["completed_at"],
        "finalized_at": body["session"]["finalized_at"],
    }
    assert "share_token" not in ok.text and done.share_token not in ok.text
    link_url = f"{live.base_url}/results/{done.session_id}"
    link = live.http.get(link_url, params={"t": done.share_token}, headers={"x-forwarded-for": ip})
    assert link.status_code == 200 and link.json()["profile"] == body["profile"]
    assert live.http.get(link_url, headers={"x-forwarded-for": ip}).status_code == 401

    # Every access is logged with the token's sha256, never the token.
    with live.db.connect() as conn:
        logs = (
            conn.execute(
                sa.select(results_token_access_logs).where(results_token_access_logs.c.session_id == done.session_id)
            )
            .mappings()
            .all()
        )
    hashes = [(row["token_hash"], row["success"]) for row in logs]
    sha = hashlib.sha256(done.share_token.encode()).hexdigest()
    assert (sha, True) in hashes and (hashlib.sha256(b"").hexdigest(), False) in hashes
    assert (hashlib.sha256(b"not-the-token").hexdigest(), False) in hashes
    assert all(done.share_token not in json.dumps(dict(row), default=str) for row in logs)
    assert all(row["ip"] == ip for row in logs)
    denied = [p for name, p, _ in _events(live, done.session_id) if name == "results_access_denied"]
    assert {p["reason"] for p in denied} >= {"no_token", "token_mismatch"}
    assert all(done.share_token not in json.dumps(p) for p in denied)


def test_results_are_rate_limited_per_client(live: Live) -> None:
    noisy, quiet = _ip(), _ip()
    sid = str(uuid.uuid4())
    statuses = [_results(live, sid, "t", noisy).status_code for _ in range(60)]
    assert set(statuses) == {403}
    limited = _results(live, sid, "t", noisy)
    assert limited.status_code == 429
    assert limited.json() == {"error": "too many requests; try again later", "code": "RATE_LIMITED"}
    assert int(limited.headers["retry-after"]) >= 1
    assert _results(live, sid, "t", quiet).status_code == 403


def test_rate_limiter_window_slides_on_the_injected_clock() -> None:
    clock = SimulatedClock(datetime(2025, 9, 17, tzinfo=UTC))
    limiter = RateLimiter(clock, limit=60, window=60.0)
    for _ in range(60):
        assert limiter.check("a") is None
        clock.advance(0.5)
    assert limiter.check("a") == pytest.approx(30.0)
    assert limiter.check("b") is None
    clock.advance(30.0)  # the first request leaves the window
    assert limiter.check("a") is None
    assert limiter.check("a") is not None


# ====================================================================================================================
# Bad input never reaches SQL


@pytest.fixture
def statements(live: Live) -> Iterator[list[str]]:
    """Every statement the database runs while the test does (server connections included, via pg_stat or events)."""
    seen: list[str] = []
    engine = _server_engine(live)

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def _server_engine(live: Live) -> sa.engine.Engine:
    engine: sa.engine.Engine = live.server_db.engine
    return engine


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"{not json", "INVALID_JSON"),
        (b"", "INVALID_JSON"),
        (b"[1, 2]", "INVALID_JSON"),
        (b'{"session_id": NaN}', "INVALID_JSON"),
        (b"\xff\xfe", "INVALID_JSON"),
        (b"{}", "SESSION_ID_REQUIRED"),
        (b'{"session_id": null}', "SESSION_ID_REQUIRED"),
        (b'{"session_id": "1; DROP TABLE profiles; --"}', "INVALID_SESSION_ID"),
        (b'{"session_id": "00000000-0000-0000-0000-00000000000"}', "INVALID_SESSION_ID"),
        (b'{"session_id": 42}', "INVALID_SESSION_ID"),
        (b'{"session_id": ["a"]}', "INVALID_SESSION_ID"),
    ],
)
@pytest.mark.parametrize("name", ["score_fc_session", "score_prism", "finalizeAssessment", "get-results-by-session"])
def test_bad_input_is_400_before_any_sql(
    live: Live, statements: list[str], name: str, content: bytes, code: str
) -> None:
    resp = live.post(name, content=content, key=True, ip=_ip(), headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"error": resp.json()["error"], "code": code}
    assert statements == []


def test_the_results_link_validates_its_session_id_before_any_sql(live: Live, statements: list[str]) -> None:
    resp = live.http.get(
        f"{live.base_url}/results/1%27%20OR%201=1", params={"t": "x"}, headers={"x-forwarded-for": _ip()}
    )
    assert resp.status_code == 400 and resp.json() == {
        "error": "session_id must be a UUID",
        "code": "INVALID_SESSION_ID",
    }
    assert statements == []


def test_bodies_over_64_kib_are_413(live: Live, statements: list[str]) -> None:
    big = json.dumps({"session_id": str(uuid.uuid4()), "pad": "x" * 70_000}).encode()
    resp = live.post("finalizeAssessment", content=big, ip=_ip())
    assert resp.status_code == 413
    assert resp.json() == {"error": "request body over 64 KiB", "code": "BODY_TOO_LARGE"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 4096

    streamed = live.http.post(f"{live.functions_url}/finalizeAssessment", content=chunks())
    assert streamed.status_code == 413
    assert statements == []


def test_unknown_functions_paths_and_methods_are_json_errors(live: Live) -> None:
    resp = live.post("drop_everything", {"session_id": str(uuid.uuid4())})
    assert resp.status_code == 404 and resp.json() == {"error": "function not found", "code": "FUNCTION_NOT_FOUND"}
    resp = live.http.get(f"{live.base_url}/nothing/here")
    assert resp.status_code == 404 and resp.json() == {"error": "not found", "code": "NOT_FOUND"}
    resp = live.http.get(f"{live.functions_url}/finalizeAssessment")
    assert resp.status_code == 405 and resp.json() == {"error": "method not allowed", "code": "METHOD_NOT_ALLOWED"}


def test_cors_is_open_like_upstream(live: Live) -> None:
    pre = live.http.options(
        f"{live.functions_url}/finalizeAssessment",
        headers={
            "origin": "https://prismassessment.com",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, apikey, x-client-info",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    resp = live.post("finalizeAssessment", {}, headers={"origin": "https://prismassessment.com"}, ip=_ip())
    assert resp.headers["access-control-allow-origin"] == "*"


# ====================================================================================================================
# Faults: only where allowed, with the key; each visible in rows and events


def test_fault_headers_are_refused_without_the_key(live: Live) -> None:
    r = live.respondent()
    resp = _finalize(live, r.session_id, headers={"x-gatefill-fault": "profile_write_fail"})
    assert resp.status_code == 401 and resp.json()["code"] == "UNAUTHORIZED"
    resp = _finalize(live, r.session_id, headers={"x-gatefill-now": "2020-01-01T00:00:00Z"})
    assert resp.status_code == 401
    resp = _finalize(live, r.session_id, key=True, headers={"x-gatefill-fault": "delete_everything"})
    assert resp.status_code == 400 and resp.json()["code"] == "INVALID_FAULT"
    assert _one(live, profiles, r.session_id) == [] and _names(live, r.session_id) == []


def test_a_server_without_fault_injection_refuses_fault_and_time_headers(live: Live) -> None:
    app = create_app(live.env, live.db, service_role_key=SERVICE_KEY)
    r = live.respondent()
    with run_server(app) as url, httpx.Client() as http:
        for header in ({"x-gatefill-fault": "profile_write_fail"}, {"x-gatefill-now": "2020-01-01T00:00:00Z"}):
            resp = http.post(
                f"{url}/functions/v1/finalizeAssessment",
                json={"session_id": r.session_id},
                headers={**header, "authorization": f"Bearer {SERVICE_KEY}"},
            )
            assert resp.status_code == 403
            assert resp.json() == {
                "error": "fault injection is not enabled on this server",
                "code": "FAULT_INJECTION_DISABLED",
            }
        assert http.post(f"{url}/functions/v1/finalizeAssessment", json={"session_id": r.session_id}).status_code == 200
    assert _session(live, r.session_id)["finalized_at"].year >= 2025
    assert "profile_write_failed" not in _names(live, r.session_id)


def test_fault_engine_version_override(live: Live) -> None:
    r = live.respondent()
    resp = _finalize(live, r.session_id, key=True, headers={"x-gatefill-fault": "engine_version_override"})
    assert resp.status_code == 200
    override = [p for name, p, _ in _events(live, r.session_id) if name == "engine_version_override"]
    assert len(override) == 1
    assert override[0]["db_version"] == "v1.2.0" and override[0]["injected"] == ["engine_version_override"]
    assert _one(live, profiles, r.session_id)[0]["results_version"] == "v1.2.1"  # hard-coded, as upstream
    with live.db.connect() as conn:  # the stored config never changed
        stored = conn.execute(sa.select(scoring_config.c.value).where(scoring_config.c.key == "results_version"))
        assert stored.scalar_one() == "v1.2.1"


def test_fault_legacy_fc(live: Live) -> None:
    r = live.respondent()
    resp = _finalize(live, r.session_id, key=True, headers={"x-gatefill-fault": "legacy_fc"})
    assert resp.status_code == 200
    assert _one(live, fc_scores, r.session_id) == []
    names = _names(live, r.session_id)
    assert "fc_fallback_legacy" in names and "fc_scoring_start" not in names
    finals = [p for name, p, _ in _events(live, r.session_id) if name == "finalize_complete"]
    assert finals[0]["fc_source"] == "legacy"


def test_fault_profile_write_fail_is_a_500_with_an_event_and_no_profile(live: Live) -> None:
    r = live.respondent()
    resp = _finalize(live, r.session_id, key=True, headers={"x-gatefill-fault": "profile_write_fail"})
    assert resp.status_code == 500
    assert resp.json() == {"error": "profile write failed", "code": "PROFILE_WRITE_FAILED"}
    assert _one(live, profiles, r.session_id) == []
    assert _one(live, fc_scores, r.session_id) == []  # a failed call rolls back all of its writes
    assert _session(live, r.session_id)["status"] == "completed"  # the respondent did finish: a backfill candidate
    names = _names(live, r.session_id)
    assert "profile_write_failed" in names and "finalize_complete" not in names
    direct = live.post(
        "score_prism", {"session_id": r.session_id}, key=True, headers={"x-gatefill-fault": "profile_write_fail"}
    )
    assert direct.status_code == 500 and _one(live, profiles, r.session_id) == []


def test_fault_token_bypass_serves_without_a_token_and_leaves_evidence(live: Live) -> None:
    r = live.respondent()
    ip = _ip()
    assert _finalize(live, r.session_id, ip=ip).status_code == 200
    assert _results(live, r.session_id, None, ip).status_code == 401
    resp = live.post(
        "get-results-by-session",
        {"session_id": r.session_id},
        key=True,
        ip=ip,
        headers={"x-gatefill-fault": "token_bypass"},
    )
    assert resp.status_code == 200 and resp.json()["profile"]["session_id"] == r.session_id
    with live.db.connect() as conn:
        logs = conn.execute(
            sa.select(results_token_access_logs.c.token_hash, results_token_access_logs.c.success).where(
                results_token_access_logs.c.session_id == r.session_id
            )
        ).all()
    empty = hashlib.sha256(b"").hexdigest()
    assert (empty, True) in [tuple(row) for row in logs] and (empty, False) in [tuple(row) for row in logs]
    tokenless = [p for name, p, _ in _events(live, r.session_id) if name == "tokenless_access"]
    assert [p["served"] for p in tokenless] == [False, True]


def test_fault_slow_adds_latency(live: Live) -> None:
    r = live.respondent()
    started = time.perf_counter()
    resp = _finalize(live, r.session_id, key=True, headers={"x-gatefill-fault": "slow=300"})
    assert resp.status_code == 200 and time.perf_counter() - started >= 0.3
    finals = [p for name, p, _ in _events(live, r.session_id) if name == "finalize_complete"]
    assert finals[0]["delay_ms"] == 300 and finals[0]["injected"] == ["slow"]


def test_simulated_now_stamps_every_server_written_row(live: Live) -> None:
    at = datetime(2025, 9, 17, 21, 30, 15, 123000, tzinfo=UTC)
    r = live.respondent(at=at - timedelta(minutes=20))
    ip = _ip()
    assert _finalize(live, r.session_id, key=True, ip=ip, headers=_now_header(at)).status_code == 200
    later = at + timedelta(seconds=5)
    resp = live.post(
        "get-results-by-session",
        {"session_id": r.session_id, "share_token": r.share_token},
        key=True,
        ip=ip,
        headers=_now_header(later),
    )
    assert resp.status_code == 200
    assert _one(live, fc_scores, r.session_id)[0]["created_at"] == at
    profile = _one(live, profiles, r.session_id)[0]
    assert profile["created_at"] == profile["submitted_at"] == profile["updated_at"] == at
    session = _session(live, r.session_id)
    assert session["completed_at"] == session["finalized_at"] == at
    assert {stamp for _, _, stamp in _events(live, r.session_id)} == {at}
    assert [row["ts"] for row in _one(live, results_token_access_logs, r.session_id)] == [later]


def test_faults_parse_and_render() -> None:
    faults = Faults.parse(" legacy_fc , slow=120,token_bypass")
    assert faults.names == {"legacy_fc", "slow", "token_bypass"} and faults.slow_ms == 120
    assert Faults.parse(faults.header()) == faults
    assert Faults.parse("slow").slow_ms == 250
    for bad in ("nope", "slow=abc", "slow=99999", "legacy_fc=1"):
        with pytest.raises(ValueError):
            Faults.parse(bad)


# ====================================================================================================================
# Concurrency and secrets


def test_50_concurrent_finalize_calls_give_one_profile_per_session(live: Live) -> None:
    respondents = [live.respondent() for _ in range(25)]
    calls = [r.session_id for r in respondents for _ in range(2)]

    def finalize(session_id: str) -> int:
        with httpx.Client(timeout=60) as http:
            resp = http.post(f"{live.functions_url}/finalizeAssessment", json={"session_id": session_id})
            return resp.status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(finalize, calls))
    assert statuses == [200] * 50
    ids = [r.session_id for r in respondents]
    with live.db.connect() as conn:
        per_profile = conn.execute(
            sa.select(profiles.c.session_id, sa.func.count())
            .where(profiles.c.session_id.in_(ids))
            .group_by(profiles.c.session_id)
        ).all()
        per_fc = conn.execute(
            sa.select(fc_scores.c.session_id, sa.func.count())
            .where(fc_scores.c.session_id.in_(ids))
            .group_by(fc_scores.c.session_id)
        ).all()
        completed = conn.execute(
            sa.select(sa.func.count())
            .select_from(assessment_sessions)
            .where(assessment_sessions.c.id.in_(ids), assessment_sessions.c.status == "completed")
        ).scalar_one()
        recomputed = conn.execute(
            sa.select(sa.func.count())
            .select_from(profiles)
            .where(profiles.c.session_id.in_(ids), profiles.c.recomputed_at.is_not(None))
        ).scalar_one()
    assert sorted(n for _, n in per_profile) == [1] * 25
    assert sorted(n for _, n in per_fc) == [1] * 25
    assert completed == 25
    assert recomputed == 25  # each session's second call saw the first one's profile: serialised, not lost
    finals = [name for r in respondents for name in _names(live, r.session_id) if name == "finalize_complete"]
    assert len(finals) == 50


def test_the_service_role_key_appears_nowhere(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    r = live.respondent()
    bodies = [
        _finalize(live, r.session_id, key=True, headers={"x-gatefill-fault": "profile_write_fail"}).text,
        _finalize(live, r.session_id, key=True).text,
        live.post(
            "score_prism", {"session_id": r.session_id}, headers={"authorization": "Bearer " + SERVICE_KEY[:-1]}
        ).text,
        live.post("score_prism", {"session_id": "nope"}, key=True).text,
        live.post("get-results-by-session", {"session_id": r.session_id, "share_token": SERVICE_KEY}).text,
    ]
    with live.db.connect() as conn:
        stored = [json.dumps(row.payload) for row in conn.execute(sa.select(fn_logs.c.payload))]
        stored += [
            json.dumps(dict(row), default=str) for row in conn.execute(sa.select(results_token_access_logs)).mappings()
        ]
    everything = "\n".join([*bodies, *stored, caplog.text])
    assert SERVICE_KEY not in everything
    assert KEY_ENV not in "\n".join(bodies)


def test_every_event_written_is_in_the_catalogue(live: Live) -> None:
    with live.db.connect() as conn:
        written = set(conn.execute(sa.select(fn_logs.c.evt).distinct()).scalars())
    assert written and written <= set(EVENTS), written - set(EVENTS)


def test_load_reference_data_from_db_equals_the_package(live: Live) -> None:
    with live.db.connect() as conn:
        ref = load_reference_data_from_db(conn)
    package = scoring.ReferenceData.from_package()
    assert ref.key_rows == package.key_rows
    assert dict(ref.fc_options) == dict(package.fc_options)
    assert ref.config == package.config


def test_load_session_inputs_picks_the_latest_of_repeated_answers(pg_target: Target) -> None:
    """Without ``uniq_session_question`` (a live table may lack it) the latest answer per question still wins."""
    db = pg_target.db
    r = new_respondent(random.Random(1), answer_ms=60_000)
    started = datetime(2025, 9, 17, 18, 0, tzinfo=UTC)
    write_session(db, r, started)
    write_answers(db, r, started, r.answer_ms)
    with db.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE assessment_responses DROP CONSTRAINT uniq_session_question")
        conn.execute(
            assessment_responses.insert().values(
                session_id=r.session_id,
                question_id=17,
                question_text="Question 17",
                question_type="likert_1_5",
                question_section="likert",
                answer_value="1",
                created_at=started + timedelta(hours=1),
                updated_at=started + timedelta(hours=1),
            )
        )
    with db.connect() as conn:
        inputs = load_session_inputs(conn, [r.session_id])[r.session_id]
    assert len(inputs.answers) == 249 and all("created_at" in a for a in inputs.answers)
    latest = scoring.latest_answers(inputs.answers)
    assert len(latest) == 248
    assert [a["answer_value"] for a in latest if a["question_id"] == 17] == ["1"]
