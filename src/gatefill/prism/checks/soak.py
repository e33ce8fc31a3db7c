"""The PRISM soak checks: what the staging soak measures at each look, from the PRISM tables, the functions' event log
and probes of the live results endpoint.

Every check is a count over the window so far, read with one set-based query per table (each query's text is stored
beside its counts), so a look costs a handful of index range scans whatever the table sizes. The baseline funnels
(30 days of sessions: the one count that reads most of a large table) are not part of a look: the soak measures them
once, before the first look. What each reads:

1. ``version_stamps``: fc_scores written in the window whose version is not v1.2 or kind not ``functions``, and
   profiles written in the window whose ``results_version`` is not v1.2.1 (NULL counts as wrong); must be 0, and the
   evidence gives N checked with the rule-of-three bound (zero in N only shows "rate ≤ ≈3/N").
2. ``engine_version_override``: ``scoring_config.results_version`` equals the engine version, and no
   ``engine_version_override`` event was logged in the window.
3. ``legacy_fc``: no ``fc_fallback_legacy`` event, and, from the data itself, no profile written in the window for a
   session that had FC answers but no v1.2 ``functions`` fc_scores row at that instant.
4. ``token_gating``: probes of the results endpoint for sampled completed sessions (no token → 401, wrong token →
   403, another session's token → 403, valid token → 200); tokenless accesses that were served (from
   ``results_token_access_logs``); on Postgres, what role ``anon`` can see of ``profiles`` and
   ``assessment_sessions`` (must be nothing). The probes must cover the whole window: the first look of every hour
   is probed (waiting for the probe budget if need be), other looks only with budget to spare, and a probe check
   whose answered probes (or timings) cover fewer hours than ``min_probe_coverage`` asks is INCONCLUSIVE.
5. ``conversion``: two funnels of sessions started in the window, completed → has a profile and started →
   completed, against the same funnels over the baseline window before it (counted once per soak by
   ``measure_baseline`` and stored with the run), with the sequential non-inferiority test of ``gatefill.stats``
   (alpha spent over the looks; a decision, once reached, is kept).
6. ``conversion_floor``: the completed → has a profile rate is at least ``--min-conversion`` (seed 001: "Conversion
   rate maintains baseline (≥ 85%)", completed sessions → profiles), by the exact one-sided binomial test at the
   same per-look levels; N/A for a soak planned without a floor.
7. ``function_errors``: error events (failed writes, unscorable sessions, withheld profiles, 5xx answers the server
   recorded) and failed finalizations; with ``metrics_url``, also the 5xx answers counted by the app's own metrics,
   which see failures the database never recorded (``gatefill.prism.checks.app_metrics`` reads them).
8. ``latency``: each function's p95 from the app's latency histogram when ``metrics_url`` is set, and p50/p95 of the
   probes' response times (which must cover enough of the window), against a threshold.
9. ``write_failures``: sessions finalized in the window (before a grace period ended) that still have no profile:
   catches writes that failed or were swallowed, whatever the logs say.

Secrets: the probes need share tokens of sampled sessions, read from the database; a token never leaves this module
(evidence holds short session ids and outcomes only). The service-role key is sent only under a simulated clock, to
tell a test server the simulated time (``X-Gatefill-Now``), and is never recorded. Probe requests carry their own
User-Agent, which only keeps them out of the count of ordinary results accesses reported beside the check; no
finding is ever filtered by it (a client chooses its User-Agent).
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from gatefill import stats
from gatefill.clock import Clock, RealClock
from gatefill.config import Environment
from gatefill.db import Database, JSONValue, UTCTimestamp
from gatefill.errors import UsageError
from gatefill.job import (
    NOT_APPLICABLE,
    Baseline,
    ChartGuides,
    ChartLine,
    Check,
    Look,
    Measurement,
    ReportTable,
    SeriesBucket,
)
from gatefill.prism import scoring
from gatefill.prism.checks import app_metrics as soak_metrics
from gatefill.prism.inputs import token_hash

__all__ = [
    "CHECK_NAMES",
    "ERROR_EVENTS",
    "PROBE_USER_AGENT",
    "PrismSoakChecks",
    "PrismSoakSettings",
    "window_queries",
]

CHECK_NAMES = (
    "version_stamps",
    "engine_version_override",
    "legacy_fc",
    "token_gating",
    "conversion",
    "conversion_floor",
    "function_errors",
    "latency",
    "write_failures",
)
PROBE_USER_AGENT = "gatefill-soak-probe/1"
#: fn_logs events that mean a function call failed (see ``gatefill.prism.platform.service.EVENTS``).
#: ``no_responses`` is a client error (nothing to score), not a function error.
ERROR_EVENTS = (
    "fc_upsert_error",
    "fc_scores_non_finite",
    "profile_write_failed",
    "scoring_failed",
    "profile_withheld",
    "finalize_failed",
    "call_timeout",
    "server_error",
)
# Every event any check counts; one grouped query reads them all.
_COUNTED_EVENTS = (
    *ERROR_EVENTS,
    "engine_version_override",
    "fc_fallback_legacy",
    "fc_scores_loaded",
    "finalize_complete",
)
# What the observability chart shows per bucket (the probes' own denied accesses are left out on purpose).
_CHARTED_EVENTS = (*ERROR_EVENTS, "engine_version_override", "fc_fallback_legacy")
_FUNNELS = ("completion", "profile")
_MAX_LISTED = 20
_APP_METRICS_NOT_CONFIGURED = {
    "configured": False,
    "note": "metrics_url is not configured: the app's own metrics (5xx answers, latency histogram) were not read",
}


def _sql(
    text: str,
    *timestamps: str,
    expanding: Sequence[str] = (),
    booleans: Sequence[str] = (),
    results: Mapping[str, Any] | None = None,
) -> Any:
    """A textual query whose timestamps bind through ``UTCTimestamp`` (ISO text on SQLite, timestamptz on Postgres)
    and whose ``results`` columns are decoded by the given types (SQLite returns bare text otherwise)."""
    params: list[sa.BindParameter[Any]] = [sa.bindparam(name, type_=UTCTimestamp()) for name in timestamps]
    params += [sa.bindparam(name, expanding=True) for name in expanding]
    params += [sa.bindparam(name, type_=sa.Boolean()) for name in booleans]
    clause = sa.text(" ".join(text.split())).bindparams(*params)
    return clause.columns(**results) if results else clause


# Rows written in the window: fc_scores keep created_at on upserts; profiles count if created or updated in it.
_FC_STAMPS = _sql(
    """
    SELECT count(*) AS checked,
           count(CASE WHEN version IS NULL OR version <> :fc_version OR fc_kind IS NULL OR fc_kind <> :fc_kind
                      THEN 1 END) AS wrong
    FROM fc_scores WHERE created_at >= :start AND created_at < :end
    """,
    "start",
    "end",
)
_PROFILE_WINDOW = (
    "((p.updated_at >= :start AND p.updated_at < :end) OR (p.created_at >= :start AND p.created_at < :end))"
)
_PROFILE_STAMPS = _sql(
    f"""
    SELECT count(*) AS checked,
           count(CASE WHEN p.results_version IS NULL OR p.results_version <> :engine_version THEN 1 END) AS wrong
    FROM profiles p WHERE {_PROFILE_WINDOW}
    """,
    "start",
    "end",
)
_WRONG_STAMPS_SAMPLE = _sql(
    f"""
    SELECT 'fc_scores' AS tbl, session_id, version AS stamp, fc_kind AS kind FROM fc_scores
    WHERE created_at >= :start AND created_at < :end
      AND (version IS NULL OR version <> :fc_version OR fc_kind IS NULL OR fc_kind <> :fc_kind)
    UNION ALL
    SELECT 'profiles', p.session_id, p.results_version, NULL FROM profiles p
    WHERE {_PROFILE_WINDOW} AND (p.results_version IS NULL OR p.results_version <> :engine_version)
    LIMIT {_MAX_LISTED}
    """,
    "start",
    "end",
)
_EVENT_COUNTS = _sql(
    "SELECT evt, count(*) AS n FROM fn_logs WHERE evt IN :events AND at >= :start AND at < :end GROUP BY evt",
    "start",
    "end",
    expanding=("events",),
)
_ERROR_PAYLOADS = _sql(
    "SELECT evt, payload FROM fn_logs WHERE evt IN :events AND at >= :start AND at < :end ORDER BY at LIMIT 100000",
    "start",
    "end",
    expanding=("events",),
    results={"evt": sa.Text(), "payload": JSONValue()},
)
_RESULTS_VERSION = _sql(
    "SELECT value FROM scoring_config WHERE key = 'results_version'", results={"value": JSONValue()}
)
# A profile written in the window for a session that had FC answers at that instant but no v1.2 functions row.
_LEGACY_FROM_DATA = f"""
    FROM profiles p WHERE {_PROFILE_WINDOW}
      AND EXISTS (SELECT 1 FROM fc_responses r WHERE r.session_id = p.session_id AND r.answered_at <= p.updated_at)
      AND NOT EXISTS (SELECT 1 FROM fc_scores f WHERE f.session_id = p.session_id AND f.version = :fc_version
                      AND f.fc_kind = :fc_kind AND f.created_at <= p.updated_at)
