"""gatefill's Prometheus metrics, in one place: the families read from an environment's ledger (the console's
``GET /metrics``), the series of one run (what ``apply`` and ``soak`` add for the run they drive), and their delivery
to a node_exporter textfile (``--metrics-file``) and a Pushgateway (``--pushgateway``).

Every value is read from the ledger when it is exported; nothing is counted in the process, so a console restart
loses nothing, two consoles agree and a textfile says what the ledger says. Delivery never fails a run: a textfile
that cannot be written or a Pushgateway that does not answer is logged once per kind of failure and tried again at
the next moment, and pushes go out on a thread of their own, off the batch path.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlsplit

import httpx
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gatefill import ledger
from gatefill.clock import Clock
from gatefill.config import DEFAULT_METRICS_INTERVAL, DEFAULT_PUSH_TIMEOUT, Environment, MetricsSettings, Settings
from gatefill.db import Database
from gatefill.errors import DatabaseUnreachable, GatefillError, UsageError

__all__ = [
    "BATCH_BUCKETS",
    "MetricsExport",
    "MetricsTargets",
    "RunMetrics",
    "environment_metrics",
    "metrics_text",
    "read_run",
    "safe_url",
    "write_textfile",
]

#: Upper bounds (seconds) of the batch duration histogram: a batch is a transaction of a few sessions.
BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Soak runs per environment whose latest look is exported.
SOAK_RUNS = 20
#: The Pushgateway's grouping key starts with this job label.
PUSH_JOB = "gatefill"

_log = logging.getLogger(__name__)


# ====================================================================================================================
# The ledger's families


def _gauge(name: str, documentation: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


@dataclass
class _Families:
    """The environment-wide families, filled in one environment at a time."""

    runs: GaugeMetricFamily
    sessions: GaugeMetricFamily
    rate: GaugeMetricFamily
    held: GaugeMetricFamily
    checks: GaugeMetricFamily
    reachable: GaugeMetricFamily

    @classmethod
    def new(cls) -> _Families:
        return cls(
            _gauge("gatefill_runs", "Runs in the ledger by phase and status.", "env", "phase", "status"),
            _gauge("gatefill_sessions", "Sessions with a result, by result (written = applied).", "env", "result"),
            _gauge(
                "gatefill_apply_rate_sessions_per_minute",
                "Measured rate of each running apply (committed batches, first start to last finish).",
                "env",
                "run",
            ),
            _gauge("gatefill_apply_held", "1 while a hold keeps a running apply's next batch back.", "env", "run"),
            _gauge(
                "gatefill_soak_check",
                "1 for each soak check's verdict at the soak's latest look.",
                "env",
                "run",
                "check",
                "verdict",
            ),
            _gauge("gatefill_ledger_up", "1 when the environment's ledger answered this scrape.", "env"),
        )

    def all(self) -> list[Metric]:
        return [self.runs, self.sessions, self.rate, self.held, self.checks, self.reachable]


def _histogram(durations: Sequence[float]) -> HistogramMetricFamily:
    buckets = [(str(bound), sum(1 for d in durations if d <= bound)) for bound in BATCH_BUCKETS]
    buckets.append(("+Inf", len(durations)))
    return HistogramMetricFamily(
        "gatefill_batch_duration_seconds",
        "Committed batches' durations (start to commit), every watched ledger.",
        buckets=buckets,
        sum_value=sum(durations),
    )


def _rate_per_minute(conn: sa.Connection, run_id: str) -> float:
    """Sessions a minute over a run's committed batches, first start to last finish (0 before any)."""
    b = ledger.batches
    query = sa.select(sa.func.min(b.c.started_at), sa.func.max(b.c.finished_at), sa.func.sum(b.c.sessions))
    first, last, sessions = conn.execute(query.where(b.c.run_id == run_id)).one()
    seconds = (last - first).total_seconds() if first is not None and last is not None else 0.0
    return 60.0 * float(sessions) / seconds if seconds > 0 else 0.0


