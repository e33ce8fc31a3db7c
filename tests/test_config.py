"""gatefill.toml parsing, environment-variable overrides and secret handling."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatefill.config import EXAMPLE_CONFIG, ThrottleSettings, load_settings
from gatefill.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gatefill.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_parses_and_anchors_sqlite_paths_to_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, EXAMPLE_CONFIG), environ={})
    staging = settings.env("staging")
    assert staging.kind == "staging"
    assert settings.env("production").kind == "production"
    assert staging.url.database == str(tmp_path / "staging.db")
    assert settings.artifacts_dir == tmp_path / "artifacts"
    assert staging.service_role_key_env == "SUPABASE_SERVICE_ROLE_KEY"


def test_every_value_can_be_overridden_by_environment_variables(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE_CONFIG)
    environ = {
        "GATEFILL_ENV_STAGING_DATABASE_URL": "postgresql://u:pw@db.example:5432/prism",
        "GATEFILL_ENV_STAGING_KIND": "production",
        "GATEFILL_ENV_STAGING_FUNCTIONS_URL": "http://127.0.0.1:9/functions/v1",
        "GATEFILL_ENV_STAGING_SERVICE_ROLE_KEY_ENV": "MY_KEY",
    }
    env = load_settings(path, environ=environ).env("staging")
    assert env.kind == "production"
    assert env.functions_url == "http://127.0.0.1:9/functions/v1"
    assert env.service_role_key_env == "MY_KEY"
    assert env.url.drivername == "postgresql+psycopg"
    assert env.url.password == "pw"
    assert "pw" not in env.display_url and "***" in env.display_url
    assert "pw" not in repr(env)


def test_environment_declared_only_by_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={"GATEFILL_ENV_CI_DATABASE_URL": "sqlite:///ci.db"})
    assert settings.path is None
    assert settings.env("ci").url.database == str(tmp_path / "ci.db")


def test_unknown_environment_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown environment 'prod' \(known: production, staging"):
        load_settings(write(tmp_path, EXAMPLE_CONFIG), environ={}).env("prod")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[env.staging\n", "not valid TOML"),
        ('[env.staging]\nkind = "staging"\n', "database_url is missing"),
        ('[env.staging]\ndatabase_url = "sqlite:///a.db"\nkind = "prod"\n', "kind must be"),
        ('[env.staging]\ndatabase_url = "sqlite:///a.db"\ndatabse_url = "x"\n', "unknown key"),
        ('[env.staging]\ndatabase_url = "mysql://u@h/db"\n', "unsupported database"),
        ('[env.staging]\ndatabase_url = "not a url"\n', "not a database URL"),
        ("[env.staging]\ndatabase_url = 5\n", "must be a string"),
        ('env = "x"\n', "must be a table"),
        ('colour = "x"\n', "unknown top-level key"),
    ],
)
def test_malformed_config_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text), environ={})


def test_password_in_the_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[env.prod]\ndatabase_url = "postgresql://u:hunter2@h:5432/db"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert "hunter2" not in str(info.value)
    assert "GATEFILL_ENV_PROD_DATABASE_URL" in str(info.value)


def test_password_from_the_named_variable(tmp_path: Path) -> None:
    path = write(tmp_path, '[env.prod]\ndatabase_url = "postgresql://u@h:5432/db"\ndatabase_password_env = "PROD_PW"\n')
    env = load_settings(path, environ={"PROD_PW": "s3cret"}).env("prod")
    assert env.url.password == "s3cret"
    assert "s3cret" not in env.display_url
    with pytest.raises(ConfigError, match="PROD_PW"):
        load_settings(path, environ={})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="GATEFILL_CONFIG"):
        load_settings(environ={"GATEFILL_CONFIG": str(tmp_path / "nope.toml")})


def test_metrics_url_is_read_from_the_file_and_overridable(tmp_path: Path) -> None:
    """The soak finds the functions server's metrics through ``metrics_url``; like every value it can be overridden."""
    path = write(
        tmp_path,
        '[env.staging]\ndatabase_url = "sqlite:///s.db"\nmetrics_url = "http://127.0.0.1:54321/metrics"\n',
    )
    assert load_settings(path, environ={}).env("staging").metrics_url == "http://127.0.0.1:54321/metrics"
    override = {"GATEFILL_ENV_STAGING_METRICS_URL": "http://10.0.0.5:9100/metrics"}
    assert load_settings(path, environ=override).env("staging").metrics_url == "http://10.0.0.5:9100/metrics"
    assert load_settings(write(tmp_path, EXAMPLE_CONFIG), environ={}).env("staging").metrics_url is None
    assert "# metrics_url = " in EXAMPLE_CONFIG


