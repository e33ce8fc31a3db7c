"""``gatefill demo``: builds embedded SQLite ``staging`` and ``production`` environments and runs the whole pipeline.

The environments hold the two PRISM scenarios of 2025-09-17/18; the census printed first is measured by the same
discovery queries the pipeline uses, not taken from what the seeder says it built. ``seed_demo`` and
``run_demo_pipeline`` take any pair of environments, so the tests run the same pipeline on Postgres.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gatefill import ledger
from gatefill.clock import Clock, OffsetClock, SimulatedClock
from gatefill.config import DEFAULT_RATE, DEFAULT_SINCE, Environment, Settings, load_settings
from gatefill.db import Database
from gatefill.pipeline import PipelineOptions, PipelineState, SoakStep, run_pipeline
from gatefill.prism.discovery import BLOCKED_CATEGORIES, CANDIDATE_CATEGORIES, discover
from gatefill.prism.job import PrismJob
from gatefill.prism.platform.server import create_app, serve_in_thread
from gatefill.prism.sandbox.seed import TEST_SESSION_A, TEST_SESSION_B, seed_scenario
from gatefill.prism.sandbox.simulator import simulate
from gatefill.prism.schema import init_schema, load_reference_data
from gatefill.prism.scoring import ENGINE_VERSION, FC_VERSION
from gatefill.progress import apply_progress
from gatefill.reports.soak import write_soak_artifacts
from gatefill.soak import SoakOptions, soak_job

__all__ = ["DEMO_CONFIG", "DEMO_SINCE", "WALKTHROUGH", "run_demo", "run_demo_pipeline", "run_full_demo", "seed_demo"]

DEMO_SINCE = datetime.fromisoformat(DEFAULT_SINCE).replace(tzinfo=UTC)
DEMO_CONFIG = """\
# The gatefill demo: embedded SQLite environments (see `gatefill init` for a fully commented example).
# The demo's pipeline runs on staging and production; walkthrough is staging as it was seeded, left untouched for
# the README's walk-through.
artifacts_dir = "artifacts"

[env.staging]
database_url = "sqlite:///staging.db"
kind = "staging"

[env.production]
database_url = "sqlite:///production.db"
kind = "production"

[env.walkthrough]
database_url = "sqlite:///walkthrough.db"
kind = "staging"
"""
#: The environment the demo seeds like staging and never touches again: the README's walk-through starts there.
WALKTHROUGH = "walkthrough"
_SCENARIOS = (("staging", "staging-2025-09-17"), ("production", "production-2025-09-18"))


def run_demo(directory: Path, console: Console) -> dict[str, Counter[str]]:
    """Builds the demo under ``directory`` and prints the census; returns the counts per environment and category.

    ``walkthrough.db`` is a byte copy of ``staging.db`` as seeded (no ledger yet), for the README's walk-through."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "gatefill.toml"
    config.write_text(DEMO_CONFIG, encoding="utf-8")
    settings = load_settings(config, environ={})
    census = seed_demo(settings, console, create=True)
    staging = Path(str(settings.env("staging").url.database))
    walkthrough = Path(str(settings.env(WALKTHROUGH).url.database))
    for suffix in ("-wal", "-shm"):
        walkthrough.with_name(walkthrough.name + suffix).unlink(missing_ok=True)
    shutil.copyfile(staging, walkthrough)  # seed_demo closed staging.db: its WAL is checkpointed into the file
    console.print(f"{WALKTHROUGH} ({walkthrough}): a copy of staging as seeded, for the README's walk-through")
    console.print(f"config: {config}")
    return census


def seed_demo(settings: Settings, console: Console, *, create: bool = False) -> dict[str, Counter[str]]:
    """Seeds the ``staging`` and ``production`` environments of ``settings`` with the two scenarios (any dialect)
    and prints what discovery finds missing where; returns the counts per environment and category."""
    census: dict[str, Counter[str]] = {}
    for env_name, scenario in _SCENARIOS:
        with Database(settings.env(env_name), create=create) as db:
            init_schema(db)
            load_reference_data(db)
            report = seed_scenario(db, scenario, replace=True)
            console.print(f"{env_name} ({db.display_url}): scenario {scenario}: {report.summary()}", markup=False)
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
    return census


#: When the demo's pipeline starts: the seeds' Phase 1 began at 2025-09-17T18:05:30Z.
PIPELINE_START = datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)


#: Simulated respondents during the six soak hours. With ``--fast`` fewer: about 550 of 600 finish, enough for the
#: conversion test against the seeded baseline (80 of 90 completed) to conclude, at half the simulation time.
SOAK_RESPONDENTS = 1200
SOAK_RESPONDENTS_FAST = 600
#: Respondents arrive over the soak's first 5½ hours; answering takes at most 25 minutes, so every call of the traffic
#: falls inside the six-hour window, and the server's cumulative metrics are exactly that window's calls (which is
#: what lets a soak of a past window use them: ``gatefill.prism.checks.app_metrics``).
SOAK_ARRIVALS = "5h30m"


