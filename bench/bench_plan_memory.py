"""Benchmark: peak memory of opening a plan file and drawing its work, against its size (flat memory, issue 16).

    .venv/bin/python bench/bench_plan_memory.py --candidates 10000,200000

For each size it writes a synthetic plan file (``N`` runnable candidates in three categories and the priority
groups, batches of ``--batch-size``, sealed with its hash as ``gatefill plan`` seals one), then measures in fresh child
processes, each started through a small launcher so its ``ru_maxrss`` is its own:

(load)   ``load_plan``: the whole file parsed and verified, as before plans were streamed (for comparison);
(open)   ``open_plan``: the file verified by streaming (hash in canonical order, derived content), header kept;
(record) ``open_plan``, then the run recorded in a fresh SQLite ledger from the stream (``ensure_run_for_plan``),
         then every batch drawn from the ``WorkList`` at ``--batch-size``, as apply draws them.

It prints seconds and peak RSS per step and size, and whether the streamed steps stay within 1.2x from the smallest
to the largest size (the goal of issue 16). No timing here is a test: the figures are for the report.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gatefill.job import Candidate, Check
from gatefill.plan import Plan, PlanEnvironment, PlanParams, make_batches

NOW = datetime(2026, 1, 15, tzinfo=UTC)
CATEGORIES = (("profile+fc", ("fc_scores:insert", "profiles:insert")), ("fc_only", ("fc_scores:insert",)))


def synthetic_plan(n: int, batch_size: int, database: str) -> Plan:
    """A plan of ``n`` runnable candidates (and a few blocked ones), as the PRISM job would plan them."""
    candidates = []
    for i in range(n):
        category, ops = CATEGORIES[i % 2]
        created = NOW - timedelta(days=90) + timedelta(seconds=i * 7)
        candidates.append(Candidate(str(uuid.UUID(int=i + 1)), category, created, ops, {}))
    candidates += [Candidate(str(uuid.UUID(int=n + i + 1)), "blocked:no_fc_responses", NOW, (), {}) for i in range(10)]
    params = PlanParams(since=NOW - timedelta(days=365), rate="unlimited", batch_size=batch_size)
    plan = Plan(
        run_id=f"apply-bench-{uuid.uuid4().hex[:6]}",
        source="plan",
        created_at=NOW,
        environment=PlanEnvironment("bench", "staging", database),
        job="prism",
        versions={"fc_scores": "v1.2"},
        parameters=params,
        prechecks=(Check("bench", "PASS", "synthetic", {}, "none"),),
        candidates=tuple(candidates),
        batches=make_batches(candidates, (), batch_size, NOW),
    )
    return plan.sealed()


def _child(step: str, plan_path: str, ledger_path: str, batch_size: int) -> None:
    """One measured step in this (fresh) process; prints its figures as one JSON line."""
    from gatefill.apply import ensure_run_for_plan
    from gatefill.config import Environment
    from gatefill.db import Database
    from gatefill.ledger import get_run
    from gatefill.plan import load_plan, open_plan
    from gatefill.worklist import open_work

    started = time.perf_counter()
    drawn = 0
    if step == "load":
        load_plan(Path(plan_path))
    else:
        head = open_plan(Path(plan_path))
        if step == "record":
            env = Environment("bench", "staging", f"sqlite:///{ledger_path}")
            with Database(env) as db:
                ensure_run_for_plan(db, head, now=NOW)
                with db.connect() as conn:
                    run = get_run(conn, head.run_id, with_plan=False)
                todo = open_work(db, run)
                while (task := todo.take(batch_size)) is not None:
                    drawn += len(task.candidates)
    out = {
        "seconds": time.perf_counter() - started,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "drawn": drawn,
    }
    print("RESULT " + json.dumps(out), flush=True)


def measure(step: str, plan_path: Path, ledger_path: Path, batch_size: int) -> dict[str, Any]:
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    child = [sys.executable, __file__, "--child", step, str(plan_path), str(ledger_path), str(batch_size)]
    proc = subprocess.run([sys.executable, "-c", launcher, *child], capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{step} child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[2], argv[3], int(argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--candidates", default="10000,200000", help="sizes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.candidates.split(",") if x.strip()]
    figures: dict[int, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="gf_bench_plan_") as tmp:
        for n in sizes:
            ledger_path = Path(tmp) / f"ledger_{n}.db"
            sqlite3.connect(ledger_path).close()  # an empty database file: the ledger is created in it
            plan_path = Path(tmp) / f"plan_{n}.json"
            synthetic_plan(n, args.batch_size, f"sqlite:///{ledger_path}").dump(plan_path)
            size_mb = plan_path.stat().st_size / 1e6
            figures[n] = {
                step: measure(step, plan_path, ledger_path, args.batch_size) for step in ("load", "open", "record")
            }
            parts = ", ".join(f"{s} {f['seconds']:.1f} s / {f['maxrss_mb']:.0f} MB" for s, f in figures[n].items())
            print(f"N={n:,} (file {size_mb:.0f} MB): {parts}; load {os.getloadavg()[0]:.1f}", flush=True)
            if figures[n]["record"]["drawn"] != n:
                raise SystemExit(f"drew {figures[n]['record']['drawn']} candidates, the plan has {n}")
    for step in ("open", "record"):
        rss = [figures[n][step]["maxrss_mb"] for n in sizes]
        ratio = max(rss) / min(rss)
        print(f"goal {step}: peak RSS within 1.2x across sizes ({ratio:.2f}x): {'met' if ratio <= 1.2 else 'NOT met'}")
    print(f"cpus: {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}; command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
