"""The functions server's own Prometheus metrics: what every function call adds, and the text a ``GET /metrics`` scrape
reads (the soak reads it through ``gatefill.prism.checks.app_metrics``).

Calls are counted by function and HTTP status; their time from arrival to answer (the wait for a turn included) goes
into a histogram per function whose bucket edges include 50 ms and 1 s, where the latency goals sit, so a p95 can be
judged against either exactly; database errors, and 5xx answers the server could not record as an ``fn_logs`` event,
are counted by function. Two gauges per function hold the first and last call's instant on the server's clock (the
``X-Gatefill-Now`` instant of a fault-injection server that accepted one), and one gauge the server's start time: with
them a soak over a past window can show that the cumulative totals cover exactly that window's calls, and tell a
restart from a quiet period.

With ``--workers N`` every worker writes its values to memory-mapped files in a directory its supervisor owns
(prometheus-client's multiprocess mode, switched on by ``PROMETHEUS_MULTIPROC_DIR`` in the worker's environment before
the library is imported: ``multiprocess_environment``), and whichever worker answers a scrape merges all the files:
counters and histograms add up, the first call is the minimum over the workers and the last call the maximum.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from gatefill.errors import GatefillError
from gatefill.prism.metric_names import (
    DATABASE_ERRORS,
    DURATION,
    FIRST_CALL,
    LAST_CALL,
    REQUESTS,
    STARTED,
    UNRECORDED,
)

__all__ = [
    "BUCKETS",
    "CONTENT_TYPE",
    "DATABASE_ERRORS",
    "DURATION",
    "FIRST_CALL",
    "LAST_CALL",
    "MULTIPROCESS_VARIABLE",
    "REQUESTS",
    "STARTED",
    "UNRECORDED",
    "FunctionMetrics",
    "multiprocess_environment",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds. Fine around the two goals (p95 ≤ 50 ms for finalize at 20 clients, ≤ 1 s for the soak's default), with
#: both as edges, and up to the 25 s call deadline.
BUCKETS = (
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.06,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    10.0,
    25.0,
    30.0,
    math.inf,
)


@contextmanager
def multiprocess_environment(directory: str) -> Iterator[None]:
    """``PROMETHEUS_MULTIPROC_DIR`` set to ``directory`` for the processes started inside, restored after: a spawned
    process copies the environment when it starts, and its prometheus-client reads the variable on import."""
    previous = os.environ.get(MULTIPROCESS_VARIABLE)
    os.environ[MULTIPROCESS_VARIABLE] = directory
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MULTIPROCESS_VARIABLE, None)
        else:
            os.environ[MULTIPROCESS_VARIABLE] = previous


class FunctionMetrics:
    """One server's metrics: in this process, or with ``multiprocess_dir`` shared with the other workers' files.

    ``started`` is the server's start (Unix time; the supervisor's, for workers), which tells a scraper of restarts.
    """

    def __init__(self, *, multiprocess_dir: str | None = None, started: float | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        own: CollectorRegistry | None = self.registry
        if multiprocess_dir is not None:
            # The values must live in the shared files, which the library decided when it was imported.
            if os.environ.get(MULTIPROCESS_VARIABLE) != multiprocess_dir or not values.ValueClass._multiprocess:
                raise GatefillError(
                    f"the metrics of a worker process need {MULTIPROCESS_VARIABLE}={multiprocess_dir} in its "
                    "environment when it starts"
                )
            MultiProcessCollector(self.registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            own = None  # the merged files are what a scrape reads; these objects only write them
        self._requests = Counter(
            REQUESTS, "Function calls answered, by function and HTTP status.", ("function", "status"), registry=own
        )
        self._duration = Histogram(
            DURATION,
            "Seconds from a function call's arrival to its answer (its wait for a turn included).",
            ("function",),
            buckets=BUCKETS,
            registry=own,
        )
        self._database_errors = Counter(
            DATABASE_ERRORS, "Function calls that failed on a database error.", ("function",), registry=own
        )
        self._unrecorded = Counter(
            UNRECORDED, "5xx answers whose fn_logs error event could not be written.", ("function",), registry=own
        )
        self._first = Gauge(
            FIRST_CALL,
            "The earliest call's instant (Unix time) on the server's clock.",
            ("function",),
            registry=own,
            multiprocess_mode="min",
        )
        self._last = Gauge(
            LAST_CALL,
            "The latest call's instant (Unix time) on the server's clock.",
            ("function",),
            registry=own,
            multiprocess_mode="max",
        )
        started_gauge = Gauge(STARTED, "When this server started (Unix time).", registry=own, multiprocess_mode="max")
        started_gauge.set(time.time() if started is None else started)
        self._times: dict[str, tuple[float, float]] = {}
        self._counted: dict[tuple[str, int], Counter] = {}
        self._timed: dict[str, Histogram] = {}
        self._lock = threading.Lock()

    def observe(self, function: str, status: int, seconds: float, at: datetime, *, database_error: bool) -> None:
        """Counts one answered call of ``function`` (one of the server's own names: labels stay a small set)."""
        counted = self._counted.get((function, status))
        if counted is None:
            # labels() takes a lock and builds its key on every call: the children are looked up once.
            counted = self._counted[(function, status)] = self._requests.labels(function, str(status))
        counted.inc()
        timed = self._timed.get(function)
        if timed is None:
            timed = self._timed[function] = self._duration.labels(function)
        timed.observe(seconds)
        if database_error:
            self._database_errors.labels(function).inc()
        instant = at.timestamp()
        with self._lock:
            first, last = self._times.get(function, (math.inf, -math.inf))
            if instant < first:
                self._first.labels(function).set(instant)
            if instant > last:
                self._last.labels(function).set(instant)
            self._times[function] = (min(first, instant), max(last, instant))

    def unrecorded(self, function: str) -> None:
        """Counts a 5xx answer of ``function`` whose error event did not reach the database."""
        self._unrecorded.labels(function).inc()

    def exposition(self) -> bytes:
        """The Prometheus text of every metric (every worker's, merged, in multiprocess mode)."""
        return generate_latest(self.registry)
