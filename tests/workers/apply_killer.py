"""Test worker: applies a plan and SIGKILLs itself at a chosen point, as a crash would.

Usage: python -m tests.workers.apply_killer DATABASE_URL PLAN_JSON ARTIFACTS_DIR POINT
POINT is ``before:N`` (before batch N starts), ``mid:N:K`` (inside batch N's transaction, after K sessions were
written) or ``ledger:N`` (batch N's data written, its ledger rows half inserted, not committed).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from gatefill import apply as apply_module
from gatefill import ledger
from gatefill.apply import ApplyOptions, apply_plan
from gatefill.clock import SimulatedClock
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.job import BatchOutcome, Candidate, ChangeSink
from gatefill.plan import load_plan
from gatefill.prism.job import PrismJob

LEASE_TTL = 1.0


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillingJob(PrismJob):
    """PrismJob that dies inside batch ``batch`` after ``after`` sessions have been processed."""

    def __init__(self, batch: int, after: int) -> None:
        super().__init__()
        self.batch = batch
        self.after = after
        self.seen = 0

    def process_batch(
        self,
        conn: Connection,
        candidates: Sequence[Candidate],
        *,
        now: datetime,
        run_id: str,
        record: ChangeSink | None = None,
    ) -> BatchOutcome:
        self.seen += 1
        if self.seen == self.batch:
            outcome = super().process_batch(conn, list(candidates)[: self.after], now=now, run_id=run_id, record=record)
            assert outcome.changes, "the kill point must come after real writes"
            die()
        return super().process_batch(conn, candidates, now=now, run_id=run_id, record=record)


def main(argv: list[str]) -> None:
    url, plan_path, artifacts, point = argv
    plan = load_plan(Path(plan_path))
    # A short lease: the test waits for it to expire before it resumes the run (a takeover, as after a real crash).
    env = Environment(name=plan.environment.name, kind="staging", database_url=url, lease_ttl=LEASE_TTL)
    kind, *nums = point.split(":")
    job: PrismJob = PrismJob()
    before_batch = None
    if kind == "before":
        target = int(nums[0])

        def before_batch(n: int) -> None:
            if n == target:
                die()

    elif kind == "mid":
        job = KillingJob(int(nums[0]), int(nums[1]))
    elif kind == "ledger":
        target_batch = int(nums[0])
        original = ledger.record_row_changes
        calls = {"n": 0}

        def record_then_die(conn: Connection, run_id: str, batch_no: int, changes: Any, **kw: Any) -> None:
            calls["n"] += 1
            rows = list(changes)
            if calls["n"] == target_batch:
                original(conn, run_id, batch_no, rows[: max(1, len(rows) // 2)], **kw)
                die()
            original(conn, run_id, batch_no, rows, **kw)

        apply_module.ledger.record_row_changes = record_then_die  # type: ignore[assignment]
    with Database(env) as db:
        apply_plan(
            db,
            env,
            job,
            plan,
            options=ApplyOptions(rate="unlimited"),
            clock=SimulatedClock(datetime(2025, 9, 17, 18, 5, 30, tzinfo=UTC)),
            artifacts_dir=Path(artifacts),
            before_batch=before_batch,
        )
    sys.exit(3)  # reaching the end means the kill point was never hit


if __name__ == "__main__":
    main(sys.argv[1:])