"""
_LEGACY_COUNT = _sql("SELECT count(*) " + _LEGACY_FROM_DATA, "start", "end")
_LEGACY_SAMPLE = _sql(f"SELECT p.session_id {_LEGACY_FROM_DATA} LIMIT {_MAX_LISTED}", "start", "end")
# Every tokenless access that was served counts, the soak's own probes included: the User-Agent is the client's to
# choose, so leaving rows out by it would let any client hide from this check (a served tokenless probe fails twice).
_TOKENLESS_SERVED = _sql(
    """
    SELECT count(CASE WHEN ua IS NULL OR ua <> :probe_ua THEN 1 END) AS accesses,
           count(CASE WHEN success = :yes AND token_hash = :empty_hash THEN 1 END) AS tokenless_served
    FROM results_token_access_logs
    WHERE ts >= :start AND ts < :end
    """,
    "start",
    "end",
    booleans=("yes",),
)
# Both funnels over sessions started in [start, end): started → completed counts only sessions started before
# :judged (they had the completion grace to finish); completed → profile counts completions before :written. A join,
# not a correlated EXISTS: profiles has one row per session, and over the 30-day baseline (hundreds of thousands of
# sessions) the planner can then hash-join instead of probing the index once per session (0.7 s instead of 2.1 s
# at 750k sessions).
_FUNNEL_COUNTS = _sql(
    """
    SELECT count(*) AS started,
      count(CASE WHEN s.started_at < :judged THEN 1 END) AS started_judged,
      count(CASE WHEN s.started_at < :judged AND s.status = 'completed' AND s.completed_at < :end THEN 1 END)
        AS completed_judged,
      count(CASE WHEN s.status = 'completed' AND s.completed_at < :written THEN 1 END) AS completed_written,
      count(CASE WHEN s.status = 'completed' AND s.completed_at < :written AND p.created_at < :end THEN 1 END)
        AS with_profile
    FROM assessment_sessions s LEFT JOIN profiles p ON p.session_id = s.id
    WHERE s.started_at >= :start AND s.started_at < :end
    """,
    "start",
    "end",
    "judged",
    "written",
)
_WRITE_FAILURES = _sql(
    """
    SELECT count(*) AS finalized,
      count(CASE WHEN NOT EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = s.id AND p.created_at < :end)
            THEN 1 END) AS without_profile
    FROM assessment_sessions s WHERE s.finalized_at >= :start AND s.finalized_at < :judged
    """,
    "start",
    "end",
    "judged",
)
_WRITE_FAILURES_SAMPLE = _sql(
    f"""
    SELECT s.id FROM assessment_sessions s WHERE s.finalized_at >= :start AND s.finalized_at < :judged
      AND NOT EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = s.id AND p.created_at < :end)
    ORDER BY s.finalized_at LIMIT {_MAX_LISTED}
    """,
    "start",
    "end",
    "judged",
)
# Sessions to probe: completed before the cutoff, with a profile and a live token; the latest ones first. The
# started_at range keeps it on the started_at index; the fallback looks before the window.
_PROBE_SESSIONS = _sql(
    """
    SELECT s.id, s.share_token FROM assessment_sessions s
    WHERE s.started_at >= :start AND s.started_at < :end AND s.status = 'completed' AND s.completed_at < :end
      AND (s.share_token_expires_at IS NULL OR s.share_token_expires_at > :now)
      AND EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = s.id)
    ORDER BY s.started_at DESC LIMIT :limit
    """,
    "start",
    "end",
    "now",
)
_SERIES_SESSIONS = _sql(
    """
    SELECT s.started_at, s.status, s.completed_at,
           EXISTS (SELECT 1 FROM profiles p WHERE p.session_id = s.id AND p.created_at < :end) AS has_profile
    FROM assessment_sessions s WHERE s.started_at >= :start AND s.started_at < :end
    """,
    "start",
    "end",
    results={
        "started_at": UTCTimestamp(),
        "status": sa.Text(),
        "completed_at": UTCTimestamp(),
        "has_profile": sa.Boolean(),
    },
)
_SERIES_EVENTS = _sql(
    "SELECT evt, at FROM fn_logs WHERE evt IN :events AND at >= :start AND at < :end",
    "start",
    "end",
    expanding=("events",),
    results={"evt": sa.Text(), "at": UTCTimestamp()},
)
# Early looks, before a session in the window has completed, probe the latest completed sessions before it.
_PROBE_FALLBACK = timedelta(days=30)
_RLS_TABLES = ("profiles", "assessment_sessions")
_PROBE_CASES = ("no_token", "wrong_token", "other_session_token", "valid_token")
_INSUFFICIENT_PRIVILEGE = "42501"


def _query_text(*clauses: Any) -> str:
    # Expanding parameters print as a compiler placeholder; show them as the named list they are.
    return re.sub(r"\(__\[POSTCOMPILE_(\w+)\]\)", r"(:\1)", "; ".join(str(c) for c in clauses))


def window_queries(
    window_start: datetime, end: datetime, settings: PrismSoakSettings | None = None
) -> list[tuple[str, Any, dict[str, Any]]]:
    """Every query one look runs against the PRISM tables, with its parameters (for EXPLAIN in the benchmark)."""
    s = settings or PrismSoakSettings()
    times = {"start": window_start, "end": end}
    fc = {"fc_version": s.fc_version, "fc_kind": s.fc_kind}
    judged = max(window_start, end - timedelta(seconds=s.completion_grace))
    written = max(window_start, end - timedelta(seconds=s.write_grace))
    return [
        ("event counts", _EVENT_COUNTS, {**times, "events": list(_COUNTED_EVENTS)}),
        ("fc_scores stamps", _FC_STAMPS, {**times, **fc}),
        ("profile stamps", _PROFILE_STAMPS, {**times, "engine_version": s.engine_version}),
        ("legacy FC from data", _LEGACY_COUNT, {**times, **fc}),
        ("funnels", _FUNNEL_COUNTS, {**times, "judged": judged, "written": written}),
        ("write failures", _WRITE_FAILURES, {**times, "judged": written}),
        (
            "tokenless served",
            _TOKENLESS_SERVED,
            {**times, "yes": True, "empty_hash": token_hash(None), "probe_ua": PROBE_USER_AGENT},
        ),
        ("probe sample", _PROBE_SESSIONS, {**times, "now": end, "limit": s.probe_sessions}),
        (
            "probe sample before the window",
            _PROBE_SESSIONS,
            {**times, "start": window_start - _PROBE_FALLBACK, "now": end, "limit": s.probe_sessions},
        ),
        ("error payloads", _ERROR_PAYLOADS, {**times, "events": list(ERROR_EVENTS)}),
    ]


@dataclass(frozen=True)
class PrismSoakSettings:
    """Settings of the PRISM checks; endpoint URLs default to the environment's ``results_url``/``functions_url``."""

    results_url: str | None = None
    functions_url: str | None = None
    #: The functions server's Prometheus metrics (default: the environment's ``metrics_url``); see ``soak_metrics``.
    metrics_url: str | None = None
    #: Sessions started within this of a cutoff are not judged on completion yet (answering takes a while).
    completion_grace: float = 3600.0
    #: Sessions finalized within this of a cutoff are not judged on their profile yet.
    write_grace: float = 600.0
    latency_p95_ms: float = 1000.0
    min_latency_samples: int = 10
    #: Sessions probed per probed look (each with all four cases; another sampled session lends its token).
    probe_sessions: int = 1
    #: Probe requests per real minute at most: the results endpoint limits each client to 60 per minute, and a
    #: simulated soak takes its looks back to back. A look whose probes do not fit is recorded as skipped.
    probe_budget_per_minute: int = 30
    #: Probes must cover the whole window: it is cut into spans of this length (hourly), and a span counts as
    #: covered once a look in it was probed with every case answered (for latency: once it has a timing).
    probe_span_seconds: float = 3600.0
    #: The share of the window's spans (so far) that must be covered for token_gating and latency to conclude.
    min_probe_coverage: float = 1.0
    probe_timeout: float = 10.0
    fc_version: str = scoring.FC_VERSION
    fc_kind: str = scoring.FC_KIND
    engine_version: str = scoring.ENGINE_VERSION
    #: Only used to tell a server the simulated time (X-Gatefill-Now); never recorded.
    service_role_key: str | None = field(default=None, repr=False)
    transport: httpx.BaseTransport | None = field(default=None, repr=False)
    #: The clock the probe budget runs on: real time, as the endpoint's rate limiter counts requests (tests that
    #: exhaust the budget give a simulated one, whose waits pass at once).
    budget_clock: Clock = field(default_factory=RealClock, repr=False)

    def validate(self) -> None:
        if self.completion_grace < 0 or self.write_grace < 0:
            raise UsageError("grace periods must not be negative")
        if not self.latency_p95_ms > 0:
            raise UsageError("the latency threshold must be positive")
        if not 1 <= self.probe_sessions <= 2:
            raise UsageError("probe 1 or 2 sessions per look (the endpoint is rate limited)")
        if self.probe_budget_per_minute < 1:
            raise UsageError("the probe budget must be at least 1 request per minute")
        if not self.probe_span_seconds > 0 or not 0.0 < self.min_probe_coverage <= 1.0:
            raise UsageError("probe coverage needs a positive span and a minimum share within (0, 100] %")