def run_full_demo(
    directory: Path, console: Console, *, fast: bool = False, soak_sessions: int | None = None
) -> PipelineState:
    """Builds the demo, then runs the whole pipeline on it with approvals recorded as ``demo``.

    Apply runs at 20 sessions/minute in real time (``fast``: unthrottled, and 600 simulated respondents instead of
    1200); the soak watches six simulated hours of simulated traffic against a functions server running in this
    process; the final gate closes the pipeline.
    """
    run_demo(directory, console)
    settings = load_settings(directory / "gatefill.toml", environ={})
    state = run_demo_pipeline(settings, console, fast=fast, soak_sessions=soak_sessions)
    console.print(
        f"next: the README's walk-through, on the untouched copy of staging: cd {directory} && "
        f"gatefill plan --env {WALKTHROUGH}",
        markup=False,
    )
    return state


def run_demo_pipeline(
    settings: Settings,
    console: Console,
    *,
    fast: bool = False,
    soak_sessions: int | None = None,
    approver: str = "demo",
) -> PipelineState:
    """Runs the whole pipeline on seeded ``staging`` and ``production`` environments (SQLite or Postgres), every gate
    approved as ``approver``, the soak over six simulated hours of traffic through an in-process functions server,
    whose own metrics (5xx answers, latency histogram) the soak reads too."""
    respondents = soak_sessions or (SOAK_RESPONDENTS_FAST if fast else SOAK_RESPONDENTS)
    # A throwaway key for the in-process functions server: generated here, used by it and its callers, never shown.
    os.environ.setdefault("SUPABASE_SERVICE_ROLE_KEY", secrets.token_urlsafe(32))
    options = PipelineOptions(
        staging="staging",
        production="production",
        since=DEMO_SINCE,
        priority=(TEST_SESSION_A, TEST_SESSION_B),
        rate="unlimited" if fast else DEFAULT_RATE,
        auto_approve_as=approver,
    )
    clock = OffsetClock(PIPELINE_START)
    job = PrismJob()
    soak_step = _soak_step(console, clock, respondents, job)
    rate = "unthrottled" if fast else "at 20 sessions/min"
    console.print(f"pipeline: plan, apply {rate}, soak, production health, final gate", markup=False)
    with apply_progress(console) as progress:
        state = run_pipeline(settings, options, job=job, clock=clock, soak_step=soak_step, progress=progress)
    for line in state.log:  # one line per step; the last is the final gate's verdict
        console.print(f"  {line}", markup=False)
    console.print(f"approvals in this demo were recorded automatically as '{approver}' (see `gatefill gates`)")
    return state


def _soak_step(console: Console, clock: OffsetClock, respondents: int, job: PrismJob) -> SoakStep:
    """The demo pipeline's soak: six simulated hours of ``respondents``' traffic through an in-process functions
    server, then the soak of that window; the pipeline's ``clock`` moves past both."""

    def soak_step(db: Database, env: Environment, apply_run: str, step_clock: Clock, artifacts: Path) -> dict[str, Any]:
        app = create_app(env, db, allow_fault_injection=True)
        with serve_in_thread(app) as base_url:
            live = replace(
                env, functions_url=f"{base_url}/functions/v1", results_url=base_url, metrics_url=f"{base_url}/metrics"
            )
            with db.connect() as conn:
                finished = ledger.get_run(conn, apply_run).finished_at or step_clock.now()
            console.print(
                f"soak: six simulated hours of traffic (arrivals over {SOAK_ARRIVALS}) from {finished.isoformat()}, "
                "then 72 looks",
                markup=False,
            )
            traffic_clock = SimulatedClock(finished)
            traffic = simulate(
                db,
                f"{base_url}/functions/v1",
                sessions=respondents,
                duration=SOAK_ARRIVALS,
                clock=traffic_clock,
                seed=7,
                service_role_key=live.service_role_key(),
            )
            console.print(f"soak: {traffic.summary()}", markup=False)
            soaked = soak_job(live, job, SoakOptions(after=apply_run), clock="simulated")
            result = write_soak_artifacts(soaked, artifacts)
        # The six simulated hours have passed for the rest of the pipeline too: approvals, the production health
        # check and the final gate are dated after the soak and the traffic it watched, never before.
        with db.connect() as conn:
            soaked_until = ledger.get_run(conn, result.run_id).finished_at or result.window_end
        clock.advance_to(max(soaked_until, traffic_clock.now()))
        return result.step_record()

    return soak_step
