"""The console's ``GET /metrics``: the watched ledgers as Prometheus metrics, read at each scrape (nothing is kept in
the process, so a restart loses nothing and two consoles agree).

The families are built by ``gatefill.metrics``, which ``apply --metrics-file`` and ``soak --pushgateway`` export as
well: runs by status, sessions by result, committed batches' durations (a histogram), the measured rate of running
applies, whether an apply is held now, and each soak check's verdict at the soak's latest look.
"""

from __future__ import annotations

from gatefill.metrics import BATCH_BUCKETS, metrics_text

__all__ = ["BATCH_BUCKETS", "metrics_text"]