@dataclass(frozen=True)
class _Probe:
    """One request to the results endpoint and what came back (never the token)."""

    session: str
    case: str
    expected: int
    status: int | None
    ms: float | None
    outcome: str  # pass | fail | inconclusive
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "session": self.session,
            "case": self.case,
            "expected": self.expected,
            "status": self.status,
            "ms": None if self.ms is None else round(self.ms, 1),
            "outcome": self.outcome,
        }
        if self.note:
            data["note"] = self.note
        return data


class _RedactTokens(logging.Filter):
    """Masks ``t=`` query values in httpx's request log lines: a results link carries its share token there."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_TOKEN_IN_URL.sub(r"\1***", str(a)) if "t=" in str(a) else a for a in record.args)
        return True


_TOKEN_IN_URL = re.compile(r"([?&]t=)[^&\s\"]*")
_REDACT = _RedactTokens()


class _Prober:
    """Probes the results endpoint over HTTP within a per-minute budget (on real time: rate limits count requests).

    With a functions URL the probe POSTs to get-results-by-session, so the token travels in the body and never in a
    URL that proxies and access logs keep; otherwise it GETs the results link ``/results/{id}?t=TOKEN``.
    """

    def __init__(self, env: Environment, settings: PrismSoakSettings) -> None:
        self.settings = settings
        functions = (settings.functions_url or env.functions_url or "").rstrip("/") or None
        results = (settings.results_url or env.results_url or "").rstrip("/") or None
        self.post_url = f"{functions}/get-results-by-session" if functions else None
        self.get_base = results if not functions else None
        self._sent: deque[float] = deque()
        if self.get_base and _REDACT not in logging.getLogger("httpx").filters:
            logging.getLogger("httpx").addFilter(_REDACT)
        # Built now, when the soak starts, not at the first look's first probe: building a client loads the CA
        # bundle (0.1-0.4 s on a busy machine), a setup cost that would otherwise be charged to the first look.
        self._http: httpx.Client | None = self._client() if self.endpoint else None

    def _client(self) -> httpx.Client:
        return httpx.Client(
            timeout=self.settings.probe_timeout,
            transport=self.settings.transport,
            headers={"user-agent": PROBE_USER_AGENT},
        )

    @property
    def endpoint(self) -> str | None:
        if self.post_url:
            return "POST /functions/v1/get-results-by-session"
        if self.get_base:
            return "GET /results/{session_id}?t=TOKEN"
        return None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def room_for(self, requests: int) -> bool:
        return self._wait_for(requests) == 0.0

    def _wait_for(self, requests: int) -> float:
        """Seconds until ``requests`` more fit in the budget (0: now; inf: never, more than the whole budget)."""
        if requests > self.settings.probe_budget_per_minute:
            return math.inf
        now = self.settings.budget_clock.monotonic()
        while self._sent and self._sent[0] <= now - 60.0:
            self._sent.popleft()
        excess = len(self._sent) + requests - self.settings.probe_budget_per_minute
        return 0.0 if excess <= 0 else self._sent[excess - 1] + 60.0 - now

    def wait_for_room(self, requests: int) -> bool:
        """Waits (real time, at most a minute) until ``requests`` fit in the budget; False if they never will."""
        wait = self._wait_for(requests)
        if math.isinf(wait):
            return False
        if wait > 0:
            self.settings.budget_clock.sleep(wait)
        return True

    def request(
        self, session_id: str, token: str | None, simulated_now: datetime | None
    ) -> tuple[int | None, float, str]:
        """One probe: (status or None, milliseconds, error code or transport error)."""
        if self._http is None:
            self._http = self._client()
        headers: dict[str, str] = {}
        if simulated_now is not None and self.settings.service_role_key:
            headers["x-gatefill-now"] = simulated_now.isoformat()
            headers["authorization"] = f"Bearer {self.settings.service_role_key}"
        self._sent.append(self.settings.budget_clock.monotonic())
        started = time.perf_counter()
        try:
            if self.post_url:
                body: dict[str, Any] = {"session_id": session_id}
                if token is not None:
                    body["share_token"] = token
                response = self._http.post(self.post_url, json=body, headers=headers)
            else:
                assert self.get_base is not None
                params = {"t": token} if token is not None else None
                response = self._http.get(f"{self.get_base}/results/{session_id}", params=params, headers=headers)
        except httpx.HTTPError as exc:
            # The exception text can hold the URL with its query (the token): keep only the class name.
            return None, (time.perf_counter() - started) * 1000.0, type(exc).__name__
        elapsed = (time.perf_counter() - started) * 1000.0
        code = ""
        try:
            body_json = response.json()
            if isinstance(body_json, dict) and isinstance(body_json.get("code"), str):
                code = body_json["code"]
        except ValueError:
            pass
        return response.status_code, elapsed, code


# Refusals of the simulated-time header: the probe did not test the token at all.
_REFUSED_CODES = frozenset({"FAULT_INJECTION_DISABLED", "UNAUTHORIZED", "INVALID_NOW"})


def _judge(expected: int, status: int | None, code: str) -> tuple[str, str]:
    if status is None:
        return "inconclusive", f"no answer ({code})"
    if code in _REFUSED_CODES:
        return "inconclusive", f"server refused the probe ({code})"
    if status == 429:
        return "inconclusive", "rate limited (429)"
    if status >= 500:
        return "inconclusive", f"server error {status}"
    if status == expected:
        return "pass", ""
    if expected == 200 and status == 404:
        return "inconclusive", "valid token but no profile (404)"
    return "fail", f"expected {expected}, got {status}"


def _span_index(look: Look, span_seconds: float) -> int:
    """Which span of the window the look's cutoff closes (0-based): the one holding the instant just before it."""
    elapsed = (look.end - look.window_start).total_seconds()
    return max(0, math.ceil(elapsed / span_seconds - 1e-9) - 1)


def _span_count(look: Look, span_seconds: float) -> int:
    return max(1, math.ceil((look.window_end - look.window_start).total_seconds() / span_seconds - 1e-9))


def _span_name(span_seconds: float) -> str:
    return "hour" if span_seconds == 3600.0 else f"{span_seconds:g}-second span"


def _coverage(look: Look, span_seconds: float, minimum: float, covered: set[int]) -> dict[str, Any]:
    """How much of the window so far a probe check's evidence covers, against the configured minimum share."""
    so_far = _span_index(look, span_seconds) + 1
    needed = math.ceil(minimum * so_far - 1e-9)
    return {
        "span_s": span_seconds,
        "spans_so_far": so_far,
        "spans_in_window": _span_count(look, span_seconds),
        "covered": sorted(covered),
        "minimum_share": minimum,
        "needed": needed,
        "enough": len(covered & set(range(so_far))) >= needed,
    }


