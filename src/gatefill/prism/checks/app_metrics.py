"""What the soak reads from the functions server's own metrics (``metrics_url``, as Argo Rollouts and Kayenta query
Prometheus): one scrape at the soak's start and one per look, the counts attributed to the soak's window, and p95s
from the latency histogram's buckets. The names are ``gatefill.prism.platform.metrics``'s.

The server's counters are cumulative since it started, so a count belongs to the window only when the soak can show
it does:

- A live look (real clock, its cutoff after the soak's first scrape) counts differences from a baseline: zero when
  the server's first call is inside the window (its totals are all window calls), else the soak's first scrape (the
  evidence then says the counts run from that instant). A restart (the server's start time changed, or a counter went
  down) is said in the evidence: the counts seen up to the last scrape before it are kept, the new server's count
  from zero, and the calls answered between that scrape and the restart are unseen. No count is ever negative.
- A retrospective look (simulated clock, or a cutoff before the soak's first scrape) uses the server's totals only
  when they are exactly the window's calls so far: its first call at or after the window's start and its last call
  before the cutoff (on the server's clock, which honours ``X-Gatefill-Now``), and as many finalizeAssessment answers
  200 as ``finalize_complete`` events in the window (each such answer writes one; a restart or a second server shows
  up as a difference). Otherwise the look gets no counts, and the reason.

A metrics endpoint that does not answer, or answers something other than a gatefill functions server's metrics, is
such a reason too; ``PrismSoakChecks`` never passes a check on counts it could not attribute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gatefill.job import Look
from gatefill.prism.metric_names import (
    DATABASE_ERRORS,
    DURATION,
    FIRST_CALL,
    LAST_CALL,
    REQUESTS,
    STARTED,
    UNRECORDED,
)
from gatefill.prometheus import bucket_quantile

__all__ = ["STATE_KEY", "AppMetricsReader", "AppWindow", "Scrape", "bucket_quantile", "display_url", "parse_metrics"]

#: Where the reader's state between looks is kept: in the function_errors check's evidence (a state key, hidden from
#: the Markdown reports, stored in the ledger, so a resumed soak continues it).
STATE_KEY = "_app_metrics"
_FINALIZE = "finalizeAssessment"


class _Unavailable(Exception):
    """The metrics could not be read; the message says why (never with the URL's credentials)."""


@dataclass(frozen=True)
class Scrape:
    """One reading of the server's metrics: its start time, first and last call instants (Unix seconds, on its
    clock) and every cumulative series, keyed ``requests|FN|STATUS``, ``bucket|FN|LE``, ``dberrors|FN``,
    ``unrecorded|FN``."""

    taken_at: datetime
    started: float
    first_call: float | None
    last_call: float | None
    values: Mapping[str, float]

    @property
    def calls(self) -> float:
        return sum(v for k, v in self.values.items() if k.startswith("requests|"))

    def to_json(self, *, values: bool) -> dict[str, Any]:
        """What a later look needs of this scrape: when, the server's start and total calls (a restart shows in
        either), and with ``values`` the non-zero series (a live soak's baseline)."""
        data: dict[str, Any] = {"at": self.taken_at.isoformat(), "started": self.started, "calls": self.calls}
        if values:
            data["values"] = {k: v for k, v in self.values.items() if v}
        return data


def parse_metrics(text: str, taken_at: datetime) -> Scrape:
    """The gatefill series of a Prometheus text exposition; raises ``ValueError`` on anything else."""
    values: dict[str, float] = {}
    started: float | None = None
    first: list[float] = []
    last: list[float] = []
    names = {
        f"{REQUESTS}_total": ("requests", "status"),
        f"{DURATION}_bucket": ("bucket", "le"),
        f"{DATABASE_ERRORS}_total": ("dberrors", None),
        f"{UNRECORDED}_total": ("unrecorded", None),
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == STARTED:
                started = sample.value
            elif sample.name == FIRST_CALL:
                first.append(sample.value)
            elif sample.name == LAST_CALL:
                last.append(sample.value)
            elif sample.name in names:
                kind, extra = names[sample.name]
                key = "|".join([kind, sample.labels["function"], *([sample.labels[extra]] if extra else [])])
                values[key] = values.get(key, 0.0) + sample.value
    if started is None:
        raise ValueError(f"no {STARTED}: not the metrics of `gatefill serve functions`")
    return Scrape(taken_at, started, min(first) if first else None, max(last) if last else None, values)


def display_url(url: str) -> str:
    """The URL without credentials or query, safe for evidence and messages."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "(an invalid URL)"
    return str(parsed.copy_with(username=None, password=None, query=None, fragment=None))


@dataclass(frozen=True)
class AppWindow:
    """What one look learned from the server's metrics: the counts attributed to the window so far (``values``,
    keyed as in ``Scrape``) and how far they reach, or (``values`` None) why there are none."""

    source: str
    values: Mapping[str, float] | None
    coverage: str
    notes: tuple[str, ...] = ()
    state: Mapping[str, Any] = field(default_factory=dict)

    def requests(self) -> dict[str, dict[str, int]]:
        """Calls by function and status."""
        found: dict[str, dict[str, int]] = {}
        for key, value in (self.values or {}).items():
            kind, fn, *rest = key.split("|")
            if kind == "requests" and value:
                found.setdefault(fn, {})[rest[0]] = round(value)
        return found

    def per_function(self, kind: str) -> dict[str, int]:
        """``dberrors`` or ``unrecorded`` counts by function (non-zero only)."""
        found = {}
        for key, value in (self.values or {}).items():
            name, fn = key.split("|")[:2]
            if name == kind and value:
                found[fn] = round(value)
        return found

    def buckets(self) -> dict[str, list[tuple[float, float]]]:
        """Cumulative latency buckets by function: ``(le seconds, calls)``."""
        found: dict[str, list[tuple[float, float]]] = {}
        for key, value in (self.values or {}).items():
            kind, fn, *rest = key.split("|")
            if kind == "bucket":
                found.setdefault(fn, []).append((float(rest[0]), value))
        return found

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"source": self.source, "coverage": self.coverage}
        if self.values is not None:
            requests = self.requests()
            data["calls"] = sum(sum(by.values()) for by in requests.values())
            data["requests"] = requests
            data["database_errors"] = self.per_function("dberrors")
            data["unrecorded_5xx"] = self.per_function("unrecorded")
        if self.notes:
            data["notes"] = list(self.notes)
        return data


def _minus(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in set(a) | set(b)}


def _plus(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


class AppMetricsReader:
    """Scrapes one server's metrics for a soak: once when built (the soak's start), then at every look (``read``)."""

    def __init__(self, url: str, *, timeout: float, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url
        self.source = display_url(url)
        self._http = httpx.Client(timeout=timeout, transport=transport)
        opening = self.scrape()
        # When the endpoint cannot be read now, the first look that reads it takes this scrape's place.
        self._opening = opening if isinstance(opening, Scrape) else None

    def close(self) -> None:
        self._http.close()

    def scrape(self) -> Scrape | str:
        """One reading of the endpoint, or why there is none (a sentence without the URL's credentials)."""
        try:
            return self._scrape()
        except _Unavailable as exc:
            return str(exc)

    def _scrape(self) -> Scrape:
        taken_at = datetime.now(UTC)
        try:
            response = self._http.get(self.url)
        except httpx.HTTPError as exc:
            # The exception text can hold the URL (with credentials): the class name only.
            raise _Unavailable(f"metrics endpoint {self.source} unreachable ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise _Unavailable(f"metrics endpoint {self.source} answered {response.status_code}")
        try:
            return parse_metrics(response.text, taken_at)
        except (ValueError, KeyError, TypeError) as exc:
            raise _Unavailable(f"metrics endpoint {self.source} sent no usable metrics ({str(exc)[:160]})") from None

    def read(self, look: Look, events: Mapping[str, int], scrape: Scrape | str | None = None) -> AppWindow:
        """This look's counts for the window so far, from ``scrape`` (taken now when not given; a string is why
        there is none); ``events`` are the look's fn_logs counts, for the cross-check."""
        state = dict(look.previous.get("function_errors", {}).get(STATE_KEY) or {})
        if scrape is None:
            scrape = self.scrape()
        if isinstance(scrape, str):
            return AppWindow(self.source, None, scrape, tuple(state.get("restarts", [])), state)
        # A simulated soak only ever uses totals: it keeps no series between looks.
        keep = not look.simulated_time
        state.setdefault("opening", (self._opening or scrape).to_json(values=keep))
        restart = _restart(scrape, state.get("last") or state["opening"])
        if restart is not None:
            state["restarts"] = [*state.get("restarts", []), restart]
        if look.simulated_time or look.end <= datetime.fromisoformat(state["opening"]["at"]):
            values, coverage = _totals(look, scrape, events)
        else:
            values, coverage = _deltas(look, scrape, state, restarted=restart is not None)
        state["last"] = scrape.to_json(values=keep)
        return AppWindow(self.source, values, coverage, tuple(state.get("restarts", [])), state)


def _window_start(look: Look) -> float:
    """The window's start on the calls' clock: the platform stamps a call to the millisecond (JavaScript's ``Date``),
    so a call in the window's first millisecond is stamped at or after its floor and belongs to the window."""
    return math.floor(look.window_start.timestamp() * 1000.0) / 1000.0


def _totals(look: Look, scrape: Scrape, events: Mapping[str, int]) -> tuple[dict[str, float] | None, str]:
    """The server's totals, if they are exactly the window's calls before the cutoff (see the module docstring)."""
    reasons = []
    first, last = scrape.first_call, scrape.last_call
    if first is not None and first < _window_start(look):
        reasons.append(f"the server answered calls before the window (its first at {_iso(first)})")
    if last is not None and last >= look.end.timestamp():
        reasons.append(f"its totals include calls after this look's cutoff (its last at {_iso(last)})")
    answered = round(scrape.values.get(f"requests|{_FINALIZE}|200", 0.0))
    logged = events.get("finalize_complete", 0)
    # Only worth saying when the span fits: calls outside the window explain any difference already.
    if not reasons and answered != logged:
        reasons.append(
            f"its {answered} finalizeAssessment answers 200 differ from the {logged} finalize_complete events in the "
            "window (a restart, or calls served by another server)"
        )
    if reasons:
        return None, "the server's cumulative totals cannot be attributed to the window: " + "; ".join(reasons)
    span = f" (calls from {_iso(first)} to {_iso(last)})" if first is not None and last is not None else ""
    coverage = (
        f"the server's totals since it started, all inside the window{span}; its finalizeAssessment answers 200 "
        f"match the window's {logged} finalize_complete events"
    )
    return dict(scrape.values), coverage


def _deltas(look: Look, scrape: Scrape, state: dict[str, Any], *, restarted: bool) -> tuple[dict[str, float], str]:
    """Counts since the baseline, carried across restarts (see the module docstring); updates ``state``."""
    if "baseline" in state and restarted:
        # The old server's counts up to its last scrape stay counted; the new one counts from zero.
        state["carried"] = _plus(state.get("carried", {}), _minus(state["last"]["values"], state["baseline"]))
    if "baseline" not in state or restarted:
        opening = state["opening"]
        if scrape.first_call is None or scrape.first_call >= _window_start(look):
            baseline, since = {}, "the server's first call, inside the window"
        elif not restarted and opening["started"] == scrape.started:
            baseline, since = dict(opening["values"]), f"the soak's first scrape at {opening['at']}"
        else:
            baseline, since = dict(scrape.values), f"the scrape at {scrape.taken_at.isoformat()}"
        state["baseline"] = baseline
        state.setdefault("since", since)
    counts = _plus(state.get("carried", {}), _minus(scrape.values, state["baseline"]))
    return counts, f"calls answered since {state['since']} (differences of cumulative counters)"


def _restart(scrape: Scrape, previous: Mapping[str, Any]) -> str | None:
    """A restart since the ``previous`` scrape: the server's start time changed, or a counter went down."""
    if previous["started"] == scrape.started and scrape.calls >= previous["calls"]:
        return None
    how = (
        f"its start time changed from {_iso(previous['started'])} to {_iso(scrape.started)}"
        if previous["started"] != scrape.started
        else f"its count of calls went down from {previous['calls']:g} to {scrape.calls:g}"
    )
    return (
        f"the server restarted between the scrapes at {previous['at']} and {scrape.taken_at.isoformat()} ({how}); "
        "calls it answered after the first of them and before the restart are not counted"
    )


@dataclass(frozen=True)
class Judgement:
    """A verdict on the app's metrics alone, with its one-line summary and evidence."""

    verdict: str
    summary: str
    evidence: Mapping[str, Any]


def server_errors(app: AppWindow) -> Judgement:
    """The 5xx answers in the window's counts: FAIL on any, with how many the database never recorded."""
    if app.values is None:
        return Judgement("INCONCLUSIVE", f"the app's metrics cannot be used: {app.coverage}", app.to_json())
    requests = app.requests()
    failed = {fn: {st: n for st, n in by.items() if st.isdigit() and int(st) >= 500} for fn, by in requests.items()}
    failed = {fn: by for fn, by in failed.items() if by}
    count = sum(sum(by.values()) for by in failed.values())
    calls = sum(sum(by.values()) for by in requests.values())
    evidence = {**app.to_json(), "answers_5xx": failed}
    if count:
        listed = ", ".join(f"{fn} {st}: {n}" for fn, by in sorted(failed.items()) for st, n in sorted(by.items()))
        unrecorded = sum(app.per_function("unrecorded").values())
        summary = f"{count} of {calls} calls answered 5xx per the app's metrics ({listed})"
        if unrecorded:
            summary += f", {unrecorded} of them with no error event in the database"
        return Judgement("FAIL", summary, evidence)
    if calls == 0:
        return Judgement("INCONCLUSIVE", "the app's metrics count no call in the window", evidence)
    return Judgement("PASS", f"0 of {calls} calls answered 5xx per the app's metrics", evidence)


def latency(app: AppWindow, threshold_s: float, min_calls: int) -> Judgement:
    """Each function's p95 from its histogram buckets against ``threshold_s`` (functions with fewer than
    ``min_calls`` calls are listed, not judged): FAIL when a p95's bucket lies above it, PASS when every judged p95's
    bucket lies at or below it, INCONCLUSIVE when one straddles it; the buckets' resolution is stated."""
    if app.values is None:
        return Judgement("INCONCLUSIVE", f"the app's histogram cannot be used: {app.coverage}", app.to_json())
    judged: dict[str, Any] = {}
    texts, verdicts = [], []
    for fn, cumulative in sorted(app.buckets().items()):
        q = bucket_quantile(cumulative, 0.95)
        if q is None:
            continue
        verdict = "FAIL" if q.low >= threshold_s else ("PASS" if q.high <= threshold_s else "INCONCLUSIVE")
        if q.n < min_calls:
            verdict = "too few calls"
        else:
            verdicts.append(verdict)
        high = None if math.isinf(q.high) else q.high * 1000
        judged[fn] = {"calls": q.n, "p95_bucket_ms": [q.low * 1000, high], "verdict": verdict}
        texts.append(f"{fn} p95 {q.text()} over {q.n} calls")
    evidence = {"source": app.source, "coverage": app.coverage, "p95_by_function": judged}
    listed = "; ".join(texts)
    threshold = f"the threshold {threshold_s * 1000:g} ms (bucket resolution)"
    if "FAIL" in verdicts:
        return Judgement("FAIL", f"{listed}: above {threshold}", evidence)
    if not verdicts:
        why = f"no function has the {min_calls} calls a p95 needs in the app's histogram"
        return Judgement("INCONCLUSIVE", why + (f" ({listed})" if listed else ""), evidence)
    if "INCONCLUSIVE" in verdicts:
        return Judgement("INCONCLUSIVE", f"{listed}: a p95 bucket straddles {threshold}", evidence)
    return Judgement("PASS", f"{listed}: within {threshold}", evidence)
