"""Apply's health indicators: the database's (replica lag, WAL rate, autovacuum and lock waits on the written
tables, connections, and requested checkpoints when configured) and the live app's (a function's p95 and the 5xx
share, from ``metrics_url``), each look classified Normal / Hold / Stop against the thresholds of
``config.ThrottleSettings``.

Every Postgres read is one read-only transaction of plain ``SELECT``s on the statistics views: no superuser, no
session state, so it works through a transaction-mode pooler. A role without ``pg_read_all_stats`` (``pg_monitor``)
sees other sessions' columns as NULL; the indicators that need them then say N/A and why. On SQLite (no server
statistics) the Postgres indicators are N/A, never Normal.

The test seam: the relations and the function these indicators read are settings of ``[throttle]``
(``replication_source``, ``activity_source``, ``locks_source``, ``checkpoints_source``, ``wal_lsn_function``;
by default the ``pg_catalog`` ones). A test points them at tables or functions of its own with the same columns
(e.g. a table whose ``replay_lag`` it sets), so that every level of every indicator is reached on a real server
without real replicas or real load. The names are checked as (schema-qualified) identifiers when the settings are
read, so they cannot carry SQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill.clock import Clock
from gatefill.config import Environment, ThrottleSettings
from gatefill.db import Database
from gatefill.errors import DatabaseError, UsageError
from gatefill.holds import Decision, Indicator, Reading
from gatefill.prometheus import Series, bucket_quantile, parse_series

__all__ = ["AppHealth", "PostgresIndicator", "classify", "health_indicators"]


def classify(name: str, value: float, hold: float, stop: float, show: Callable[[float], str], what: str) -> Reading:
    """A reading of ``value`` against its Hold and Stop thresholds (each reached at or above it)."""
    decision = Decision.STOP if value >= stop else Decision.HOLD if value >= hold else Decision.NORMAL
    threshold = f"hold ≥ {show(hold)}, stop ≥ {show(stop)}"
    return Reading(name, decision, show(value), f"{what} {show(value)} ({decision.value})", threshold)


def _bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _seconds(n: float) -> str:
    return f"{n:.2f} s"


def _count(n: float) -> str:
    return f"{n:g}"


def _share(n: float) -> str:
    return f"{n * 100:.1f}%"


#: One look at the database: the reading, from a read-only connection.
Look = Callable[[Connection], Reading]


@dataclass
class PostgresIndicator:
    """One Postgres statistic as an indicator; ``look`` reads it (state between looks, e.g. the last WAL position,
    lives in the look's closure)."""

    name: str
    threshold: str
    look: Look
    per_batch: bool = False

    def validate(self, db: Database) -> None:
        """A configured source that does not exist (or cannot be read) is a usage error before anything is written."""
        if not db.caps.server_statistics:
            return
        try:
            with db.read_only() as conn:
                self.look(conn)
        except DatabaseError as exc:
            raise UsageError(f"indicator {self.name} cannot be read: {exc}") from exc

    def read(self, db: Database) -> Reading:
        if not db.caps.server_statistics:
            why = "not read: the database has no server statistics"
            return Reading(self.name, Decision.NOT_APPLICABLE, "n/a", why, self.threshold)
        try:
            with db.read_only() as conn:
                return self.look(conn)
        except DatabaseError as exc:
            return Reading(self.name, Decision.STOP, "error", f"{self.name} could not be read: {exc}", self.threshold)


def _na(name: str, why: str, threshold: str) -> Reading:
    return Reading(name, Decision.NOT_APPLICABLE, "n/a", why, threshold)


def _levels(hold: float, stop: float, show: Callable[[float], str]) -> str:
    return f"hold ≥ {show(hold)}, stop ≥ {show(stop)}"


def _replication(t: ThrottleSettings) -> list[PostgresIndicator]:
    """Bytes the slowest replica has not replayed, and its replay lag (none without replicas)."""
    sql = sa.text(
        f"SELECT count(*), max(pg_wal_lsn_diff({t.wal_lsn_function}(), replay_lsn)), "
        f"max(extract(epoch FROM replay_lag)) FROM {t.replication_source}"
    )

    def lag(
        conn: Connection, column: int, name: str, hold: float, stop: float, show: Callable[[float], str]
    ) -> Reading:
        count, *values = conn.execute(sql).one()
        value = values[column - 1]
        if not count:
            return _na(name, f"no replicas ({t.replication_source} is empty)", _levels(hold, stop, show))
        if value is None:
            why = f"{count} replica(s), lag not visible to this role (grant pg_monitor) or not yet measured"
            return _na(name, why, _levels(hold, stop, show))
        return classify(name, float(value), hold, stop, show, f"slowest of {count} replica(s):")

    return [
        PostgresIndicator(
            "replication_lag",
            _levels(t.replication_lag_hold_bytes, t.replication_lag_stop_bytes, _bytes),
            lambda c: lag(c, 1, "replication_lag", t.replication_lag_hold_bytes, t.replication_lag_stop_bytes, _bytes),
        ),
        PostgresIndicator(
            "replay_lag",
            _levels(t.replay_lag_hold_seconds, t.replay_lag_stop_seconds, _seconds),
            lambda c: lag(c, 2, "replay_lag", t.replay_lag_hold_seconds, t.replay_lag_stop_seconds, _seconds),
        ),
    ]


def _per_second(clock: Clock) -> Callable[[float], float | None]:
    """The growth of a cumulative value per second since the previous look; None at the first look, when no time
    has passed (the earlier look stays the start) or when the value went back (a counter reset)."""
    last: list[tuple[float, float]] = []

    def rate(value: float) -> float | None:
        now = clock.monotonic()
        before = last[0] if last else None
        if before is not None and now <= before[0]:
            return None
        last[:] = [(now, value)]
        if before is None or value < before[1]:
            return None
        return (value - before[1]) / (now - before[0])

    return rate


def _wal(t: ThrottleSettings, clock: Clock) -> PostgresIndicator:
    """WAL written per second by every writer, between looks."""
    sql = sa.text(f"SELECT pg_wal_lsn_diff({t.wal_lsn_function}(), '0/0')")
    rate = _per_second(clock)
    threshold = _levels(t.wal_hold_bytes_per_second, t.wal_stop_bytes_per_second, lambda n: _bytes(n) + "/s")

    def look(conn: Connection) -> Reading:
        per_second = rate(float(conn.execute(sql).scalar_one()))
        if per_second is None:
            return _na("wal_rate", "first look (or the WAL position went back): the rate needs two", threshold)
        show: Callable[[float], str] = lambda n: _bytes(n) + "/s"  # noqa: E731
        h, s = t.wal_hold_bytes_per_second, t.wal_stop_bytes_per_second
        return classify("wal_rate", per_second, h, s, show, "WAL written")

    return PostgresIndicator("wal_rate", threshold, look)


def _checkpoints(t: ThrottleSettings, clock: Clock) -> list[PostgresIndicator]:
    """Checkpoints requested over the last ``checkpoints_window`` seconds (from the looks within it;
    pg_stat_checkpointer from Postgres 17, pg_stat_bgwriter before). A requested checkpoint means the WAL outgrew
    ``max_wal_size``, or someone asked (``CHECKPOINT``, and ``CREATE``/``DROP DATABASE``): the count is the
    server's, whatever the cause."""
    if t.checkpoints_hold is None or t.checkpoints_stop is None:
        return []
    hold, stop = t.checkpoints_hold, t.checkpoints_stop
    looks: list[tuple[float, float]] = []
    threshold = _levels(hold, stop, _count) + f" in {t.checkpoints_window:g} s"

    def look(conn: Connection) -> Reading:
        version = int(conn.execute(sa.text("SELECT current_setting('server_version_num')::int")).scalar_one())
        if t.checkpoints_source:
            query = f"SELECT num_requested FROM {t.checkpoints_source}"
        elif version >= 170000:
            query = "SELECT num_requested FROM pg_stat_checkpointer"
        else:
            query = "SELECT checkpoints_req FROM pg_stat_bgwriter"
        total, now = float(conn.execute(sa.text(query)).scalar_one()), clock.monotonic()
        if looks and total < looks[-1][1]:
            looks.clear()  # the statistics were reset
        looks[:] = [(at, n) for at, n in looks if now - at <= t.checkpoints_window] + [(now, total)]
        if len(looks) < 2:
            return _na("checkpoints", "first look (or the counter was reset): counted from the next one", threshold)
        requested = total - looks[0][1]
        what = f"requested checkpoints in the last {now - looks[0][0]:.0f} s:"
        return replace(classify("checkpoints", requested, hold, stop, _count, what), threshold=threshold)

    return [PostgresIndicator("checkpoints", threshold, look)]


#: A vacuum by an autovacuum worker (a bare ANALYZE is short and light: it does not hold the apply).
_AUTOVACUUM = re.compile(r"autovacuum: VACUUM(?: ANALYZE)? (\S+)( \(to prevent wraparound\))?")


def _autovacuum(t: ThrottleSettings, tables: Sequence[str]) -> PostgresIndicator:
    """Autovacuum on a written table: Hold; an anti-wraparound one (it must not be held up): Stop."""
    threshold = "hold while autovacuum runs on a written table, stop while it runs to prevent wraparound"
    names = {n.lower() for n in tables}
    sql = sa.text(
        f"SELECT query FROM {t.activity_source} "
        "WHERE backend_type = 'autovacuum worker' AND datname = current_database()"
    )

    def look(conn: Connection) -> Reading:
        queries = [q or "" for (q,) in conn.execute(sql)]
        hits = [m for m in map(_AUTOVACUUM.match, queries) if m and _unqualified(m.group(1)) in names]
        hidden = sum(1 for q in queries if not q.startswith("autovacuum:"))
        if any(m.group(2) for m in hits):
            table = next(m.group(1) for m in hits if m.group(2))
            return Reading(
                "autovacuum", Decision.STOP, table, f"autovacuum to prevent wraparound on {table}", threshold
            )
        if hits:
            tables_seen = ", ".join(m.group(1) for m in hits)
            return Reading("autovacuum", Decision.HOLD, tables_seen, f"autovacuum on {tables_seen}", threshold)
        if hidden:
            why = f"{hidden} autovacuum worker(s) whose table is not visible to this role (grant pg_monitor)"
            return _na("autovacuum", why, threshold)
        return Reading("autovacuum", Decision.NORMAL, "none", "no autovacuum on the written tables", threshold)

    return PostgresIndicator("autovacuum", threshold, look)


def _unqualified(name: str) -> str:
    return name.strip('"').rsplit(".", 1)[-1].strip('"').lower()


def _lock_waits(t: ThrottleSettings, tables: Sequence[str]) -> PostgresIndicator:
    """Lock requests waiting on the written tables: the apply's batches would queue behind (or ahead of) them."""
    threshold = _levels(t.lock_waits_hold, t.lock_waits_stop, _count)
    sql = sa.text(
        f"SELECT count(*) FROM {t.locks_source} WHERE NOT granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND relation = ANY(ARRAY(SELECT to_regclass(name)::oid FROM unnest(CAST(:tables AS text[])) AS name))"
    )

    def look(conn: Connection) -> Reading:
        waiting = float(conn.execute(sql, {"tables": list(tables)}).scalar_one())
        return classify(
            "lock_waits", waiting, t.lock_waits_hold, t.lock_waits_stop, _count, "lock waits on written tables:"
        )

    return PostgresIndicator("lock_waits", threshold, look)


def _connections(t: ThrottleSettings) -> PostgresIndicator:
    """Client connections as a share of max_connections."""
    threshold = _levels(t.connections_hold, t.connections_stop, _share)
    sql = sa.text(
        f"SELECT count(*) FILTER (WHERE backend_type = 'client backend'), current_setting('max_connections')::int "
        f"FROM {t.activity_source}"
    )

    def look(conn: Connection) -> Reading:
        used, most = conn.execute(sql).one()
        share = float(used) / float(most)
        reading = classify(
            "connections", share, t.connections_hold, t.connections_stop, _share, f"{used} of {most} connections:"
        )
        return reading

    return PostgresIndicator("connections", threshold, look)


@dataclass
class AppHealth:
    """The live app, from its Prometheus metrics: ``app_function``'s p95 latency and the share of 5xx answers (all
    functions) over the calls since the window began. A window is judged once it has ``app_min_calls`` calls; then
    the next one begins, and the last judgment stands until it is judged. The worse of the two is the reading."""

    url: str
    settings: ThrottleSettings
    name: str = "app"
    per_batch: bool = False
    timeout: float = 2.0
    _base: Series | None = field(default=None, repr=False)
    _last: Reading | None = field(default=None, repr=False)
    #: Looks in a row that found the next window still filling.
    _filling: int = field(default=0, repr=False)

    @property
    def threshold(self) -> str:
        t = self.settings
        return (
            f"{t.app_function} p95 hold ≥ {t.app_p95_hold_ms:g} ms, stop ≥ {t.app_p95_stop_ms:g} ms; "
            f"5xx hold ≥ {_share(t.app_5xx_hold)}, stop ≥ {_share(t.app_5xx_stop)}; "
            f"windows of ≥ {t.app_min_calls} calls"
        )

    def _scrape(self) -> Series:
        response = httpx.get(self.url, timeout=self.timeout)
        response.raise_for_status()
        return parse_series(response.text)

    def validate(self, db: Database) -> None:
        return None  # an app that does not answer at the start is a Stop at the first look, which says why

    def read(self, db: Database) -> Reading:
        try:
            now = self._scrape()
        except (httpx.HTTPError, ValueError) as exc:
            why = f"metrics of {_display(self.url)} could not be read: {type(exc).__name__}"
            return Reading(self.name, Decision.STOP, "error", why, self.threshold)
        base = self._base
        if base is None or self._calls(now) < self._calls(base):
            self._base = now
            return _na(self.name, "first look (or the app restarted): the window begins now", self.threshold)
        calls = self._calls(now) - self._calls(base)
        if calls < self.settings.app_min_calls:
            # While the next window fills, the last judgment stands (a filling window is no evidence of Normal),
            # for a while: an app that has gone quiet has nothing left to judge, and a Stop must not outlive it.
            self._filling += 1
            filling = f"the next window has {calls:g} of {self.settings.app_min_calls} calls"
            if self._last is not None and self._filling > self.settings.app_quiet_looks:
                self._last = None
                why = f"{filling} after {self._filling - 1} looks: the app is quiet, its last judgment has lapsed"
                return _na(self.name, why, self.threshold)
            if self._last is None:
                return _na(self.name, filling, self.threshold)
            return replace(self._last, reason=f"{self._last.reason}; {filling}")
        self._base, self._filling = now, 0
        self._last = self._judge(base, now)
        return self._last

    def _calls(self, series: Series) -> float:
        name = f"{self.settings.app_requests_metric}_total"
        return sum(v for _, v in series.select(name))

    def _judge(self, base: Series, now: Series) -> Reading:
        t = self.settings
        requests = f"{t.app_requests_metric}_total"
        delta = _minus(now.select(requests), base.select(requests))
        calls = sum(delta.values())
        errors = sum(v for labels, v in delta.items() if dict(labels).get("status", "").startswith("5"))
        share = errors / calls if calls else 0.0
        buckets = _minus(now.select(f"{t.app_duration_metric}_bucket", function=t.app_function),
                         base.select(f"{t.app_duration_metric}_bucket", function=t.app_function))  # fmt: skip
        q = bucket_quantile([(float(dict(k)["le"]), v) for k, v in buckets.items()], 0.95)
        p95_ms = q.high * 1000.0 if q is not None else 0.0  # the bucket's upper edge: the p95 is at most this
        latency = classify(self.name, p95_ms, t.app_p95_hold_ms, t.app_p95_stop_ms, lambda n: f"{n:g} ms", "p95")
        errors_reading = classify(self.name, share, t.app_5xx_hold, t.app_5xx_stop, _share, "5xx")
        worse = errors_reading if errors_reading.decision.severity > latency.decision.severity else latency
        p95_text = q.text() if q is not None else f"no {t.app_function} calls"
        value = f"{t.app_function} p95 {p95_text}; 5xx {errors:g} of {calls:g} ({_share(share)})"
        return Reading(self.name, worse.decision, value, f"{value} ({worse.decision.value})", self.threshold)


Labels = tuple[tuple[str, str], ...]


def _minus(
    now: Sequence[tuple[Mapping[str, str], float]], base: Sequence[tuple[Mapping[str, str], float]]
) -> dict[Labels, float]:
    """Per label set, the growth since ``base`` (a series absent from the base counts from zero)."""
    before = {_labels(labels): v for labels, v in base}
    return {_labels(labels): v - before.get(_labels(labels), 0.0) for labels, v in now}


def _labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _display(url: str) -> str:
    try:
        return str(httpx.URL(url).copy_with(username=None, password=None, query=None, fragment=None))
    except httpx.InvalidURL:
        return "(an invalid URL)"


def health_indicators(env: Environment, tables: Sequence[str], clock: Clock) -> list[Indicator]:
    """The health indicators of an apply in ``env`` writing ``tables``: the Postgres ones (N/A on SQLite) and the
    app's when the environment has a ``metrics_url``."""
    t = env.throttle
    found: list[Indicator] = [
        *_replication(t),
        _wal(t, clock),
        *_checkpoints(t, clock),
        _autovacuum(t, tables),
        _lock_waits(t, tables),
        _connections(t),
    ]
    if env.metrics_url:
        found.append(AppHealth(env.metrics_url, t))
    return found