def _coverage_text(coverage: Mapping[str, Any]) -> str:
    unit = _span_name(float(coverage["span_s"]))
    so_far = "" if coverage["spans_so_far"] == coverage["spans_in_window"] else " so far"
    return (
        f"{len(coverage['covered'])} of {coverage['spans_so_far']} {unit}s of the window{so_far} covered "
        f"(at least {coverage['needed']} needed)"
    )


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: with few samples p95 is honestly the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _bound(n: int) -> float:
    return stats.rule_of_three_upper(n)


def _zero_summary(what: str, n: int, unit: str) -> str:
    return f"0 {what} in {n} {unit}; one-sided 95 % upper bound on the rate {_bound(n):.2%} (rule of three)"


class PrismSoakChecks:
    """The nine PRISM soak checks (see the module docstring) for one environment; use as a context manager."""

    job = "prism"

    def __init__(self, env: Environment, settings: PrismSoakSettings | None = None) -> None:
        self.env = env
        self.settings = settings or PrismSoakSettings()
        self.settings.validate()
        self._prober = _Prober(env, self.settings)
        metrics_url = self.settings.metrics_url or env.metrics_url
        # Built now, at the soak's start: its first scrape is the baseline a live soak counts from.
        self._app = (
            soak_metrics.AppMetricsReader(
                metrics_url, timeout=self.settings.probe_timeout, transport=self.settings.transport
            )
            if metrics_url
            else None
        )

    def __enter__(self) -> PrismSoakChecks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._prober.close()
        if self._app is not None:
            self._app.close()

    @property
    def check_names(self) -> tuple[str, ...]:
        return CHECK_NAMES

    def params(self) -> dict[str, Any]:
        s = self.settings
        return {
            "endpoint": self._prober.endpoint,
            "metrics": self._app.source if self._app is not None else None,
            "completion_grace_s": s.completion_grace,
            "write_grace_s": s.write_grace,
            "latency_p95_ms": s.latency_p95_ms,
            "min_latency_samples": s.min_latency_samples,
            "probe_sessions": s.probe_sessions,
            "probe_budget_per_minute": s.probe_budget_per_minute,
            "probe_span_s": s.probe_span_seconds,
            "min_probe_coverage": s.min_probe_coverage,
            "versions": {"fc_version": s.fc_version, "fc_kind": s.fc_kind, "engine_version": s.engine_version},
        }

    # ----------------------------------------------------------------------------------------------------------------
    # One look

    def measure(self, db: Database, look: Look) -> list[Check]:
        s = self.settings
        times = {"start": look.window_start, "end": look.end}
        versions = {"fc_version": s.fc_version, "fc_kind": s.fc_kind, "engine_version": s.engine_version}
        # Scraped before the database work, so no connection waits on the metrics endpoint.
        scrape = self._app.scrape() if self._app is not None else None
        with db.connect() as conn:
            events = {evt: int(n) for evt, n in conn.execute(_EVENT_COUNTS, {**times, "events": list(_COUNTED_EVENTS)})}
            app = self._app.read(look, events, scrape) if self._app is not None else None
            fc = conn.execute(_FC_STAMPS, {**times, **versions}).one()
            prof = conn.execute(_PROFILE_STAMPS, {**times, **versions}).one()
            checks = {
                "version_stamps": self._version_stamps(conn, look, fc, prof, versions),
                "engine_version_override": self._engine_version(conn, events),
                "legacy_fc": self._legacy_fc(conn, look, events, int(prof.checked), versions),
                **self._conversion(conn, look),
                "function_errors": self._function_errors(conn, look, events, app),
                "write_failures": self._write_failures(conn, look),
            }
            tokenless = conn.execute(
                _TOKENLESS_SERVED,
                {**times, "yes": True, "empty_hash": token_hash(None), "probe_ua": PROBE_USER_AGENT},
            ).one()
            sampled = self._sample(conn, look)
        probes, skipped = self._probe(look, sampled)
        rls = self._rls(db)
        checks["token_gating"] = self._token_gating(look, probes, skipped, sampled, rls, tokenless)
        checks["latency"] = self._latency(look, probes, skipped, app)
        return [checks[name] for name in CHECK_NAMES]

    def _version_stamps(self, conn: Connection, look: Look, fc: Any, prof: Any, versions: Mapping[str, str]) -> Check:
        checked = int(fc.checked) + int(prof.checked)
        wrong = int(fc.wrong) + int(prof.wrong)
        evidence: dict[str, Any] = {
            "fc_scores": {"checked": int(fc.checked), "wrong": int(fc.wrong)},
            "profiles": {"checked": int(prof.checked), "wrong": int(prof.wrong)},
            "expected": dict(versions),
            "rule_of_three_upper": _bound(checked),
        }
        if wrong:
            rows = conn.execute(_WRONG_STAMPS_SAMPLE, {"start": look.window_start, "end": look.end, **versions})
            evidence["examples"] = [
                {"table": r.tbl, "session_id": str(r.session_id), "stamp": r.stamp, "kind": r.kind} for r in rows
            ]
            verdict, summary = (
                "FAIL",
                (
                    f"{wrong} of {checked} rows written in the window carry the wrong version "
                    f"(fc_scores {int(fc.wrong)}, profiles {int(prof.wrong)})"
                ),
            )
        elif checked == 0:
            verdict, summary = (
                "INCONCLUSIVE",
                "no fc_scores or profile rows were written in the window: nothing to check",
            )
        else:
            verdict = "PASS"
            summary = _zero_summary("wrongly stamped rows", checked, "rows written in the window") + (
                f" (fc_scores {int(fc.checked)}, profiles {int(prof.checked)})"
            )
        return Check("version_stamps", verdict, summary, evidence, _query_text(_FC_STAMPS, _PROFILE_STAMPS))

    def _engine_version(self, conn: Connection, events: Mapping[str, int]) -> Check:
        row = conn.execute(_RESULTS_VERSION).first()
        stored = row[0] if row is not None else None
        expected = self.settings.engine_version
        overrides = events.get("engine_version_override", 0)
        scored = events.get("fc_scores_loaded", 0) + events.get("fc_fallback_legacy", 0)
        evidence = {
            "scoring_config.results_version": stored,
            "engine_version": expected,
            "engine_version_override_events": overrides,
            "profiles_scored": scored,
            "rule_of_three_upper": _bound(scored),
        }
        problems = []
        if stored != expected:
            problems.append(f"scoring_config.results_version is {stored!r}, the engine writes {expected!r}")
        if overrides:
            problems.append(f"{overrides} engine_version_override events in the window")
        if problems:
            return Check("engine_version_override", "FAIL", "; ".join(problems), evidence, _query_text(_EVENT_COUNTS))
        if scored == 0:
            summary = (
                f"scoring_config.results_version = {expected}; no profile was scored in the window, so the absence of "
                "overrides shows nothing"
            )
            return Check("engine_version_override", "INCONCLUSIVE", summary, evidence, _query_text(_EVENT_COUNTS))
        summary = f"scoring_config.results_version = {expected}; " + _zero_summary(
            "engine_version_override events", scored, "profile scorings"
        )
        return Check("engine_version_override", "PASS", summary, evidence, _query_text(_RESULTS_VERSION, _EVENT_COUNTS))

    def _legacy_fc(
        self,
        conn: Connection,
        look: Look,
        events: Mapping[str, int],
        profiles_written: int,
        versions: Mapping[str, str],
    ) -> Check:
        params = {"start": look.window_start, "end": look.end, **versions}
        from_data = int(conn.execute(_LEGACY_COUNT, params).scalar_one())
        logged = events.get("fc_fallback_legacy", 0)
        scored = events.get("fc_scores_loaded", 0) + logged
        evidence: dict[str, Any] = {
            "fc_fallback_legacy_events": logged,
            "profiles_without_fc_scores": from_data,
            "profiles_written": profiles_written,
            "profiles_scored": scored,
            "rule_of_three_upper": _bound(max(profiles_written, scored)),
        }
        query = _query_text(_EVENT_COUNTS, _LEGACY_COUNT)
        if logged or from_data:
            if from_data:
                evidence["examples"] = [str(r[0]) for r in conn.execute(_LEGACY_SAMPLE, params)]
            summary = (
                f"{logged} fc_fallback_legacy events; {from_data} profiles written in the window for sessions with FC "
                f"answers but no {versions['fc_version']} {versions['fc_kind']} fc_scores row at the time"
            )
            return Check("legacy_fc", "FAIL", summary, evidence, query)
        if profiles_written == 0 and scored == 0:
            return Check("legacy_fc", "INCONCLUSIVE", "no profile was written in the window", evidence, query)
        summary = (
            f"0 fc_fallback_legacy events and 0 profiles without their fc_scores row among {profiles_written} written; "
            f"rate ≤ {_bound(max(profiles_written, scored)):.2%} (rule of three)"
        )
        return Check("legacy_fc", "PASS", summary, evidence, query)

    def _funnel_counts(
        self, conn: Connection, start: datetime, end: datetime, *, judged: datetime, written: datetime
    ) -> Any:
        return conn.execute(
            _FUNNEL_COUNTS,
            {"start": start, "end": end, "judged": max(start, judged), "written": max(start, written)},
        ).one()

    def measure_baseline(self, db: Database, start: datetime, end: datetime) -> Baseline:
        """Both funnels over the sessions started in ``[start, end)``, judged as a look at ``end`` would judge them.

        This is the one query of the soak that counts most of a large table (30 days of sessions); the soak runs it
        once and stores the counts, so no look pays for it.
        """
        s = self.settings
        with db.connect() as conn:
            row = self._funnel_counts(
                conn,
                start,
                end,
                judged=end - timedelta(seconds=s.completion_grace),
                written=end - timedelta(seconds=s.write_grace),
            )
        completion = {"k": int(row.completed_judged), "n": int(row.started_judged)}
        profile = {"k": int(row.with_profile), "n": int(row.completed_written)}
        evidence = {
            "sessions_started": int(row.started),
            "completion": completion,
            "profile": profile,
            "completion_grace_s": s.completion_grace,
            "write_grace_s": s.write_grace,
        }

        def rate(f: Mapping[str, int]) -> str:
            return f"{f['k']}/{f['n']}" + (f" = {f['k'] / f['n']:.1%}" if f["n"] else "")

        summary = (
            f"{int(row.started)} sessions started; started → completed {rate(completion)}, "
            f"completed → has a profile {rate(profile)}"
        )
        return Baseline(start, end, summary, evidence, _query_text(_FUNNEL_COUNTS))

    def _conversion(self, conn: Connection, look: Look) -> dict[str, Check]:
        """The non-inferiority check of both funnels and the floor check of the profile funnel, from one count."""
        s = self.settings
        previous = look.previous.get("conversion", {})
        # The soak measured the baseline once, before the first look; every look compares against those counts.
        stored = look.baseline.evidence
        baseline: dict[str, Any] = {
            "from": look.baseline.start.isoformat(),
            "to": look.baseline.end.isoformat(),
            "completion": dict(stored["completion"]),
            "profile": dict(stored["profile"]),
        }
        row = self._funnel_counts(
            conn,
            look.window_start,
            look.end,
            judged=look.end - timedelta(seconds=s.completion_grace),
            written=look.end - timedelta(seconds=s.write_grace),
        )
        counts = {
            "completion": (int(row.completed_judged), int(row.started_judged)),
            "profile": (int(row.with_profile), int(row.completed_written)),
        }
        funnels: dict[str, Any] = {}
        for name in _FUNNELS:
            k, n = counts[name]
            known = look.baseline_rate if name == "completion" else None
            base: float | stats.Sample = (
                known if known is not None else stats.Sample(baseline[name]["k"], baseline[name]["n"])
            )
            funnels[name] = self._funnel(name, k, n, base, look, previous.get("funnels", {}).get(name, {}))
        verdicts = [f["verdict"] for f in funnels.values()]
        verdict = "FAIL" if "FAIL" in verdicts else ("PASS" if all(v == "PASS" for v in verdicts) else "INCONCLUSIVE")
        evidence = {
            "baseline": baseline,
            "sessions_started": int(row.started),
            "not_yet_judged": int(row.started) - int(row.started_judged),
            "completion_grace_s": s.completion_grace,
            "write_grace_s": s.write_grace,
            "funnels": funnels,
        }
        summary = "; ".join(f"{name}: {funnels[name]['summary']}" for name in _FUNNELS)
        return {
            "conversion": Check("conversion", verdict, summary, evidence, _query_text(_FUNNEL_COUNTS)),
            "conversion_floor": self._floor(look, *counts["profile"]),
        }

    def _floor(self, look: Look, k: int, n: int) -> Check:
        """Completed → has a profile at least ``look.min_conversion``: sequential exact test, first decision kept."""
        query = _query_text(_FUNNEL_COUNTS)
        evidence: dict[str, Any] = {"funnel": "completed → has a profile", "k": k, "n": n, "floor": look.min_conversion}
        if look.min_conversion is None:
            why = "this soak was planned without a conversion floor (it started before --min-conversion existed)"
            return Check("conversion_floor", NOT_APPLICABLE, why, evidence, query)
        current = stats.sequential_at_least(
            k, n, floor=look.min_conversion, plan=look.plan, look=look.number, min_n=look.min_n
        )
        decided = look.previous.get("conversion_floor", {}).get("decided")
        if decided is None and current.verdict in ("PASS", "FAIL"):
            decided = {"verdict": current.verdict, "look": look.number, "k": k, "n": n, "reason": current.reason}
        wilson = stats.wilson_interval(k, n)
        evidence.update(
            rate=k / n if n else None,
            wilson95=[wilson.low, wilson.high],
            look_alpha=current.alpha,
            p_value_at_most_floor=current.p_value_noninferior,
            p_value_at_least_floor=current.p_value_inferior,
            method=current.method,
            look_verdict=current.verdict,
            decided=decided,
        )
        if decided:
            summary = f"{decided['verdict']} since look {decided['look']}: {str(decided['reason']).rstrip('.')}"
            return Check("conversion_floor", str(decided["verdict"]), summary, evidence, query)
        return Check("conversion_floor", "INCONCLUSIVE", current.reason.rstrip("."), evidence, query)

    def _funnel(
        self, name: str, k: int, n: int, base: float | stats.Sample, look: Look, previous: Mapping[str, Any]
    ) -> dict[str, Any]:
        what = "started → completed" if name == "completion" else "completed → has a profile"
        wilson = stats.wilson_interval(k, n)
        decided = previous.get("decided")
        current = stats.sequential_noninferiority(
            k, n, baseline=base, margin=look.margin, plan=look.plan, look=look.number, min_n=look.min_n
        )
        if decided is None and current.verdict in ("PASS", "FAIL"):
            decided = {
                "verdict": current.verdict,
                "look": look.number,
                "k": k,
                "n": n,
                "reason": current.reason,
            }
        verdict = decided["verdict"] if decided else "INCONCLUSIVE"
        rate = f"{k}/{n} = {k / n:.1%} (95 % Wilson {wilson.low:.1%}–{wilson.high:.1%})" if n else "0 sessions"
        if decided:
            reason = str(decided["reason"]).rstrip(".")
            summary = f"{what} {rate}; {decided['verdict']} since look {decided['look']}: {reason}"
        else:
            summary = f"{what} {rate}; {current.reason.rstrip('.')}"
        baseline_json: dict[str, Any] = (
            {"rate": base, "source": "given (--baseline-rate)"}
            if isinstance(base, float)
            else {"k": base.k, "n": base.n, "rate": None if base.n == 0 else base.rate, "source": "measured"}
        )
        return {
            "funnel": what,
            "k": k,
            "n": n,
            "rate": k / n if n else None,
            "wilson95": [wilson.low, wilson.high],
            "baseline": baseline_json,
            "threshold": None if math.isnan(current.threshold) else current.threshold,
            "look_alpha": current.alpha,
            "p_value_noninferior": current.p_value_noninferior,
            "p_value_inferior": current.p_value_inferior,
            "difference_interval": [current.interval.low, current.interval.high],
            "method": current.method,
            "look_verdict": current.verdict,
            "decided": decided,
            "verdict": verdict,
            "summary": summary,
        }

    def _function_errors(
        self, conn: Connection, look: Look, events: Mapping[str, int], app: soak_metrics.AppWindow | None
    ) -> Check:
        """Error events and failed finalizations from the database, and 5xx answers from the app's own metrics
        (which see the failures the database never recorded)."""
        errors = {evt: events.get(evt, 0) for evt in ERROR_EVENTS if events.get(evt, 0)}
        total = sum(errors.values())
        failed_sessions: set[str] = set()
        if total:
            for _evt, payload in conn.execute(
                _ERROR_PAYLOADS, {"start": look.window_start, "end": look.end, "events": list(ERROR_EVENTS)}
            ):
                if isinstance(payload, Mapping) and payload.get("fn") == "finalizeAssessment":
                    failed_sessions.add(str(payload.get("session_id")))
        completed = events.get("finalize_complete", 0)
        calls = completed + len(failed_sessions)
        from_app = soak_metrics.server_errors(app) if app is not None else None
        evidence: dict[str, Any] = {
            "error_events": errors,
            "failed_finalizations": len(failed_sessions),
            "finalize_calls": calls,
            "finalize_complete": completed,
            "failed_sessions": sorted(failed_sessions)[:_MAX_LISTED],
            "rule_of_three_upper": _bound(calls),
            "app_metrics": dict(from_app.evidence) if from_app is not None else _APP_METRICS_NOT_CONFIGURED,
        }
        if app is not None:
            evidence[soak_metrics.STATE_KEY] = dict(app.state)
        query = _query_text(_EVENT_COUNTS, _ERROR_PAYLOADS)
        problems = []
        if total:
            listed = ", ".join(f"{evt} {n}" for evt, n in sorted(errors.items()))
            problems.append(f"{total} error events ({listed}); {len(failed_sessions)} of {calls} finalizations failed")
        if from_app is not None and from_app.verdict == "FAIL":
            problems.append(from_app.summary)
        if problems:
            return Check("function_errors", "FAIL", "; ".join(problems), evidence, query)
        if calls == 0:
            return Check("function_errors", "INCONCLUSIVE", "no finalization ran in the window", evidence, query)
        summary = _zero_summary("error events", calls, "finalizations")
        if from_app is None:
            return Check("function_errors", "PASS", summary, evidence, query)
        return Check("function_errors", from_app.verdict, f"{summary}; {from_app.summary}", evidence, query)

    def _write_failures(self, conn: Connection, look: Look) -> Check:
        grace = self.settings.write_grace
        judged = max(look.window_start, look.end - timedelta(seconds=grace))
        params = {"start": look.window_start, "end": look.end, "judged": judged}
        row = conn.execute(_WRITE_FAILURES, params).one()
        finalized, missing = int(row.finalized), int(row.without_profile)
        evidence: dict[str, Any] = {
            "finalized_judged": finalized,
            "without_profile": missing,
            "grace_s": grace,
            "judged_before": judged.isoformat(),
            "rule_of_three_upper": _bound(finalized),
        }
        if missing:
            evidence["sessions"] = [str(r[0]) for r in conn.execute(_WRITE_FAILURES_SAMPLE, params)]
            summary = f"{missing} of {finalized} sessions finalized in the window have no profile after {grace:g} s"
            return Check("write_failures", "FAIL", summary, evidence, _query_text(_WRITE_FAILURES))
        if finalized == 0:
            summary = f"no session was finalized in the window more than {grace:g} s before the cutoff"
            return Check("write_failures", "INCONCLUSIVE", summary, evidence, _query_text(_WRITE_FAILURES))
        summary = _zero_summary("finalized sessions without a profile", finalized, "finalized sessions")
        return Check("write_failures", "PASS", summary, evidence, _query_text(_WRITE_FAILURES))

    # ----------------------------------------------------------------------------------------------------------------
    # Probes

    def _probe_now(self, look: Look) -> datetime:
        # Under a simulated clock the server is told the look's cutoff as its time; otherwise it uses its own clock.
        return look.end if look.simulated_time else look.taken_at

    def _sample(self, conn: Connection, look: Look) -> list[tuple[str, str]]:
        if self._prober.endpoint is None:
            return []
        # One more session than is probed: the last one lends its token to the other_session_token case.
        wanted = max(2, self.settings.probe_sessions)
        params = {"end": look.end, "now": self._probe_now(look), "limit": wanted}
        rows = list(conn.execute(_PROBE_SESSIONS, {**params, "start": look.window_start}))
        if len(rows) < wanted:
            # Before traffic has completed in the window, probe the latest sessions before it: the gate is the same.
            earlier = conn.execute(_PROBE_SESSIONS, {**params, "start": look.window_start - _PROBE_FALLBACK})
            seen = {r.id for r in rows}
            rows += [r for r in earlier if r.id not in seen][: wanted - len(rows)]
        return [(str(r.id), str(r.share_token)) for r in rows]

    def _probe_plan(self, sampled: Sequence[tuple[str, str]]) -> list[tuple[str, str, str | None, int]]:
        """Every case for each probed session: (session, case, token presented, expected status)."""
        plan: list[tuple[str, str, str | None, int]] = []
        for i, (sid, token) in enumerate(sampled[: self.settings.probe_sessions]):
            plan.append((sid, "no_token", None, 401))
            # A fresh random token: it cannot be anyone's.
            plan.append((sid, "wrong_token", str(uuid.uuid4()), 403))
            if len(sampled) > 1:
                plan.append((sid, "other_session_token", sampled[(i + 1) % len(sampled)][1], 403))
            plan.append((sid, "valid_token", token, 200))
        return plan

    def _may_probe(self, look: Look, requests: int) -> str | None:
        """None when this look is probed, else why not. The first look of a span not yet covered is always probed
        (waiting for the budget if need be); later looks of a covered span only with budget to spare, and while the
        soak catches up (simulated time, a past window) only beyond what the spans still to come will need."""
        s = self.settings
        span = _span_index(look, s.probe_span_seconds)
        covered = (look.previous.get("token_gating", {}).get("coverage") or {}).get("covered") or []
        budget = f"{s.probe_budget_per_minute} requests per minute (the endpoint rate-limits clients)"
        if span not in covered:
            return None if self._prober.wait_for_room(requests) else f"{requests} probes exceed the budget of {budget}"
        catching_up = look.simulated_time or (look.taken_at - look.end).total_seconds() > 60.0
        later_spans = _span_count(look, s.probe_span_seconds) - span - 1
        reserve = later_spans * requests if catching_up else 0
        if self._prober.room_for(requests + reserve):
            return None
        unit = _span_name(s.probe_span_seconds)
        if reserve:
            return (
                f"not probed: {unit} {span + 1} is already covered, and the budget of {budget} is kept for the "
                f"{later_spans} {unit}{'s' if later_spans > 1 else ''} still to come"
            )
        return f"not probed: {unit} {span + 1} is already covered, and the budget of {budget} is spent for now"

    def _probe(self, look: Look, sampled: Sequence[tuple[str, str]]) -> tuple[list[_Probe], str | None]:
        if self._prober.endpoint is None:
            return [], "no results endpoint configured (results_url or functions_url)"
        if look.simulated_time and not self.settings.service_role_key:
            return [], "simulated time: the server can only be told the time with the service-role key"
        if not sampled:
            return [], "no completed session with a profile and a live token before the cutoff"
        plan = self._probe_plan(sampled)
        why_not = self._may_probe(look, len(plan))
        if why_not is not None:
            return [], why_not
        simulated_now = look.end if look.simulated_time else None
        probes = []
        # Shuffled so a server that answers by request order cannot pass; seeded by the look for reproducibility.
        random.Random(f"{look.run_id}:{look.number}").shuffle(plan)
        for sid, case, presented, expected in plan:
            status, ms, code = self._prober.request(sid, presented, simulated_now)
            outcome, note = _judge(expected, status, code)
            keep_ms = ms if status is not None and status != 429 else None
            probes.append(_Probe(sid[:8], case, expected, status, keep_ms, outcome, note))
        return probes, None

    def _rls(self, db: Database) -> dict[str, Any]:
        """What role anon sees of the tables holding results and tokens (Postgres only), in rolled-back transactions."""
        if not db.caps.row_level_security:
            return {"applicable": False, "note": "SQLite has no roles or row-level security"}
        tables: dict[str, Any] = {}
        for table in _RLS_TABLES:
            with db.connect() as conn:
                transaction = conn.begin()
                try:
                    try:
                        conn.execute(sa.text("SET LOCAL ROLE anon"))
                    except DBAPIError:
                        tables[table] = {"visible": None, "how": "cannot assume role anon"}
                        continue
                    try:
                        visible = conn.execute(
                            sa.text(f"SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1000) AS seen")
                        ).scalar_one()
                        tables[table] = {"visible": int(visible), "how": "rows visible to anon (up to 1000)"}
                    except DBAPIError as exc:
                        if getattr(exc.orig, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE:
                            tables[table] = {"visible": 0, "how": "anon has no SELECT privilege"}
                        else:
                            tables[table] = {"visible": None, "how": "query failed"}
                finally:
                    transaction.rollback()
        return {"applicable": True, "tables": tables}

    def _token_gating(
        self,
        look: Look,
        probes: Sequence[_Probe],
        skipped: str | None,
        sampled: Sequence[tuple[str, str]],
        rls: Mapping[str, Any],
        tokenless: Any,
    ) -> Check:
        """Token gating at this look: every probe so far, the tokenless accesses served, and what anon can see."""
        previous = look.previous.get("token_gating", {})
        totals, cases, failures = _probe_tallies(look, previous, probes)
        served = int(tokenless.tokenless_served)
        coverage = self._coverage(look, previous, bool(probes) and all(p.outcome != "inconclusive" for p in probes))
        rls_visible, leaks = _rls_leaks(look, previous, rls)
        evidence: dict[str, Any] = {
            "endpoint": self._prober.endpoint,
            "this_look": {
                "sessions": [sid[:8] for sid, _ in sampled] if probes else [],
                "probes": [p.to_json() for p in probes],
                "skipped": skipped,
            },
            "probes": {k: totals.get(k, 0) for k in ("total", "passed", "failed", "inconclusive", "looks_probed")},
            "coverage": coverage,
            "cases_passed": {case: cases.get(case, 0) for case in _PROBE_CASES},
            "failures": failures[:_MAX_LISTED],
            "tokenless_served": served,
            "results_accesses": int(tokenless.accesses),
            "rls": rls,
            "rls_leaks": leaks,
        }
        problems = _gating_problems(totals, served, leaks)
        query = _query_text(_TOKENLESS_SERVED, _PROBE_SESSIONS)
        if problems:
            return Check("token_gating", "FAIL", "; ".join(problems), evidence, query)
        lacking = _gating_lacking(totals, cases, skipped, rls, rls_visible, coverage)
        if lacking:
            return Check("token_gating", "INCONCLUSIVE", "; ".join(lacking), evidence, query)
        rls_text = (
            "; anon sees 0 rows of " + " and ".join(rls_visible) if rls.get("applicable") else "; RLS n/a (SQLite)"
        )
        summary = (
            f"{totals['passed']} probes over {totals['looks_probed']} of {look.number} looks answered as expected "
            f"(401 without token, 403 wrong or foreign token, 200 valid), {totals['inconclusive']} inconclusive; "
            f"{_coverage_text(coverage)}; 0 tokenless accesses served of {int(tokenless.accesses)}" + rls_text
        )
        return Check("token_gating", "PASS", summary, evidence, query)

    def _coverage(self, look: Look, previous: Mapping[str, Any], covers: bool) -> dict[str, Any]:
        """The spans covered so far (from the previous look's evidence), with this look's if it ``covers`` it."""
        s = self.settings
        covered = set((previous.get("coverage") or {}).get("covered") or [])
        if covers:
            covered.add(_span_index(look, s.probe_span_seconds))
        return _coverage(look, s.probe_span_seconds, s.min_probe_coverage, covered)

    def _latency(
        self, look: Look, probes: Sequence[_Probe], skipped: str | None, app: soak_metrics.AppWindow | None
    ) -> Check:
        """The app's latency histogram when it is configured (it sees every call of the window; the probes' timings
        beside it, a FAIL of either fails), else the probes' timings alone, which must cover enough of the window."""
        s = self.settings
        previous = look.previous.get("latency", {})
        samples = [float(v) for v in previous.get("_samples_ms", [])]
        this = [p.ms for p in probes if p.ms is not None]
        samples += this
        coverage = self._coverage(look, previous, bool(this))
        p50, p95 = _percentile(samples, 0.5), _percentile(samples, 0.95)
        evidence: dict[str, Any] = {
            "samples": len(samples),
            "p50_ms": None if p50 is None else round(p50, 1),
            "p95_ms": None if p95 is None else round(p95, 1),
            "threshold_p95_ms": s.latency_p95_ms,
            "min_samples": s.min_latency_samples,
            "coverage": coverage,
            "this_look": {
                "samples": len(this),
                "p50_ms": None if not this else round(_percentile(this, 0.5) or 0.0, 1),
                "p95_ms": None if not this else round(_percentile(this, 0.95) or 0.0, 1),
                "skipped": skipped,
            },
            "_samples_ms": [round(v, 1) for v in samples],
        }
        verdict, summary = self._probe_latency(samples, p50, p95, coverage)
        if app is None:
            evidence["app_metrics"] = _APP_METRICS_NOT_CONFIGURED
            return Check("latency", verdict, summary, evidence)
        judged = soak_metrics.latency(app, s.latency_p95_ms / 1000.0, s.min_latency_samples)
        evidence["app_metrics"] = dict(judged.evidence)
        combined = "FAIL" if "FAIL" in (judged.verdict, verdict) else judged.verdict
        return Check("latency", combined, f"app histogram: {judged.summary}; probes: {summary}", evidence)

    def _probe_latency(
        self, samples: Sequence[float], p50: float | None, p95: float | None, coverage: Mapping[str, Any]
    ) -> tuple[str, str]:
        """The verdict of the results-endpoint probes' timings against the threshold, over enough of the window."""
        s = self.settings
        if self._prober.endpoint is None:
            return "INCONCLUSIVE", "no results endpoint configured"
        if len(samples) < s.min_latency_samples:
            return (
                "INCONCLUSIVE",
                f"{len(samples)} probe timings, fewer than the {s.min_latency_samples} needed for a p95",
            )
        assert p50 is not None and p95 is not None
        summary = f"results endpoint p50 {p50:.1f} ms, p95 {p95:.1f} ms over {len(samples)} probes"
        if p95 > s.latency_p95_ms:
            return "FAIL", summary + f" > threshold {s.latency_p95_ms:g} ms"
        if not coverage["enough"]:
            return "INCONCLUSIVE", summary + f"; timings do not cover enough of the window: {_coverage_text(coverage)}"
        return "PASS", summary + f" ≤ threshold {s.latency_p95_ms:g} ms; {_coverage_text(coverage)}"

    # ----------------------------------------------------------------------------------------------------------------
    # Reports

    def series(self, db: Database, start: datetime, end: datetime, bucket_seconds: float) -> list[SeriesBucket]:
        """Both funnels and the charted events per bucket of sessions started in it, judged as the conversion check
        judges them at ``end``: sessions that had not had time to finish are left out and counted as pending."""
        if end <= start:
            return []
        count = max(1, math.ceil((end - start).total_seconds() / bucket_seconds - 1e-9))
        edges = [start + timedelta(seconds=i * bucket_seconds) for i in range(count)] + [end]
        judged, written = self._judged_before(start, end)
        tally: list[Counter[str]] = [Counter() for _ in range(count)]
        events: list[Counter[str]] = [Counter() for _ in range(count)]

        def index(at: datetime) -> int:
            return min(count - 1, int((at - start).total_seconds() // bucket_seconds))

        with db.connect() as conn:
            for row in conn.execute(_SERIES_SESSIONS, {"start": start, "end": end}):
                t = tally[index(row.started_at)]
                done = row.status == "completed" and row.completed_at is not None and row.completed_at < end
                if row.started_at < judged:
                    t.update(started=1, completed=int(done))
                else:
                    t["completion_pending"] += 1
                if done and row.completed_at < written:
                    t.update(profile_n=1, profiled=int(bool(row.has_profile)))
                elif done:
                    t["profile_pending"] += 1
            for evt, at in conn.execute(_SERIES_EVENTS, {"start": start, "end": end, "events": list(_CHARTED_EVENTS)}):
                events[index(at)][evt] += 1
        return [
            SeriesBucket(
                start=edges[i],
                end=edges[i + 1],
                rates={"completion": (t["completed"], t["started"]), "profile": (t["profiled"], t["profile_n"])},
                events=dict(events[i]),
                pending={"completion": t["completion_pending"], "profile": t["profile_pending"]},
            )
            for i, t in enumerate(tally)
        ]

    def _judged_before(self, start: datetime, end: datetime) -> tuple[datetime, datetime]:
        """Sessions started before the first instant, and completions before the second, have had time to finish."""
        s = self.settings
        return (
            max(start, end - timedelta(seconds=s.completion_grace)),
            max(start, end - timedelta(seconds=s.write_grace)),
        )

    def chart_guides(self, measurements: Sequence[Measurement], end: datetime) -> ChartGuides:
        """Each funnel's baseline and non-inferiority threshold, the floor, and the unjudged tail at ``end``."""
        lines: list[ChartLine] = []
        last = measurements[-1] if measurements else None
        conversion = last.check("conversion") if last else None
        for name, f in ((conversion.evidence.get("funnels") or {}) if conversion else {}).items():
            base = (f.get("baseline") or {}).get("rate")
            if base is not None:
                lines.append(ChartLine(name, float(base), f"{name} baseline {float(base):.1%}", "baseline"))
            if f.get("threshold") is not None:
                value = float(f["threshold"])
                lines.append(ChartLine(name, value, f"{name} non-inferiority bound {value:.1%}", "threshold"))
        floor = last.check("conversion_floor") if last else None
        if floor is not None and floor.evidence.get("floor") is not None:
            value = float(floor.evidence["floor"])
            lines.append(ChartLine("profile", value, f"profile floor {value:.0%} (--min-conversion)", "floor"))
        window_start = last.window_start if last else end
        judged, written = self._judged_before(window_start, end)
        s = self.settings
        note = (
            f"Sessions started less than {s.completion_grace / 60:g} min before the last cutoff, and completions less "
            f"than {s.write_grace / 60:g} min before it, had not had time to finish: they are left out of the rates "
            "and counted as pending (shaded on the chart)."
        )
        return ChartGuides(lines=lines, pending_after={"completion": judged, "profile": written}, note=note)

    def report_tables(self, measurements: Sequence[Measurement]) -> list[ReportTable]:
        """The soak report's tables: conversion at each look, and the results-endpoint probes with RLS."""
        probe_rows: list[list[str]] = []
        conversion_rows: list[list[str]] = []
        for m in measurements:
            gating = m.check("token_gating")
            if gating is not None:
                probe_rows.append(_probe_row(m, gating, m.check("latency")))
            conversion = m.check("conversion")
            if conversion is not None:
                conversion_rows.append(_conversion_row(m, conversion))
        return [
            ReportTable(
                "Conversion at each look (cumulative, sequential test)",
                ["look", "cutoff", "completion", "test", "profile", "test", "profile ≥ floor"],
                conversion_rows,
                "Counts are cumulative from the window's start. Each look tests at its own share α of the error "
                "budget (O'Brien-Fleming spending); the first PASS or FAIL of a funnel is kept as its decision. "
                "The floor test (--min-conversion) is the exact one-sided binomial test of the profile funnel at the "
                "same levels.",
            ),
            ReportTable(
                "Results-endpoint probes and RLS",
                ["look", "probes", "pass", "fail", "inconclusive", "p50", "p95", "anon sees", "detail"],
                probe_rows,
                "Probes per sampled completed session: no token (401), a random token (403), another session's "
                "token (403), its own token (200). Tokens are never written to any artifact.",
            ),
        ]


def _probe_tallies(
    look: Look, previous: Mapping[str, Any], probes: Sequence[_Probe]
) -> tuple[Counter[str], Counter[str], list[Any]]:
    """The probe totals, the cases passed and the failures so far: the previous look's evidence plus this look's."""
    totals = Counter({k: int(v) for k, v in (previous.get("probes") or {}).items()})
    cases = Counter({k: int(v) for k, v in (previous.get("cases_passed") or {}).items()})
    failures = list(previous.get("failures") or [])
    this = Counter(p.outcome for p in probes)
    totals.update({"total": len(probes), "passed": this["pass"], "failed": this["fail"]})
    totals.update({"inconclusive": this["inconclusive"], "looks_probed": 1 if probes else 0})
    cases.update(p.case for p in probes if p.outcome == "pass")
    failures += [dict(p.to_json(), look=look.number) for p in probes if p.outcome == "fail"]
    return totals, cases, failures


def _rls_leaks(
    look: Look, previous: Mapping[str, Any], rls: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What anon sees of each table at this look, and every table anon has been seen to read at any look."""
    rls_tables = rls.get("tables", {}) if rls.get("applicable") else {}
    rls_visible = {t: v["visible"] for t, v in rls_tables.items()}
    # A leak seen at any look stays a FAIL: the probe is not cumulative by itself.
    leaks = dict(previous.get("rls_leaks") or {})
    leaks.update({t: {"look": look.number, "visible": v} for t, v in rls_visible.items() if v and t not in leaks})
    return rls_visible, leaks


def _gating_problems(totals: Counter[str], served: int, leaks: Mapping[str, Any]) -> list[str]:
    """What makes token gating FAIL: wrong statuses, tokenless accesses served, tables anon can read."""
    problems = []
    if totals["failed"]:
        problems.append(f"{totals['failed']} of {totals['total']} probes got the wrong status")
    if served:
        problems.append(f"{served} results requests without a token were served in the window")
    if leaks:
        problems.append(
            "anon can see " + ", ".join(f"{v['visible']} rows of {t} (look {v['look']})" for t, v in leaks.items())
        )
    return problems


def _gating_lacking(
    totals: Counter[str],
    cases: Counter[str],
    skipped: str | None,
    rls: Mapping[str, Any],
    rls_visible: Mapping[str, Any],
    coverage: Mapping[str, Any],
) -> list[str]:
    """What token gating still lacks for a PASS: untested cases, an RLS probe that could not run, coverage."""
    lacking = []
    untested = [case for case in _PROBE_CASES if not cases.get(case)]
    if untested:
        why = skipped or f"{totals['inconclusive']} probes inconclusive so far"
        lacking.append(f"not every case has been shown yet (untested: {', '.join(untested)}; {why})")
    if rls.get("applicable") and any(v is None for v in rls_visible.values()):
        lacking.append("the RLS probe could not run as anon")
    if not coverage["enough"]:
        lacking.append("answered probes do not cover enough of the window: " + _coverage_text(coverage))
    return lacking


def _probe_row(m: Measurement, gating: Check, latency: Check | None) -> list[str]:
    """One look's row of the probes table: its probes' outcomes, their timings and what anon saw."""
    this = gating.evidence.get("this_look", {})
    outcomes = Counter(p.get("outcome") for p in this.get("probes", []))
    statuses = ", ".join(f"{p.get('case')} {p.get('status')}" for p in this.get("probes", [])[:8])
    rls = gating.evidence.get("rls", {})
    rls_cell = (
        ", ".join(f"{t} {v.get('visible')}" for t, v in rls.get("tables", {}).items())
        if rls.get("applicable")
        else "n/a"
    )
    lat = (latency.evidence.get("this_look", {}) if latency is not None else {}) or {}
    return [
        str(m.seq),
        str(sum(outcomes.values())),
        str(outcomes.get("pass", 0)),
        str(outcomes.get("fail", 0)),
        str(outcomes.get("inconclusive", 0)),
        _ms(lat.get("p50_ms")),
        _ms(lat.get("p95_ms")),
        rls_cell,
        this.get("skipped") or statuses or "-",
    ]


def _conversion_row(m: Measurement, conversion: Check) -> list[str]:
    """One look's row of the conversion table: each funnel's counts and decision, then the floor's."""
    funnels = conversion.evidence.get("funnels", {})
    cells = [str(m.seq), m.window_end.isoformat()]
    for name in _FUNNELS:
        f = funnels.get(name, {})
        k, n = f.get("k", 0), f.get("n", 0)
        low, high = f.get("wilson95", [0.0, 1.0])
        cells.append(f"{k}/{n}" + (f" = {k / n:.1%} [{low:.1%}, {high:.1%}]" if n else ""))
        cells.append(f"{f.get('look_verdict', '-')} (α {f.get('look_alpha', 0.0):.2g})")
    cells.append(_floor_cell(m.check("conversion_floor")))
    return cells


def _floor_cell(check: Check | None) -> str:
    if check is None:
        return "-"
    if check.verdict == NOT_APPLICABLE:
        return "N/A (no floor)"
    floor = check.evidence.get("floor")
    return f"{check.evidence.get('look_verdict', '-')} vs {floor:.0%} (α {check.evidence.get('look_alpha', 0.0):.2g})"


def _ms(value: object) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "-"
