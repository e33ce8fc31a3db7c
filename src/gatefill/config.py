"""Reads ``gatefill.toml`` plus environment-variable overrides into ``Settings`` and its named ``Environment`` entries.

Lookup order for the file: ``--config PATH``, then ``$GATEFILL_CONFIG``, then ``./gatefill.toml``. Every value of
``[env.NAME]`` can be overridden by ``GATEFILL_ENV_<NAME>_<KEY>`` (NAME upper-cased, non-alphanumerics as ``_``); an
environment may even exist only as variables (``GATEFILL_ENV_CI_DATABASE_URL=...``), which suits CI. Secrets come from
environment variables only: a password written literally into the file is refused, and ``Environment`` never shows the
database URL unmasked in its ``repr`` or in ``display_url``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from gatefill.clock import parse_duration
from gatefill.errors import ConfigError

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_NOTIFY_ATTEMPTS",
    "DEFAULT_NOTIFY_BACKOFF",
    "DEFAULT_NOTIFY_TIMEOUT",
    "DEFAULT_RATE",
    "DEFAULT_SINCE",
    "DEFAULT_SOAK_DURATION",
    "DEFAULT_SOAK_INTERVAL",
    "DEFAULT_THROTTLE_INTERVAL",
    "DEFAULT_WATCH_SETS",
    "EXAMPLE_CONFIG",
    "NOTICE_KINDS",
    "NOTIFY_FLUSH_SECONDS",
    "NOTIFY_QUEUE_SIZE",
    "POOLERS",
    "THROTTLE_DEFAULTS",
    "WATCH_CHECK_GROUPS",
    "WATCH_PERIODS",
    "Environment",
    "MetricsSettings",
    "NotifySettings",
    "Pooler",
    "Settings",
    "ThrottleSettings",
    "WatchSettings",
    "load_settings",
]

EnvironmentKind = Literal["staging", "production"]

_ENV_KEYS = {
    "database_url",
    "database_password_env",
    "kind",
    "functions_url",
    "results_url",
    "metrics_url",
    "service_role_key_env",
    "pooler",
    "lease_ttl",
}
_TOP_KEYS = {"env", "artifacts_dir", "job", "throttle", "metrics", "notify", "watch"}
_DEFAULT_KEY_ENV = "SUPABASE_SERVICE_ROLE_KEY"

Pooler = Literal["none", "session", "transaction"]
POOLERS: tuple[Pooler, ...] = ("none", "session", "transaction")
#: How long a run's lease (see ``ledger``) outlives its holder's last heartbeat: the wait before a killed holder's
#: run can be taken over. Long enough to ride out a slow transaction or a short network blip.
DEFAULT_LEASE_TTL = 60.0
#: The shortest lease allowed: the holder renews it every third of its length, in a transaction of its own.
MIN_LEASE_TTL = 1.0

# Named defaults of the phases, for the CLI's options and the library's parameters alike (one fact, one place).
#: Apply's throttle: the original pipeline's 20 sessions a minute.
DEFAULT_RATE = "20/min"
#: Sessions per batch (one transaction each).
DEFAULT_BATCH_SIZE = 5
#: Seconds between looks at apply's health indicators (and at every indicator while a Stop holds the apply).
DEFAULT_THROTTLE_INTERVAL = 1.0
#: The start of the window discovery looks at (``created_at >= since``): the one every plan of 2025-09-17/18 used.
DEFAULT_SINCE = "2025-08-01"
#: The staging soak's window and the time between its looks.
DEFAULT_SOAK_DURATION = "6h"
DEFAULT_SOAK_INTERVAL = "5m"
#: apply/soak ``--metrics-file`` and ``--pushgateway``: seconds between exports on apply's batch path (the first and
#: the last always go out), and how long one push may take before it is dropped (retried at the next export).
DEFAULT_METRICS_INTERVAL = 1.0
DEFAULT_PUSH_TIMEOUT = 2.0


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]`` of gatefill.toml: where apply and soak push their metrics by default. The Pushgateway URL may
    carry credentials, so it comes from the variable ``pushgateway_url_env`` names, or from ``pushgateway_url``
    when it has no password (a password written into the file is refused); it is never shown whole."""

    pushgateway_url: str | None = field(default=None, repr=False)
    interval: float = DEFAULT_METRICS_INTERVAL
    push_timeout: float = DEFAULT_PUSH_TIMEOUT


