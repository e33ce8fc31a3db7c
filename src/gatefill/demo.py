"""``gatefill demo``: builds embedded SQLite ``staging`` and ``production`` environments, shows what is missing where.

The environments hold the two PRISM scenarios of 2025-09-17/18; the table printed at the end is measured by the same
discovery queries the pipeline uses, not taken from what the seeder says it built.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gatefill.config import load_settings
from gatefill.db import Database
from gatefill.prism.discovery import BLOCKED_CATEGORIES, CANDIDATE_CATEGORIES, discover
from gatefill.prism.schema import init_schema, load_reference_data
from gatefill.prism.scoring import ENGINE_VERSION, FC_VERSION
from gatefill.prism.seed import seed_scenario

__all__ = ["DEMO_CONFIG", "DEMO_SINCE", "run_demo"]

DEMO_SINCE = datetime(2025, 8, 1, tzinfo=UTC)
DEMO_CONFIG = """\
# The gatefill demo: two embedded SQLite environments (see `gatefill init` for a fully commented example).
artifacts_dir = "artifacts"

[env.staging]
database_url = "sqlite:///staging.db"
kind = "staging"

[env.production]
database_url = "sqlite:///production.db"
kind = "production"
"""
_SCENARIOS = (("staging", "staging-2025-09-17"), ("production", "production-2025-09-18"))


def run_demo(directory: Path, console: Console) -> dict[str, Counter[str]]:
    """Builds the demo under ``directory`` and prints the census; returns the counts per environment and category."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "gatefill.toml"
    config.write_text(DEMO_CONFIG, encoding="utf-8")
    settings = load_settings(config, environ={})
    census: dict[str, Counter[str]] = {}
    for env_name, scenario in _SCENARIOS:
        with Database(settings.env(env_name), create=True) as db:
            init_schema(db)
            load_reference_data(db)
            report = seed_scenario(db, scenario, replace=True)
            console.print(f"[bold]{env_name}[/] ({db.display_url}) seeded with scenario {scenario}")
            console.print(report.render())
            with db.connect() as conn:
                findings = discover(conn, since=DEMO_SINCE, fc_version=FC_VERSION, engine_version=ENGINE_VERSION)
                census[env_name] = Counter(f.category for f in findings)
    table = Table(title=f"What is missing where (sessions created since {DEMO_SINCE.date()}, measured by discovery)")
    table.add_column("category")
    for env_name, _ in _SCENARIOS:
        table.add_column(env_name, justify="right")
    for category in CANDIDATE_CATEGORIES:
        table.add_row(category, *(str(census[e][category]) for e, _ in _SCENARIOS))
    for category in BLOCKED_CATEGORIES:
        table.add_row(f"blocked: {category}", *(str(census[e][category]) for e, _ in _SCENARIOS))
    console.print(table)
    console.print(f"config: {config}  (try: cd {directory} && gatefill db check --env staging)")
    return census