def test_pooler_and_lease_ttl_are_read_checked_and_overridable(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[env.prod]\ndatabase_url = "postgresql://u@pooler.example:6543/postgres"\npooler = "transaction"\n'
        'lease_ttl = "90s"\n[env.plain]\ndatabase_url = "sqlite:///x.db"\n',
    )
    settings = load_settings(path, environ={})
    assert (settings.env("prod").pooler, settings.env("prod").lease_ttl) == ("transaction", 90.0)
    assert (settings.env("plain").pooler, settings.env("plain").lease_ttl) == ("none", 60.0)
    overridden = load_settings(
        path, environ={"GATEFILL_ENV_PROD_POOLER": "session", "GATEFILL_ENV_PROD_LEASE_TTL": "2m"}
    )
    assert (overridden.env("prod").pooler, overridden.env("prod").lease_ttl) == ("session", 120.0)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('pooler = "pgbouncer"', "pooler must be 'none', 'session' or 'transaction', not 'pgbouncer'"),
        ('lease_ttl = "soon"', "lease_ttl is not a duration: 'soon'"),
        ('lease_ttl = "500ms"', "lease_ttl must be at least 1s"),
    ],
)
def test_a_bad_pooler_or_lease_ttl_is_a_config_error(tmp_path: Path, lines: str, message: str) -> None:
    path = write(tmp_path, f'[env.prod]\ndatabase_url = "postgresql://u@db.example/postgres"\n{lines}\n')
    with pytest.raises(ConfigError, match=message):
        load_settings(path, environ={})


def test_a_pooler_needs_a_postgres_url(tmp_path: Path) -> None:
    path = write(tmp_path, '[env.x]\ndatabase_url = "sqlite:///x.db"\npooler = "transaction"\n')
    with pytest.raises(ConfigError, match="pooler 'transaction' needs a postgresql:// database_url"):
        load_settings(path, environ={})


def test_throttle_settings_from_the_file_with_an_environment_over_them(tmp_path: Path) -> None:
    text = (
        "[throttle]\ncool_down_seconds = 30\nreplay_lag_hold_seconds = 0.5\n"
        '[env.a]\ndatabase_url = "sqlite:///a.db"\n[env.a.throttle]\ncool_down_seconds = 5\nmax_batch_size = 40\n'
        '[env.b]\ndatabase_url = "sqlite:///b.db"\n'
    )
    settings = load_settings(write(tmp_path, text), environ={})
    a, b = settings.env("a").throttle, settings.env("b").throttle
    assert (a.cool_down_seconds, a.max_batch_size, a.replay_lag_hold_seconds) == (5.0, 40, 0.5)
    assert (b.cool_down_seconds, b.max_batch_size, b.replay_lag_hold_seconds) == (30.0, 1000, 0.5)
    assert b.wal_hold_bytes_per_second == ThrottleSettings().wal_hold_bytes_per_second
    assert load_settings(write(tmp_path, EXAMPLE_CONFIG), environ={}).env("staging").throttle == ThrottleSettings()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("[throttle]\nreplay_lag = 3", "unknown throttle key 'replay_lag'"),
        ('[throttle]\ncool_down_seconds = "1m"', "throttle.cool_down_seconds must be a number of 0 or more"),
        ("[throttle]\nmax_batch_size = 0.5", "throttle.max_batch_size must be a whole number of 1 or more"),
        ('[throttle]\nactivity_source = "pg_stat_activity; drop table x"', "must be a \\(schema-qualified\\) name"),
        ("throttle = 3", "throttle must be a table"),
    ],
)
def test_a_bad_throttle_setting_is_a_config_error(tmp_path: Path, lines: str, message: str) -> None:
    path = write(tmp_path, f'{lines}\n[env.x]\ndatabase_url = "sqlite:///x.db"\n')
    with pytest.raises(ConfigError, match=message):
        load_settings(path, environ={})
