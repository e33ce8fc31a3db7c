"""How the soak attributes the server's cumulative counters to its window (``gatefill.prism.checks.app_metrics``),
against a real HTTP endpoint on 127.0.0.1 serving the real exposition of ``FunctionMetrics``: live looks count
differences from the soak's first scrape, a restart is said and never makes a count negative, a retrospective look
uses totals only when they are exactly the window's calls, and an unreadable endpoint gives a reason instead of
counts."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gatefill import stats
from gatefill.job import Baseline, Look
from gatefill.prism.checks.app_metrics import (
    STATE_KEY,
    AppMetricsReader,
    AppWindow,
    bucket_quantile,
    display_url,
    latency,
    parse_metrics,
    server_errors,
)
from gatefill.prism.platform.metrics import FunctionMetrics


class _Endpoint:
    """A real HTTP server on 127.0.0.1 answering ``GET /metrics`` with whatever ``body`` holds."""

    def __init__(self) -> None:
        self.body = b""
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(endpoint.body)))
                self.end_headers()
                self.wfile.write(endpoint.body)

            def log_message(self, *_args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, metrics: FunctionMetrics) -> None:
        self.body = metrics.exposition()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[_Endpoint]:
    served = _Endpoint()
    try:
        yield served
    finally:
        served.close()


NOW = datetime.now(UTC)
WINDOW = NOW - timedelta(hours=1)


def _look(number: int, end: datetime, previous: AppWindow | None = None, *, simulated: bool = False) -> Look:
    # The state goes through JSON, as the ledger stores it between looks.
    state = json.loads(json.dumps(dict(previous.state))) if previous is not None else None
    return Look(
        run_id="soak-test",
        number=number,
        max_looks=10,
        window_start=WINDOW,
        end=end,
        window_end=WINDOW + timedelta(hours=6),
        taken_at=end,
        plan=stats.SequentialPlan(max_looks=10, alpha=0.05),
        margin=0.05,
        min_conversion=None,
        baseline_days=7.0,
        baseline_rate=None,
        min_n=30,
        simulated_time=simulated,
        baseline=Baseline(WINDOW - timedelta(days=7), WINDOW, "", {}),
        previous={"function_errors": {STATE_KEY: state}} if state is not None else {},
    )


def _calls(metrics: FunctionMetrics, status: int, n: int, at: datetime, fn: str = "finalizeAssessment") -> None:
    for _ in range(n):
        metrics.observe(fn, status, 0.02, at, database_error=status >= 500)


def test_a_live_soak_counts_from_its_first_scrape_and_keeps_counting_across_a_restart(endpoint: _Endpoint) -> None:
    server = FunctionMetrics(started=1_000.0)
    _calls(server, 200, 5, WINDOW - timedelta(hours=2))  # before the window: not the soak's
    _calls(server, 500, 4, WINDOW - timedelta(minutes=90))
    endpoint.serve(server)
    reader = AppMetricsReader(endpoint.url, timeout=5)
    try:
        _calls(server, 200, 3, NOW)
        _calls(server, 500, 2, NOW)
        endpoint.serve(server)
        first = reader.read(_look(1, datetime.now(UTC) + timedelta(seconds=1)), {})
        assert first.requests() == {"finalizeAssessment": {"200": 3, "500": 2}}
        assert "since the soak's first scrape" in first.coverage and first.notes == ()
        assert server_errors(first).verdict == "FAIL"

        # The server restarts (a new start time) and answers one more 500 before the next look.
        restarted = FunctionMetrics(started=2_000.0)
        _calls(restarted, 500, 1, datetime.now(UTC))
        endpoint.serve(restarted)
        second = reader.read(_look(2, datetime.now(UTC) + timedelta(seconds=2), first), {})
        assert second.requests() == {"finalizeAssessment": {"200": 3, "500": 3}}
        assert len(second.notes) == 1 and "restarted" in second.notes[0] and "start time changed" in second.notes[0]

        # Same start time but fewer calls than the last scrape: a restart too, and nothing negative.
        fewer = FunctionMetrics(started=2_000.0)
        endpoint.serve(fewer)
        third = reader.read(_look(3, datetime.now(UTC) + timedelta(seconds=3), second), {})
        assert third.requests() == {"finalizeAssessment": {"200": 3, "500": 3}}
        assert len(third.notes) == 2 and "went down from 1 to 0" in third.notes[1]
        assert all(v >= 0 for v in (third.values or {}).values())
    finally:
        reader.close()


def test_a_server_whose_first_call_is_inside_the_window_counts_from_zero(endpoint: _Endpoint) -> None:
    server = FunctionMetrics()
    _calls(server, 500, 2, WINDOW + timedelta(minutes=1))
    endpoint.serve(server)
    reader = AppMetricsReader(endpoint.url, timeout=5)
    try:
        window = reader.read(_look(1, datetime.now(UTC) + timedelta(seconds=1)), {})
        # Both 500s came before the soak's first scrape, and still count: every call of this server is in the window.
        assert window.requests() == {"finalizeAssessment": {"500": 2}}
        assert "the server's first call, inside the window" in window.coverage
    finally:
        reader.close()


def test_retrospective_totals_need_every_call_inside_the_window_and_the_finalizations_to_match(
    endpoint: _Endpoint,
) -> None:
    server = FunctionMetrics()
    _calls(server, 200, 4, WINDOW + timedelta(minutes=10))
    _calls(server, 500, 1, WINDOW + timedelta(minutes=20))
    endpoint.serve(server)
    reader = AppMetricsReader(endpoint.url, timeout=5)
    try:
        cutoff = WINDOW + timedelta(minutes=30)
        ok = reader.read(_look(1, cutoff, simulated=True), {"finalize_complete": 4})
        assert ok.requests() == {"finalizeAssessment": {"200": 4, "500": 1}}
        assert "match the window's 4 finalize_complete events" in ok.coverage
        # A finalization the database saw but these totals did not (another server, or a restart): no counts.
        short = reader.read(_look(2, cutoff, ok, simulated=True), {"finalize_complete": 5})
        assert short.values is None and "differ from the 5 finalize_complete events" in short.coverage
        assert server_errors(short).verdict == "INCONCLUSIVE"
        # A cutoff before the last call: the totals reach past it.
        early = reader.read(_look(3, WINDOW + timedelta(minutes=15), ok, simulated=True), {"finalize_complete": 4})
        assert early.values is None and "after this look's cutoff" in early.coverage
        # A real-clock look whose cutoff is before the soak's first scrape is retrospective too.
        _calls(server, 200, 1, WINDOW - timedelta(minutes=5))
        endpoint.serve(server)
        past = reader.read(_look(4, cutoff), {"finalize_complete": 5})
        assert past.values is None and "calls before the window" in past.coverage
    finally:
        reader.close()


def test_a_call_in_the_windows_first_millisecond_belongs_to_it(endpoint: _Endpoint) -> None:
    # The platform stamps calls to the millisecond (a JavaScript Date): a call made the instant the window opened
    # (the simulator's check of the URL, at the apply's finish) carries that millisecond's floor, a hair before it.
    opened = WINDOW.replace(microsecond=449_662)
    server = FunctionMetrics()
    _calls(server, 400, 1, opened.replace(microsecond=449_000))
    _calls(server, 200, 2, opened + timedelta(minutes=3))
    endpoint.serve(server)
    reader = AppMetricsReader(endpoint.url, timeout=5)
    try:
        look = replace(_look(1, opened + timedelta(minutes=30), simulated=True), window_start=opened)
        seen = reader.read(look, {"finalize_complete": 2})
        assert seen.requests() == {"finalizeAssessment": {"200": 2, "400": 1}}, seen.coverage
        # A whole millisecond earlier is before the window.
        _calls(server, 200, 1, opened.replace(microsecond=448_000))
        endpoint.serve(server)
        early = reader.read(replace(look, previous={}), {"finalize_complete": 3})
        assert early.values is None and "calls before the window" in early.coverage
    finally:
        reader.close()


def test_an_endpoint_that_cannot_be_read_gives_the_reason_and_keeps_the_state(endpoint: _Endpoint) -> None:
    server = FunctionMetrics()
    endpoint.serve(server)
    reader = AppMetricsReader(endpoint.url.replace("http://", "http://user:secret@"), timeout=5)
    try:
        first = reader.read(_look(1, datetime.now(UTC) + timedelta(seconds=1)), {})
        assert first.values is not None
        endpoint.body = b"<html>not metrics</html>"
        broken = reader.read(_look(2, datetime.now(UTC) + timedelta(seconds=2), first), {})
        assert broken.values is None and "sent no usable metrics" in broken.coverage
        assert "secret" not in broken.coverage and "secret" not in json.dumps(broken.to_json())
        assert broken.state == first.state  # the next look continues from the last good scrape
        for judged in (server_errors(broken), latency(broken, 1.0, 10)):
            assert judged.verdict == "INCONCLUSIVE"
        endpoint.body = (
            b"# HELP something_else A metric of another app.\n# TYPE something_else counter\nsomething_else_total 3\n"
        )
        foreign = reader.read(_look(3, datetime.now(UTC) + timedelta(seconds=3), first), {})
        assert foreign.values is None and "not the metrics of `gatefill serve functions`" in foreign.coverage
    finally:
        reader.close()
    assert display_url("http://user:pw@host:9100/metrics?token=x") == "http://host:9100/metrics"


def test_p95_is_located_by_buckets_and_judged_only_when_the_bucket_decides() -> None:
    cumulative = [(0.01, 10.0), (0.05, 95.0), (0.1, 99.0), (1.0, 100.0), (float("inf"), 100.0)]
    q = bucket_quantile(cumulative, 0.95)
    assert q is not None and (q.n, q.low, q.high) == (100, 0.01, 0.05)
    q = bucket_quantile([(0.01, 10.0), (0.05, 94.0), (0.1, 100.0), (float("inf"), 100.0)], 0.95)
    assert q is not None and (q.low, q.high) == (0.05, 0.1)
    assert bucket_quantile([(0.05, 0.0), (float("inf"), 0.0)], 0.95) is None

    server = FunctionMetrics()
    for ms in [10] * 19 + [70]:  # nearest-rank p95 of 20 calls: the 19th, 10 ms
        server.observe("finalizeAssessment", 200, ms / 1000, WINDOW, database_error=False)
    for ms in [30] * 12:
        server.observe("get-results-by-session", 200, ms / 1000, WINDOW, database_error=False)
    server.observe("score_prism", 200, 3.0, WINDOW, database_error=False)
    scrape = parse_metrics(server.exposition().decode(), NOW)
    window = AppWindow("test", dict(scrape.values), "all")
    assert latency(window, 0.05, 10).verdict == "PASS"
    judged = latency(window, 0.025, 10)  # results' p95 bucket (25, 30] ms lies above 25 ms
    assert (
        judged.verdict == "FAIL" and judged.evidence["p95_by_function"]["get-results-by-session"]["verdict"] == "FAIL"
    )
    assert judged.evidence["p95_by_function"]["score_prism"]["verdict"] == "too few calls"
    straddled = latency(window, 0.027, 10)  # 27 ms is inside (25, 30]: the buckets cannot tell
    assert straddled.verdict == "INCONCLUSIVE" and "straddles" in straddled.summary
    assert latency(window, 0.05, 50).verdict == "INCONCLUSIVE"