@dataclass(frozen=True)
class ThrottleSettings:
    """Apply's adaptive throttle: each health indicator's Hold and Stop thresholds, how Hold slows the apply and how
    long a Stop lasts, and how batches are sized. Read from ``[throttle]`` (all environments) and
    ``[env.NAME.throttle]`` (one environment; its keys win); ``--target-batch-time``, ``--cool-down``,
    ``--min-batch-size`` and ``--max-batch-size`` override the matching keys for one apply.

    The anchors: gh-ost holds at 1.5 s of replica lag (``--max-lag-millis`` 1500); GitLab's batched migrations stop
    on autovacuum of their tables, on 100 MB of replication-slot lag and on a WAL-rate threshold of 70 MB, hold a
    stopped migration 10 min, and size batches to a target duration from an EMA (alpha 0.4) of past batches;
    pt-online-schema-change sizes chunks to 0.5 s and aborts at 2x the load it pauses at.
    """

    #: Replicas (``pg_stat_replication``): bytes not yet replayed, and the replay lag in seconds.
    replication_lag_hold_bytes: float = 32 * 1024 * 1024
    replication_lag_stop_bytes: float = 100 * 1000 * 1000
    replay_lag_hold_seconds: float = 1.5
    replay_lag_stop_seconds: float = 6.0
    #: WAL written per second (all writers, from ``pg_current_wal_lsn()`` between looks) against a budget.
    wal_hold_bytes_per_second: float = 35 * 1000 * 1000
    wal_stop_bytes_per_second: float = 70 * 1000 * 1000
    #: Checkpoints requested in the last ``checkpoints_window`` seconds (at the default max_wal_size of 1 GB, four a
    #: minute mean about 70 MB/s of WAL). Off unless set (e.g. 2 and 4): the counter is the server's and counts
    #: every ``CHECKPOINT`` and ``DROP DATABASE`` too, so a server shared with a test suite would hold every apply;
    #: the WAL rate measures the same pressure directly.
    checkpoints_hold: float | None = None
    checkpoints_stop: float | None = None
    checkpoints_window: float = 60.0
    #: Lock requests on the written tables waiting (``pg_locks`` not granted).
    lock_waits_hold: float = 1
    lock_waits_stop: float = 5
    #: Client connections as a share of ``max_connections``.
    connections_hold: float = 0.75
    connections_stop: float = 0.90
    #: The live app (``metrics_url``): the p95 of one function's latency, and the share of 5xx answers, over the
    #: calls since the previous look (a window is read only once it has ``app_min_calls`` calls).
    app_p95_hold_ms: float = 500.0
    app_p95_stop_ms: float = 2000.0
    app_5xx_hold: float = 0.01
    app_5xx_stop: float = 0.05
    app_min_calls: int = 20
    #: Looks in a row with a window still short of app_min_calls after which the last judgment lapses (N/A).
    app_quiet_looks: int = 10
    #: The series the app indicator reads: the functions server's (``gatefill serve functions``) names.
    app_function: str = "finalizeAssessment"
    app_requests_metric: str = "gatefill_function_requests"
    app_duration_metric: str = "gatefill_function_request_duration_seconds"
    #: After a Stop, every indicator must read Normal this long before the next batch starts.
    cool_down_seconds: float = 60.0
    #: Each consecutive Hold halves the rate and the batch size, down to this share of them; each Normal look
    #: doubles them back, step by step.
    hold_floor: float = 1 / 16
    #: Fresh looks in a row with every indicator Normal before each step back up.
    recover_after_looks: int = 3
    #: Batches sized to this duration from the measured ones (0: keep the plan's or --batch-size).
    target_batch_time: float = 1.0
    min_batch_size: int = 1
    max_batch_size: int = 1000
    #: Where the Postgres indicators read (the test seam: a test points these at views or functions of its own).
    replication_source: str = "pg_stat_replication"
    activity_source: str = "pg_stat_activity"
    locks_source: str = "pg_locks"
    wal_lsn_function: str = "pg_current_wal_lsn"
    #: A relation with ``num_requested`` instead of the server's view (empty: pg_stat_checkpointer or
    #: pg_stat_bgwriter, by version).
    checkpoints_source: str = ""


