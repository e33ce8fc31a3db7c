"""Reading a Prometheus text exposition, job-neutrally: counter and histogram series by label, and a quantile from
a histogram's cumulative buckets. The soak's app checks (``gatefill.prism.checks.app_metrics``) and apply's app
indicator (``gatefill.indicators``) both use it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Quantile", "Series", "bucket_quantile", "parse_series"]


@dataclass(frozen=True)
class Quantile:
    """A quantile located by histogram buckets: it lies in ``(low, high]`` seconds, over ``n`` calls."""

    n: int
    low: float
    high: float

    def text(self) -> str:
        high = "∞" if math.isinf(self.high) else f"{self.high * 1000:g} ms"
        return f"in ({self.low * 1000:g} ms, {high}]"


def bucket_quantile(cumulative: Sequence[tuple[float, float]], q: float) -> Quantile | None:
    """The nearest-rank ``q`` quantile's bucket from cumulative ``(le, count)`` pairs; None without calls."""
    ordered = sorted(cumulative)
    if not ordered or ordered[-1][1] <= 0:
        return None
    n = round(ordered[-1][1])
    rank = max(1, math.ceil(q * n))
    low = 0.0
    for le, count in ordered:
        if count >= rank:
            return Quantile(n, low, le)
        low = le
    return Quantile(n, low, math.inf)


#: One sample: its name and its labels (sorted ``(name, value)`` pairs).
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Series:
    """Every sample of an exposition, keyed by name and labels."""

    values: Mapping[SeriesKey, float]

    def select(self, name: str, **labels: str) -> list[tuple[Mapping[str, str], float]]:
        """The samples called ``name`` whose labels include ``labels``, with all their labels."""
        found: list[tuple[Mapping[str, str], float]] = []
        for (sample, pairs), value in self.values.items():
            as_dict = dict(pairs)
            if sample == name and all(as_dict.get(k) == v for k, v in labels.items()):
                found.append((as_dict, value))
        return found


def parse_series(text: str) -> Series:
    """The samples of a Prometheus text exposition; ``ValueError`` when it is not one."""
    values: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Series(values)