def _collect_env(conn: sa.Connection, name: str, families: _Families) -> list[float]:
    """Adds one environment's samples; returns its batch durations."""
    if not sa.inspect(conn).has_table(ledger.runs.name):
        return []
    r, s, b = ledger.runs, ledger.session_results, ledger.batches
    by_status = sa.select(r.c.phase, r.c.status, sa.func.count()).group_by(r.c.phase, r.c.status)
    for phase, status, count in conn.execute(by_status).all():
        families.runs.add_metric([name, phase, status], count)
    for result, count in conn.execute(sa.select(s.c.result, sa.func.count()).group_by(s.c.result)).all():
        families.sessions.add_metric([name, result], count)
    for run in ledger.list_runs(conn, phase=ledger.APPLY_PHASE, limit=200):
        if run.status is not ledger.RunStatus.RUNNING:
            continue
        families.rate.add_metric([name, run.id], _rate_per_minute(conn, run.id))
        holding = any(h.ended_at is None for h in ledger.holds_for(conn, run.id))
        families.held.add_metric([name, run.id], 1 if holding else 0)
    for run in ledger.list_runs(conn, phase="soak", limit=SOAK_RUNS):
        looks = ledger.measurements_for(conn, run.id)
        for check in looks[-1].checks if looks else []:
            families.checks.add_metric([name, run.id, check.name, check.verdict], 1)
    spans = conn.execute(sa.select(b.c.started_at, b.c.finished_at)).all()
    return [(finished - started).total_seconds() for started, finished in spans]


def environment_metrics(conn: sa.Connection, name: str) -> list[Metric]:
    """Environment ``name``'s families read through ``conn`` (its ledger answered: ``gatefill_ledger_up`` 1)."""
    families = _Families.new()
    durations = _collect_env(conn, name, families)
    families.reachable.add_metric([name], 1)
    return [*families.all(), _histogram(durations)]


class _LedgerCollector(Collector):
    """Reads every watched ledger at each scrape."""

    def __init__(self, settings: Settings, envs: Sequence[str]) -> None:
        self.settings = settings
        self.envs = tuple(envs)

    def collect(self) -> Iterator[Metric]:
        families = _Families.new()
        durations: list[float] = []
        for name in self.envs:
            try:
                with Database(self.settings.env(name)) as db, db.connect() as conn:
                    durations.extend(_collect_env(conn, name, families))
                families.reachable.add_metric([name], 1)
            except (DatabaseUnreachable, GatefillError):
                families.reachable.add_metric([name], 0)
        yield from families.all()
        yield _histogram(durations)


