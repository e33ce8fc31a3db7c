"""The console's ``GET /metrics``: the watched ledgers as Prometheus metrics, read at each scrape (nothing is kept in
the process, so a restart loses nothing and two consoles agree).

Runs by status, sessions by result, committed batches' durations (a histogram), the measured rate of running applies,
whether an apply is held now, and each soak check's verdict at the soak's latest look.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gatefill import ledger
from gatefill.config import Settings
from gatefill.console.reads import BatchRow, batch_row, measured_rate
from gatefill.db import Database
from gatefill.errors import DatabaseUnreachable, GatefillError

__all__ = ["BATCH_BUCKETS", "metrics_text"]

#: Upper bounds (seconds) of the batch duration histogram: a batch is a transaction of a few sessions.
BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Soak runs per environment whose latest look is exported.
SOAK_RUNS = 20


def _gauge(name: str, documentation: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


@dataclass
class _Families:
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
                durations.extend(_collect_env(self.settings, name, families))
                families.reachable.add_metric([name], 1)
            except (DatabaseUnreachable, GatefillError):
                families.reachable.add_metric([name], 0)
        yield from families.all()
        yield _histogram(durations)


def _histogram(durations: Sequence[float]) -> HistogramMetricFamily:
    buckets = [(str(bound), sum(1 for d in durations if d <= bound)) for bound in BATCH_BUCKETS]
    buckets.append(("+Inf", len(durations)))
    return HistogramMetricFamily(
        "gatefill_batch_duration_seconds",
        "Committed batches' durations (start to commit), every watched ledger.",
        buckets=buckets,
        sum_value=sum(durations),
    )


def _collect_env(settings: Settings, name: str, families: _Families) -> list[float]:
    """Adds one environment's samples; returns its batch durations."""
    with Database(settings.env(name)) as db, db.connect() as conn:
        if not sa.inspect(conn).has_table(ledger.runs.name):
            return []
        r, s, b = ledger.runs, ledger.session_results, ledger.batches
        by_status = sa.select(r.c.phase, r.c.status, sa.func.count()).group_by(r.c.phase, r.c.status)
        for phase, status, count in conn.execute(by_status).all():
            families.runs.add_metric([name, phase, status], count)
        for result, count in conn.execute(sa.select(s.c.result, sa.func.count()).group_by(s.c.result)).all():
            families.sessions.add_metric([name, result], count)
        by_run: dict[str, list[BatchRow]] = {}
        for x in conn.execute(sa.select(b).order_by(b.c.run_id, b.c.batch_no)):
            by_run.setdefault(x.run_id, []).append(batch_row(x))
        for run in ledger.list_runs(conn, phase=ledger.APPLY_PHASE, limit=200):
            if run.status is not ledger.RunStatus.RUNNING:
                continue
            families.rate.add_metric([name, run.id], measured_rate(by_run.get(run.id, [])) or 0.0)
            holding = any(h.ended_at is None for h in ledger.holds_for(conn, run.id))
            families.held.add_metric([name, run.id], 1 if holding else 0)
        for run in ledger.list_runs(conn, phase="soak", limit=SOAK_RUNS):
            looks = ledger.measurements_for(conn, run.id)
            for check in looks[-1].checks if looks else []:
                families.checks.add_metric([name, run.id, check.name, check.verdict], 1)
    return [batch.seconds for batches in by_run.values() for batch in batches]


def metrics_text(settings: Settings, envs: Sequence[str]) -> bytes:
    """The Prometheus text exposition of the watched ledgers, now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LedgerCollector(settings, envs))
    return generate_latest(registry)
