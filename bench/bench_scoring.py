"""Benchmark: PRISM scoring throughput on one core, on realistic full sessions (248 answers, shipped key, v1.2 FC).

Three measurements, each the median of ``--runs`` timed passes over the same ``--sessions`` generated sessions
(generation is not timed):

* ``score_session``: everything a writer does per session: FC tally, latest answer per question, engine,
  calibration (Platt fallback) and the profile row.
* ``engine+calibration``: the engine on already-deduplicated answers plus ``calibrate`` (what the goal refers to).
* ``fc tally``: ``score_fc_session`` alone.

    .venv/bin/python bench/bench_scoring.py --sessions 2000 --runs 7

The process is pinned to one CPU (``--cpu``, default the first one allowed) where the OS supports it. Each run is
timed by wall clock and by the process's CPU time; the per-core figure is the CPU-time one, which other processes
sharing the CPU do not deflate. Before timing, the six goldens are checked, so a fast but wrong build cannot report
a number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gatefill.prism import scoring as S

GOAL = 2000.0
NOW = datetime(2025, 9, 17, 18, 0, tzinfo=UTC)
GOLDENS = Path(__file__).resolve().parent.parent / "tests" / "prism" / "goldens"


def make_sessions(n: int, seed: int) -> list[S.SessionInputs]:
    """``n`` sessions shaped like production rows: text answers, timestamps, uuid ids, one FC option per block."""
    rnd = random.Random(seed)
    key = S.load_scoring_key()
    fc_seed = S.load_fc_seed()
    by_block = {b["id"]: [o["id"] for o in fc_seed.options if o["block_id"] == b["id"]] for b in fc_seed.blocks}
    sessions = []
    for i in range(n):
        start = NOW - timedelta(days=rnd.randint(1, 40), seconds=rnd.randint(0, 86400))
        answers = []
        for q in range(1, 249):
            row = key.get(str(q))
            st = row.scale_type if row else "META"
            if st == "LIKERT_1_5":
                v = str(rnd.randint(1, 5))
            elif st in ("LIKERT_1_7", "STATE_1_7"):
                v = str(rnd.randint(1, 7))
            elif row is not None and row.fc_map:
                v = rnd.choice(["Structured environment with clear goals", *row.fc_map])
            else:
                v = rnd.choice(["25-34", "Other", "A,B", "[1,2,3]"])
            answers.append(
                {
                    "id": str(uuid.UUID(int=rnd.getrandbits(128))),
                    "question_id": q,
                    "answer_value": v,
                    "created_at": start + timedelta(seconds=7 * q),
                }
            )
        fc = [{"block_id": b, "option_id": rnd.choice(opts)} for b, opts in by_block.items()]
        sessions.append(S.SessionInputs(session_id=str(uuid.UUID(int=i + 1)), answers=answers, fc_responses=fc))
    return sessions


def check_goldens() -> None:
    for i in range(1, 7):
        inp = json.loads((GOLDENS / f"g{i}.input.json").read_text())
        expected = json.loads((GOLDENS / f"g{i}.output.json").read_text())
        if S.score_assessment(inp) != expected:
            raise SystemExit(f"golden g{i} does not reproduce: refusing to benchmark a wrong build")


def timed(label: str, runs: int, n: int, body: Callable[[], None]) -> tuple[float, float]:
    """Median throughput by wall clock and by this process's CPU time (the latter ignores time-slicing by others)."""
    wall, cpu = [], []
    body()  # warm-up (caches, lazy imports)
    for r in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        body()
        dw, dc = time.perf_counter() - w0, time.process_time() - c0
        wall.append(n / dw)
        cpu.append(n / dc)
        per = dc * 1e6 / n
        print(f"  {label:<20} run {r + 1}: {n / dw:7.0f}/s wall  {n / dc:7.0f}/s cpu  ({per:6.1f} µs cpu/session)")
    print(f"  {label:<20} median: {statistics.median(wall):7.0f}/s wall  {statistics.median(cpu):7.0f}/s cpu")
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the first allowed one)")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5 (the median of at least five runs is reported)")

    print("$ " + shlex.join([sys.executable, *sys.argv]))
    if hasattr(os, "sched_setaffinity"):
        cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        print(f"pinned to CPU {cpu}; Python {sys.version.split()[0]}")
    check_goldens()

    ref = S.ReferenceData.from_package()
    sessions = make_sessions(args.sessions, args.seed)
    deduped = [S._latest_rows(s.answers) for s in sessions]
    fc_scores = [S.score_fc_session(s.fc_responses, ref.fc_options).scores for s in sessions]
    conf_params = S.scoring_config_defaults()["conf_raw_params"]
    cuts = S.scoring_config_defaults()["conf_band_cuts"]
    print(f"{args.sessions} sessions × 248 answers, {args.runs} runs each")

    def full() -> None:
        for s in sessions:
            S.score_session(s, ref, NOW, None)

    def engine_and_calibration() -> None:
        for responses, fc in zip(deduped, fc_scores, strict=True):
            S.calibrate(ref.score(responses, fc), conf_params, cuts)  # type: ignore[arg-type]

    def tally() -> None:
        for s in sessions:
            S.score_fc_session(s.fc_responses, ref.fc_options)

    results = {
        "score_session": timed("score_session", args.runs, args.sessions, full),
        "engine+calibration": timed("engine+calibration", args.runs, args.sessions, engine_and_calibration),
        "fc tally": timed("fc tally", args.runs, args.sessions, tally),
    }
    print()
    for label, (wall, cpu) in results.items():
        verdict = "" if label == "fc tally" else ("; goal ≥ 2000: met" if cpu >= GOAL else "; goal ≥ 2000: MISSED")
        print(f"median {label:<20} {cpu:7.0f} sessions/s per core (CPU time), {wall:7.0f} wall{verdict}")
    load = os.getloadavg()[0]
    print(f"load average: {load:.2f} (wall figures drop when other processes share the CPU)")


if __name__ == "__main__":
    main()