def _exposition(metrics: Iterable[Metric]) -> bytes:
    found = list(metrics)

    class _Fixed(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from found

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return generate_latest(registry)


def metrics_text(settings: Settings, envs: Sequence[str]) -> bytes:
    """The Prometheus text exposition of the watched ledgers, now (the console's ``GET /metrics``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LedgerCollector(settings, envs))
    return generate_latest(registry)


# ====================================================================================================================
# One run's series


@dataclass(frozen=True)
class RunMetrics:
    """One run as its ledger tells it now: its status, and an apply's progress and pace or a soak's looks."""

    env: str
    run_id: str
    phase: str
    status: str
    #: An apply's: planned sessions, sessions by result, committed batches and the last one's size.
    planned: int = 0
    results: tuple[tuple[str, int], ...] = ()
    batches: int = 0
    last_batch_sessions: int | None = None
    #: An apply's pacing: the level and batch size of the pacer's latest recorded change, and whether a Stop holds.
    pace_level: str | None = None
    pace_batch_size: int | None = None
    stopped: bool = False
    #: A soak's: looks stored and the latest one's verdict.
    looks: int = 0
    verdict: str | None = None


#: Pacing decisions that change the pace (``watch`` only lists the indicators).
_PACE_ACTIONS = frozenset({"size", "slow", "recover", "stop", "resume"})


def read_run(conn: sa.Connection, env: str, run_id: str) -> RunMetrics:
    """Run ``run_id``'s series as its ledger has them now."""
    run = ledger.get_run(conn, run_id, with_plan=False)
    base = RunMetrics(env, run.id, run.phase, run.status.value)
    if run.phase == ledger.APPLY_PHASE:
        return _read_apply(conn, base)
    looks = ledger.measurements_for(conn, run.id)
    return replace(base, looks=len(looks), verdict=looks[-1].verdict if looks else None)


def _read_apply(conn: sa.Connection, base: RunMetrics) -> RunMetrics:
    b = ledger.batches
    planned, _ = ledger.planned_counts(conn, base.run_id, retry_failed=False)
    results = tuple(sorted(ledger.result_counts(conn, base.run_id).items()))
    count = conn.execute(sa.select(sa.func.count()).where(b.c.run_id == base.run_id)).scalar_one()
    last = conn.execute(
        sa.select(b.c.sessions).where(b.c.run_id == base.run_id).order_by(b.c.batch_no.desc()).limit(1)
    ).scalar_one_or_none()
    paced = [d for d in ledger.decisions_for(conn, base.run_id) if d.action in _PACE_ACTIONS]
    stopped = any(h.ended_at is None for h in ledger.holds_for(conn, base.run_id))
    return replace(
        base,
        planned=planned,
        results=results,
        batches=int(count),
        last_batch_sessions=last,
        pace_level=paced[-1].level if paced else None,
        pace_batch_size=paced[-1].batch_size if paced else None,
        stopped=stopped,
    )


def _run_families(run: RunMetrics) -> list[Metric]:
    """The run's own series (``run`` label), beside the environment's families."""
    key = [run.env, run.run_id]
    status = _gauge("gatefill_run_status", "1 for the exported run's status now.", "env", "run", "phase", "status")
    status.add_metric([*key, run.phase, run.status], 1)
    if run.phase != ledger.APPLY_PHASE:
        looks = _gauge("gatefill_soak_looks", "Looks the exported soak has stored.", "env", "run")
        looks.add_metric(key, run.looks)
        verdict = _gauge("gatefill_soak_verdict", "1 for the soak's latest verdict.", "env", "run", "verdict")
        if run.verdict is not None:
            verdict.add_metric([*key, run.verdict], 1)
        return [status, looks, verdict]
    return [status, *_apply_families(run, key)]


def _apply_families(run: RunMetrics, key: list[str]) -> list[Metric]:
    planned = _gauge("gatefill_apply_sessions_planned", "Sessions the exported apply's plan holds.", "env", "run")
    planned.add_metric(key, run.planned)
    done = _gauge("gatefill_apply_sessions_done", "The apply's sessions with a result.", "env", "run", "result")
    for result, n in run.results:
        done.add_metric([*key, result], n)
    batches = _gauge("gatefill_apply_batches_committed", "The exported apply's committed batches.", "env", "run")
    batches.add_metric(key, run.batches)
    last = _gauge("gatefill_apply_last_batch_sessions", "Sessions in the apply's latest committed batch.", "env", "run")
    if run.last_batch_sessions is not None:
        last.add_metric(key, run.last_batch_sessions)
    level = _gauge(
        "gatefill_apply_throttle_level", "1 for the level of the pacer's latest change of pace.", "env", "run", "level"
    )
    size = _gauge("gatefill_apply_throttle_batch_size", "Batch size the pacer's latest change set.", "env", "run")
    if run.pace_level is not None and run.pace_batch_size is not None:
        level.add_metric([*key, run.pace_level], 1)
        size.add_metric(key, run.pace_batch_size)
    stopped = _gauge("gatefill_apply_throttle_stopped", "1 while a Stop holds the next batch.", "env", "run")
    stopped.add_metric(key, 1 if run.stopped else 0)
    return [planned, done, batches, last, level, size, stopped]


def _only_run(metrics: Iterable[Metric], run_id: str) -> list[Metric]:
    """The samples without a run label or with ``run_id``'s: a Pushgateway group sets ``run`` on all it holds, so
    another run's samples would collide there (each run pushes its own)."""
    kept: list[Metric] = []
    for family in metrics:
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [s for s in family.samples if s.labels.get("run", run_id) == run_id]
        kept.append(copy)
    return kept


# ====================================================================================================================
# Delivery: textfile and Pushgateway


def safe_url(url: str) -> str:
    """``url`` without its user, password, query and fragment: what a message may show of it."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:  # a port that is no number: the whole URL may be a secret mistyped
        return "***"
    if "://" not in url:
        return "***"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _check_textfile(path: Path) -> Path:
    if path.suffix != ".prom":
        raise UsageError(f"--metrics-file {path}: the file name must end in .prom (node_exporter's textfile collector)")
    if path.is_dir():
        raise UsageError(f"--metrics-file {path}: is a directory")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"--metrics-file {path}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--metrics-file {path}: directory {folder} is not writable")
    return path


def _check_pushgateway(url: str) -> str:
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:
        valid = False
    if not valid:
        raise UsageError(f"--pushgateway: not an http(s) URL with a host: {safe_url(url)}")
    return url.rstrip("/")


@dataclass(frozen=True)
class MetricsTargets:
    """Where a run's metrics go: a textfile, a Pushgateway, both or neither; the URL may hold credentials and is
    never shown whole."""

    textfile: Path | None = None
    pushgateway_url: str | None = None
    #: Seconds between two writes on the batch path (apply); the first and the last are never skipped.
    interval: float = DEFAULT_METRICS_INTERVAL
    push_timeout: float = DEFAULT_PUSH_TIMEOUT

    def __repr__(self) -> str:
        url = safe_url(self.pushgateway_url) if self.pushgateway_url else None
        return f"MetricsTargets(textfile={self.textfile!r}, pushgateway_url={url!r})"

    @classmethod
    def resolve(cls, settings: MetricsSettings, textfile: Path | None, pushgateway: str | None) -> MetricsTargets:
        """The command line's targets over gatefill.toml's ``[metrics]``; ``UsageError`` (exit 2) for a file name
        that is not ``*.prom`` in a writable directory or a URL that is not http(s), before anything runs."""
        url = pushgateway or settings.pushgateway_url
        return cls(
            textfile=_check_textfile(textfile) if textfile is not None else None,
            pushgateway_url=_check_pushgateway(url) if url else None,
            interval=settings.interval,
            push_timeout=settings.push_timeout,
        )

    @property
    def any(self) -> bool:
        return self.textfile is not None or self.pushgateway_url is not None


def write_textfile(path: Path, body: bytes) -> None:
    """Writes ``body`` to ``path`` atomically: a temporary file in the same directory, flushed, then renamed over it,
    so a reader (node_exporter) sees the old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep node_exporter (another user) out
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Once:
    """Logs each kind of failure once (a Pushgateway down for an hour is one line, not one per batch)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def warn(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self.seen:
                return
            self.seen.add(kind)
        _log.warning("%s", message)


def _label_path(name: str, value: str) -> str:
    """One grouping-key pair of a push URL; a value the path cannot carry as it is goes base64-encoded."""
    if value and re.fullmatch(r"[A-Za-z0-9_.:-]+", value):
        return f"{name}/{quote(value, safe='')}"
    return f"{name}@base64/{base64.urlsafe_b64encode(value.encode()).decode() or '='}"


class _Pusher:
    """PUTs the latest snapshot to a Pushgateway group from a thread of its own: the batch path only hands it over
    (a newer snapshot replaces one not yet sent), so a slow or dead Pushgateway never slows or fails the run."""

    def __init__(self, url: str, env: str, run_id: str, timeout: float, once: _Once) -> None:
        self.url = f"{url}/metrics/job/{PUSH_JOB}/{_label_path('env', env)}/{_label_path('run', run_id)}"
        self.shown = safe_url(url)
        self.timeout = timeout
        self.once = once
        self._latest: bytes | None = None
        self._closing = False
        #: Set when ``close`` stopped waiting: a push still in flight then ends unheard.
        self._abandoned = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="gatefill-metrics-push", daemon=True)
        self._thread.start()

    def offer(self, body: bytes) -> None:
        with self._wake:
            self._latest = body
            self._wake.notify()

    def close(self) -> None:
        """Sends the last snapshot (waiting at most about one timeout) and stops the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(self.timeout + 1.0)
        self._abandoned = self._thread.is_alive()

    def _loop(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while True:
                with self._wake:
                    while self._latest is None and not self._closing:
                        self._wake.wait()
                    body, self._latest = self._latest, None
                    closing = self._closing
                if body is not None:
                    self._push(client, body)
                if closing:
                    return

    def _push(self, client: httpx.Client, body: bytes) -> None:
        try:
            answer = client.put(self.url, content=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        except httpx.HTTPError as exc:
            if self._abandoned:
                return
            # The exception's text can hold the request's URL and its credentials: only its class is shown.
            kind = type(exc).__name__
            self.once.warn(kind, f"metrics push to {self.shown} failed ({kind}); retrying at the next batch or look")
            return
        if answer.is_success:
            return
        detail = answer.text.strip().splitlines()[0][:200] if answer.text.strip() else ""
        self.once.warn(
            f"HTTP {answer.status_code}",
            f"metrics push to {self.shown} refused: HTTP {answer.status_code} {detail}".rstrip(),
        )


class MetricsExport:
    """Exports a run's environment and its own series at each moment of the run (``moment``: after a committed
    batch, after a soak's look) and once at the end (leaving the ``with`` block), to the ``targets``."""

    def __init__(self, env: Environment, targets: MetricsTargets, clock: Clock) -> None:
        self.env = env
        self.targets = targets
        self.clock = clock
        self.run_id: str | None = None
        self._db: Database | None = None
        self._once = _Once()
        self._pusher: _Pusher | None = None
        self._last: float | None = None

    def started(self, run_id: str) -> None:
        """The run is running: its id names its series and its Pushgateway group; the first moment is now."""
        if not self.targets.any:
            return
        self.run_id = run_id
        if self._db is None:
            # A connection of its own: the run's pool stays the run's.
            self._db = Database(self.env, pool_size=1)
        if self.targets.pushgateway_url is not None and self._pusher is None:
            url, timeout = self.targets.pushgateway_url, self.targets.push_timeout
            self._pusher = _Pusher(url, self.env.name, run_id, timeout, self._once)
        self.moment(force=True)

    def moment(self, *, force: bool = False) -> None:
        """Exports now, unless the last export is less than ``targets.interval`` ago (``force``: regardless)."""
        if self.run_id is None or self._db is None:
            return
        now = self.clock.monotonic()
        if not force and self._last is not None and now - self._last < self.targets.interval:
            return
        self._last = now
        try:
            with self._db.connect() as conn:
                families = environment_metrics(conn, self.env.name)
                families += _run_families(read_run(conn, self.env.name, self.run_id))
        except (GatefillError, sa.exc.SQLAlchemyError) as exc:
            # The run goes on without this export: its own transactions meet the same database and report for it.
            self._once.warn("ledger", f"metrics not exported: the ledger did not answer ({type(exc).__name__})")
            return
        self._deliver(families, self.run_id)

    def _deliver(self, families: Sequence[Metric], run_id: str) -> None:
        if self.targets.textfile is not None:
            try:
                write_textfile(self.targets.textfile, _exposition(families))
            except OSError as exc:
                why = exc.strerror or type(exc).__name__
                self._once.warn(f"textfile {exc.errno}", f"metrics file {self.targets.textfile} not written: {why}")
        if self._pusher is not None:
            self._pusher.offer(_exposition(_only_run(families, run_id)))

    def __enter__(self) -> MetricsExport:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """The last moment (the run's final status), whether the run ended well or not."""
        try:
            self.moment(force=True)
        finally:
            if self._pusher is not None:
                self._pusher.close()
            if self._db is not None:
                self._db.dispose()