THROTTLE_DEFAULTS = ThrottleSettings()
_SOURCE_KEYS = {"replication_source", "activity_source", "locks_source", "checkpoints_source", "wal_lsn_function"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


def _throttle_settings(where: str, *tables: object) -> ThrottleSettings:
    """The defaults overridden by each table in turn (later ones win); a ``ConfigError`` for an unknown key or a
    value of the wrong kind."""
    fields = {f.name: f.type for f in THROTTLE_DEFAULTS.__dataclass_fields__.values()}
    values: dict[str, Any] = {}
    for table in tables:
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: throttle must be a table")
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(f"{where}: unknown throttle key {key!r}")
            values[key] = _throttle_value(where, key, value, str(fields[key]))
    return ThrottleSettings(**values)


def _throttle_value(where: str, key: str, value: object, kind: str) -> object:
    if kind.endswith("| None"):
        kind = kind.removesuffix(" | None")
    if kind == "str":
        if not isinstance(value, str) or (key in _SOURCE_KEYS and value and not _IDENTIFIER.fullmatch(value)):
            raise ConfigError(f"{where}: throttle.{key} must be a (schema-qualified) name, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: throttle.{key} must be a number of 0 or more, not {value!r}")
    if kind == "int":
        if int(value) != value or value < 1:
            raise ConfigError(f"{where}: throttle.{key} must be a whole number of 1 or more, not {value!r}")
        return int(value)
    return float(value)


# ====================================================================================================================
# [notify] and [watch]

#: What a notice can be about; ``[notify] events`` picks among them (default: all).
NOTICE_KINDS: tuple[str, ...] = ("gate_waiting", "soak_verdict", "run_failed", "run_paused", "watch_verdict")
#: Seconds one webhook delivery may take, attempts per notice, and the first pause between attempts (doubled after
#: each failure): a chat service that hiccups gets three tries over a few seconds.
DEFAULT_NOTIFY_TIMEOUT = 5.0
DEFAULT_NOTIFY_ATTEMPTS = 3
DEFAULT_NOTIFY_BACKOFF = 1.0
#: Notices waiting for delivery at most (a flood beyond it is dropped, with a log line, never waited for).
NOTIFY_QUEUE_SIZE = 100
#: At the end of a command, how long it waits for undelivered notices before it exits anyway.
NOTIFY_FLUSH_SECONDS = 2.0
_NOTIFY_KEYS = {"webhook_url_env", "console_url", "events", "timeout", "attempts", "backoff"}


@dataclass(frozen=True)
class NotifySettings:
    """``[notify]``: the variable holding the webhook URL (a secret: never in the file), the console's address for
    links, the notice kinds to send, and how delivery is retried."""

    webhook_url_env: str
    console_url: str | None = None
    events: tuple[str, ...] = NOTICE_KINDS
    timeout: float = DEFAULT_NOTIFY_TIMEOUT
    attempts: int = DEFAULT_NOTIFY_ATTEMPTS
    backoff: float = DEFAULT_NOTIFY_BACKOFF

    def webhook_url(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The webhook URL from its variable, or None when the variable is unset or empty."""
        value = (os.environ if environ is None else environ).get(self.webhook_url_env, "").strip()
        return value or None


def _notify_settings(where: str, table: object) -> NotifySettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [notify] must be a table")
    unknown = set(table) - _NOTIFY_KEYS
    if unknown:
        raise ConfigError(f"{where}: [notify] unknown key(s) {', '.join(sorted(unknown))}")
    env_var = table.get("webhook_url_env")
    if not isinstance(env_var, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env_var):
        raise ConfigError(f"{where}: [notify] webhook_url_env must name an environment variable (the URL is a secret)")
    console_url = table.get("console_url")
    if console_url is not None and (not isinstance(console_url, str) or not re.match(r"https?://", console_url)):
        raise ConfigError(f"{where}: [notify] console_url must be an http(s):// address")
    events = table.get("events", list(NOTICE_KINDS))
    if not isinstance(events, list) or not all(isinstance(e, str) and e in NOTICE_KINDS for e in events):
        raise ConfigError(f"{where}: [notify] events must be a list of {', '.join(NOTICE_KINDS)}")
    numbers: dict[str, Any] = {}
    for key, low in (("timeout", 0.001), ("attempts", 1), ("backoff", 0)):
        value = table.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
            raise ConfigError(f"{where}: [notify] {key} must be a number of at least {low:g}, not {value!r}")
        numbers[key] = int(value) if key == "attempts" else float(value)
    return NotifySettings(
        webhook_url_env=env_var,
        console_url=console_url.rstrip("/") if console_url else None,
        events=tuple(events),
        **numbers,
    )


#: Each check set of ``gatefill watch`` and the period it covers and recurs at (the latest period of new data).
WATCH_PERIODS: Mapping[str, float] = {"daily": 86400.0, "weekly": 7 * 86400.0, "monthly": 30 * 86400.0}
#: Names a set may hold besides a check's own name: every health check, every soak check of the job.
WATCH_CHECK_GROUPS = ("health", "soak")
#: The seed's ongoing monitoring: daily the health checks (completion: profiles and FC rows of the day's completed
#: sessions), weekly the soak's checks of new data (versions stamped, conversion), monthly the health checks over the
#: month (data quality). Job-neutral: groups, resolved by the job's own check names.
DEFAULT_WATCH_SETS: Mapping[str, tuple[str, ...]] = {"daily": ("health",), "weekly": ("soak",), "monthly": ("health",)}


@dataclass(frozen=True)
class WatchSettings:
    """``gatefill watch``'s check sets: (set name, the check names or groups it runs), in period order (daily,
    weekly, monthly); a set with no names is off. Pairs, not a dict, so an ``Environment`` stays hashable."""

    sets: tuple[tuple[str, tuple[str, ...]], ...] = tuple(DEFAULT_WATCH_SETS.items())

    def checks(self, set_name: str) -> tuple[str, ...]:
        """The names set ``set_name`` runs (empty for an unknown or switched-off set)."""
        return dict(self.sets).get(set_name, ())


WATCH_DEFAULTS = WatchSettings()


def _watch_settings(where: str, *tables: object) -> WatchSettings:
    """The default sets overridden, set by set, by each table in turn (``[watch]``, then ``[env.NAME.watch]``)."""
    sets = dict(DEFAULT_WATCH_SETS)
    for table in tables:
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: watch must be a table")
        for key, value in table.items():
            if key not in WATCH_PERIODS:
                raise ConfigError(f"{where}: unknown watch set {key!r} (use {', '.join(WATCH_PERIODS)})")
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise ConfigError(f"{where}: watch.{key} must be a list of check names")
            sets[key] = tuple(dict.fromkeys(v.strip() for v in value))
    return WatchSettings(tuple((name, sets[name]) for name in WATCH_PERIODS))


EXAMPLE_CONFIG = """\
# gatefill.toml: the environments gatefill may touch.
# Every value can be overridden by an environment variable GATEFILL_ENV_<NAME>_<KEY>,
# e.g. GATEFILL_ENV_PRODUCTION_DATABASE_URL. Secrets never go in this file: passwords and
# service-role keys are read from the environment variables named below.

# Where run artifacts (plans, logs, reports) are written, relative to this file.
artifacts_dir = "artifacts"

[env.staging]
# SQLite paths are relative to this file; Postgres: postgresql://user@host:5432/dbname
database_url = "sqlite:///staging.db"
kind = "staging"                      # "staging" or "production": production applies need passed gates
# pooler = "none"      # what sits between gatefill and Postgres: "none" (a direct connection), "session" (a
#                      # session-mode pooler, e.g. Supavisor on port 5432) or "transaction" (a transaction-mode
#                      # pooler: Supavisor on port 6543, PgBouncer pool_mode=transaction). With "transaction" gatefill
#                      # uses no prepared statements and no session state; `gatefill db check` tells which you have.
# lease_ttl = "60s"    # a run's lease outlives its holder's last heartbeat by this much (a killed apply's run
#                      # can be taken over after it)
# functions_url = "http://127.0.0.1:54321/functions/v1"   # the PRISM edge functions (gatefill serve functions)
# results_url = "http://127.0.0.1:54321"                  # where /results/<session_id>?t=TOKEN is served
# metrics_url = "http://127.0.0.1:54321/metrics"          # the app's Prometheus metrics: the soak counts 5xx answers
# service_role_key_env = "SUPABASE_SERVICE_ROLE_KEY"      # name of the variable holding the service-role key

# [env.staging.throttle]  # this environment's thresholds, over the [throttle] table below
# wal_hold_bytes_per_second = 20000000

[env.production]
database_url = "sqlite:///production.db"
kind = "production"
# database_password_env = "PROD_DB_PASSWORD"   # the password is read from this variable, never from this file

# [throttle]   # apply's adaptive throttle, for every environment (each key's default in config.ThrottleSettings)
# replay_lag_hold_seconds = 1.5        # replicas: Hold (halve rate and batch size) at this replay lag ...
# replay_lag_stop_seconds = 6.0        # ... and Stop (no batch starts) at this one
# wal_hold_bytes_per_second = 35000000 # the WAL budget: Hold above it, Stop above wal_stop_bytes_per_second
# app_p95_hold_ms = 500                # the app's finalize p95 (needs metrics_url), Hold and Stop
# app_p95_stop_ms = 2000
# cool_down_seconds = 60               # after a Stop, every indicator Normal this long before the next batch
# target_batch_time = 1.0              # seconds per batch, sized from the measured ones

# [metrics]    # where `gatefill apply` and `gatefill soak` push their metrics (--pushgateway URL wins)
# pushgateway_url_env = "GATEFILL_PUSHGATEWAY_URL"   # the variable holding the URL (it may carry credentials)
# [notify]     # Slack-compatible webhook notices: gates waiting, soak verdicts changed, runs failed or paused
# webhook_url_env = "GATEFILL_WEBHOOK_URL"   # the variable holding the webhook URL (a secret: never in this file)
# console_url = "http://127.0.0.1:8765"      # `gatefill ui`'s address, for links to the pages
# events = ["gate_waiting", "soak_verdict", "run_failed", "run_paused", "watch_verdict"]

# [watch]      # `gatefill watch`: check sets by period (a check's name, or "health" / "soak" for all of them)
# daily = ["health"]       # over the last 24 h of new data
# weekly = ["soak"]        # over the last 7 days
# monthly = ["health"]     # over the last 30 days
"""


def _env_prefix(name: str) -> str:
    return "GATEFILL_ENV_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "_"


@dataclass(frozen=True)
class Environment:
    """One named target database with its optional PRISM endpoints; the URL may hold a secret and is never shown raw."""

    name: str
    kind: EnvironmentKind
    database_url: str = field(repr=False)
    functions_url: str | None = None
    results_url: str | None = None
    #: The functions server's Prometheus metrics (``GET /metrics``): the soak reads its 5xx answers and latencies.
    metrics_url: str | None = None
    service_role_key_env: str = _DEFAULT_KEY_ENV
    #: What sits between gatefill and the database; "transaction" rules out session state (see ``db``).
    pooler: Pooler = "none"
    #: Seconds a run's lease outlives its holder's last heartbeat.
    lease_ttl: float = DEFAULT_LEASE_TTL
    #: Apply's adaptive throttle (``[throttle]`` with ``[env.NAME.throttle]`` over it).
    throttle: ThrottleSettings = THROTTLE_DEFAULTS
    #: ``gatefill watch``'s check sets (``[watch]`` with ``[env.NAME.watch]`` over it).
    watch: WatchSettings = WATCH_DEFAULTS

    @property
    def url(self) -> URL:
        """The SQLAlchemy URL (with the password, for the driver only)."""
        return make_url(self.database_url)

    @property
    def display_url(self) -> str:
        """The database URL with any password replaced by ``***``, safe for messages, logs and reports."""
        return self.url.render_as_string(hide_password=True)

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    def service_role_key(self) -> str | None:
        """The service-role key from the environment variable named in the config, or None when it is unset."""
        value = os.environ.get(self.service_role_key_env)
        return value or None

    def __repr__(self) -> str:
        return f"Environment(name={self.name!r}, kind={self.kind!r}, database_url={self.display_url!r})"


@dataclass(frozen=True)
class Settings:
    """The parsed configuration: where it came from, where artifacts go, and the named environments."""

    path: Path | None
    root: Path
    artifacts_dir: Path
    environments: Mapping[str, Environment]
    #: The ``[job.NAME]`` tables as written; ``gatefill.jobs`` validates each by its ``kind`` when it is used.
    jobs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: ``[metrics]``: apply's and soak's Pushgateway by default.
    metrics: MetricsSettings = MetricsSettings()
    #: ``[notify]``: where notices go (None: no notifications).
    notify: NotifySettings | None = None

    def env(self, name: str) -> Environment:
        """The environment called ``name``; an unknown name is a ``ConfigError`` listing the known ones."""
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(sorted(self.environments)) or "none"
            where = str(self.path) if self.path else "no gatefill.toml found"
            raise ConfigError(f"unknown environment '{name}' (known: {known}; config: {where})") from None


def _find_config(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file not found: {explicit}")
        return explicit
    from_env = environ.get("GATEFILL_CONFIG")
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (from GATEFILL_CONFIG)")
        return path
    default = Path.cwd() / "gatefill.toml"
    return default if default.is_file() else None


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc


def _resolve_database_url(
    raw: str, env_name: str, root: Path, password_env: str | None, from_file: bool, environ: Mapping[str, str]
) -> str:
    """Validates the URL, refuses literal passwords in the file, injects the password variable, anchors SQLite paths."""
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError(f"environment '{env_name}': database_url is not a database URL") from None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"environment '{env_name}': unsupported database '{backend}' (use sqlite:/// or postgresql://)"
        )
    if from_file and url.password:
        raise ConfigError(
            f"environment '{env_name}': gatefill.toml must not contain a password; set "
            f"{_env_prefix(env_name)}DATABASE_URL or database_password_env instead"
        )
    if password_env:
        password = environ.get(password_env)
        if not password:
            raise ConfigError(f"environment '{env_name}': variable {password_env} (database_password_env) is not set")
        url = url.set(password=password)
    if backend == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    elif url.database and url.database != ":memory:" and not Path(url.database).is_absolute():
        url = url.set(database=str((root / url.database).resolve()))
    return url.render_as_string(hide_password=False)


def _build_environment(
    name: str,
    table: Mapping[str, object],
    root: Path,
    environ: Mapping[str, str],
    throttle: object = None,
    watch: object = None,
) -> Environment:
    throttle_settings = _throttle_settings(f"environment '{name}'", throttle, table.get("throttle"))
    watch_settings = _watch_settings(f"environment '{name}'", watch, table.get("watch"))
    table = {k: v for k, v in table.items() if k not in ("throttle", "watch")}
    unknown = set(table) - _ENV_KEYS
    if unknown:
        raise ConfigError(f"environment '{name}': unknown key(s) {', '.join(sorted(unknown))}")
    values: dict[str, str] = {}
    for key, value in table.items():
        if not isinstance(value, str):
            raise ConfigError(f"environment '{name}': {key} must be a string")
        values[key] = value
    overridden: set[str] = set()
    prefix = _env_prefix(name)
    for key in _ENV_KEYS:
        override = environ.get(prefix + key.upper())
        if override:
            values[key] = override
            overridden.add(key)
    if "database_url" not in values:
        raise ConfigError(f"environment '{name}': database_url is missing (or set {prefix}DATABASE_URL)")
    kind = values.get("kind", "staging")
    if kind not in ("staging", "production"):
        raise ConfigError(f"environment '{name}': kind must be 'staging' or 'production', not '{kind}'")
    pooler = _pooler(name, values.get("pooler", "none"))
    if pooler != "none" and values["database_url"].startswith("sqlite"):
        raise ConfigError(f"environment '{name}': pooler '{pooler}' needs a postgresql:// database_url")
    lease_ttl = _lease_ttl(name, values.get("lease_ttl"))
    database_url = _resolve_database_url(
        values["database_url"],
        name,
        root,
        values.get("database_password_env"),
        from_file="database_url" not in overridden,
        environ=environ,
    )
    return Environment(
        name=name,
        kind="production" if kind == "production" else "staging",
        database_url=database_url,
        functions_url=values.get("functions_url"),
        results_url=values.get("results_url"),
        metrics_url=values.get("metrics_url"),
        service_role_key_env=values.get("service_role_key_env", _DEFAULT_KEY_ENV),
        pooler=pooler,
        lease_ttl=lease_ttl,
        throttle=throttle_settings,
        watch=watch_settings,
    )


def _pooler(env_name: str, text: str) -> Pooler:
    for pooler in POOLERS:
        if text == pooler:
            return pooler
    raise ConfigError(f"environment '{env_name}': pooler must be 'none', 'session' or 'transaction', not '{text}'")


def _lease_ttl(env_name: str, text: str | None) -> float:
    if text is None:
        return DEFAULT_LEASE_TTL
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise ConfigError(f"environment '{env_name}': lease_ttl is not a duration: {text!r} (e.g. 60s)") from None
    if seconds < MIN_LEASE_TTL:
        raise ConfigError(f"environment '{env_name}': lease_ttl must be at least {MIN_LEASE_TTL:g}s, not {text!r}")
    return seconds


def _metrics_settings(where: str, table: object, environ: Mapping[str, str]) -> MetricsSettings:
    """``[metrics]``: ``pushgateway_url_env`` (the variable holding the URL, which wins when set) or
    ``pushgateway_url`` (refused with a password in it: secrets come from variables only)."""
    if table is None:
        return MetricsSettings()
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [metrics] must be a table")
    unknown = set(table) - {"pushgateway_url", "pushgateway_url_env"}
    if unknown:
        raise ConfigError(f"{where}: unknown [metrics] key(s) {', '.join(sorted(unknown))}")
    literal, variable = table.get("pushgateway_url"), table.get("pushgateway_url_env")
    for key, value in (("pushgateway_url", literal), ("pushgateway_url_env", variable)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}: metrics.{key} must be a non-empty string")
    if isinstance(literal, str) and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]*:[^/@]*@", literal, re.IGNORECASE):
        raise ConfigError(
            f"{where}: metrics.pushgateway_url holds a password; put the URL in a variable named by pushgateway_url_env"
        )
    url = environ.get(variable) if isinstance(variable, str) else None
    return MetricsSettings(pushgateway_url=url or literal)


def _names_from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Environments declared only through ``GATEFILL_ENV_<NAME>_DATABASE_URL`` (upper-case name → lower-case name)."""
    found: dict[str, str] = {}
    for key in environ:
        match = re.fullmatch(r"GATEFILL_ENV_([A-Z0-9_]+)_DATABASE_URL", key)
        if match:
            found[match.group(1)] = match.group(1).lower()
    return found


def load_settings(config_path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Reads the configuration (file and environment variables) and validates every environment in it."""
    environ = os.environ if environ is None else environ
    path = _find_config(config_path, environ)
    data: dict[str, object] = _read_toml(path) if path else {}
    root = path.parent.resolve() if path else Path.cwd()
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    env_tables = data.get("env", {})
    if not isinstance(env_tables, dict):
        raise ConfigError(f"{path}: [env] must be a table of [env.NAME] sections")
    environments: dict[str, Environment] = {}
    for name, table in env_tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: env.{name} must be a table")
        environments[name] = _build_environment(name, table, root, environ, data.get("throttle"), data.get("watch"))
    declared = {re.sub(r"[^A-Za-z0-9]", "_", n).upper() for n in environments}
    for upper, lower in _names_from_environ(environ).items():
        if upper not in declared:
            environments[lower] = _build_environment(lower, {}, root, environ, data.get("throttle"), data.get("watch"))
    artifacts = data.get("artifacts_dir", "artifacts")
    if not isinstance(artifacts, str):
        raise ConfigError(f"{path}: artifacts_dir must be a string")
    artifacts_override = environ.get("GATEFILL_ARTIFACTS_DIR")
    artifacts_dir = Path(artifacts_override or artifacts)
    if not artifacts_dir.is_absolute():
        artifacts_dir = (root / artifacts_dir) if not artifacts_override else (Path.cwd() / artifacts_dir)
    job_tables = data.get("job", {})
    if not isinstance(job_tables, dict) or not all(isinstance(t, dict) for t in job_tables.values()):
        raise ConfigError(f"{path}: [job] must be a table of [job.NAME] sections")
    metrics = _metrics_settings(str(path), data.get("metrics"), environ)
    notify = _notify_settings(f"{path}", data["notify"]) if "notify" in data else None
    return Settings(
        path=path,
        root=root,
        artifacts_dir=artifacts_dir,
        environments=environments,
        jobs=job_tables,
        metrics=metrics,
        notify=notify,
    )
