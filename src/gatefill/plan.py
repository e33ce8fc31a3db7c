"""Phase 1a, plan: discover, classify, batch in priority order, count the expected changes, and write an immutable,
content-hashed plan (``backfill_plan.json`` + ``backfill_plan.md``) under a new run id in the ledger.

The expected changes are counted from each candidate's ``operations``, the same tuple apply executes, so plan and
apply cannot disagree about what a candidate means. Batches follow the priority order of the seeds: the named
priority sessions, then those of the most recent 30 days, then older ones (each group oldest first).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.config import DEFAULT_BATCH_SIZE, DEFAULT_RATE, Environment
from gatefill.db import Database, canonical_json, format_utc
from gatefill.errors import DataError, GateBlocked, UsageError
from gatefill.job import Candidate, Check, Job
from gatefill.reports import render, write_json, write_text
from gatefill.throttle import parse_rate

__all__ = [
    "PLAN_FORMAT",
    "Plan",
    "PlanParams",
    "build_plan",
    "compose_plan",
    "load_plan_file",
    "plan_hash",
    "verify_plan",
    "write_plan_files",
]

PLAN_FORMAT = "gatefill-plan/1"
RECENT_DAYS = 30


@dataclass(frozen=True)
class PlanParams:
    """What the user asked the plan for."""

    since: datetime
    priority: tuple[str, ...] = ()
    rate: str = DEFAULT_RATE
    batch_size: int = DEFAULT_BATCH_SIZE
    profiles: str = "missing"  # missing | stale

    def validate(self, job: Job | None = None) -> None:
        """``UsageError`` (exit 2) for a parameter that cannot be used, before anything is written; with ``job``,
        every priority key must be one the job can have (``job.parse_key``)."""
        parse_rate(self.rate)
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.profiles not in ("missing", "stale"):
            raise UsageError("--profiles must be 'missing' or 'stale'")
        if job is None:
            return
        for key in self.priority:
            try:
                job.parse_key(key)
            except UsageError as exc:
                raise UsageError(f"--priority: {exc}") from None

    def normalized(self, job: Job) -> PlanParams:
        """These parameters validated, with the priority keys in the job's form (e.g. a lower-case UUID)."""
        self.validate(job)
        return replace(self, priority=tuple(job.parse_key(k) for k in self.priority))

    def to_json(self) -> dict[str, Any]:
        return {
            "since": format_utc(self.since),
            "priority": list(self.priority),
            "rate": self.rate,
            "batch_size": self.batch_size,
            "profiles": self.profiles,
        }


@dataclass(frozen=True)
class Plan:
    """An immutable plan: its JSON body (hash included) and where it was written."""

    body: Mapping[str, Any]
    json_path: Path | None
    md_path: Path | None

    @property
    def run_id(self) -> str:
        return str(self.body["run_id"])

    @property
    def hash(self) -> str:
        return str(self.body["hash"])

    @property
    def environment(self) -> str:
        return str(self.body["environment"]["name"])

    def batches(self) -> list[dict[str, Any]]:
        return list(self.body["batches"])

    def candidates(self) -> dict[str, dict[str, Any]]:
        return {c["key"]: c for c in self.body["candidates"]}


def plan_hash(body: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the plan without its ``hash`` field.

    The digest is fed piece by piece (top-level keys in sorted order, list items one at a time), which yields exactly
    ``sha256(canonical_json(content))`` without ever building that text: for 100k candidates it would be a 50 MB
    string plus a normalised copy of the whole plan, held at once."""
    digest = hashlib.sha256(b"{")
    for i, key in enumerate(sorted(k for k in body if k != "hash")):
        digest.update(("," if i else "").encode() + canonical_json(key).encode("utf-8") + b":")
        value = body[key]
        if isinstance(value, list | tuple):
            digest.update(b"[")
            for j, item in enumerate(value):
                digest.update((b"," if j else b"") + canonical_json(item).encode("utf-8"))
            digest.update(b"]")
        else:
            digest.update(canonical_json(value).encode("utf-8"))
    digest.update(b"}")
    return digest.hexdigest()


def verify_plan(body: Mapping[str, Any], env: Environment) -> None:
    """Refuses a plan whose hash does not match its content, of another format, or made for another environment."""
    if body.get("format") != PLAN_FORMAT:
        raise UsageError(f"not a gatefill plan (format {body.get('format')!r}, expected {PLAN_FORMAT})")
    if body.get("hash") != plan_hash(body):
        raise UsageError("plan hash does not match its content: the plan was modified after it was made")
    planned_for = body.get("environment", {}).get("name")
    if planned_for != env.name:
        raise UsageError(f"plan was made for environment '{planned_for}', not '{env.name}'")
    if body.get("environment", {}).get("database") != env.display_url:
        raise UsageError(f"plan was made for database {body['environment'].get('database')}, not {env.display_url}")


def load_plan_file(path: Path) -> dict[str, Any]:
    """Reads a plan JSON file (``UsageError`` if missing or not JSON)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"plan file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read plan {path}: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError(f"{path} is not a gatefill plan")
    return body


def _group(candidate: Candidate, priority: set[str], recent_from: datetime) -> str:
    if candidate.key in priority:
        return "priority"
    if candidate.created_at >= recent_from:
        return f"recent_{RECENT_DAYS}d"
    return "older"


def make_batches(
    candidates: Sequence[Candidate], priority: Sequence[str], batch_size: int, now: datetime
) -> list[dict[str, Any]]:
    """Splits the runnable candidates into batches: priority sessions, then the last 30 days, then older ones."""
    wanted = set(priority)
    recent_from = now - timedelta(days=RECENT_DAYS)
    order = {"priority": 0, f"recent_{RECENT_DAYS}d": 1, "older": 2}
    runnable = [c for c in candidates if c.operations]
    priority_rank = {key: i for i, key in enumerate(priority)}

    def sort_key(c: Candidate) -> tuple[int, int, datetime, str]:
        group = _group(c, wanted, recent_from)
        return (order[group], priority_rank.get(c.key, 0), c.created_at, c.key)

    batches: list[dict[str, Any]] = []
    current: list[Candidate] = []
    current_group: str | None = None
    for candidate in sorted(runnable, key=sort_key):
        group = _group(candidate, wanted, recent_from)
        if current and (group != current_group or len(current) == batch_size):
            batches.append({"batch_no": len(batches) + 1, "group": current_group, "keys": [c.key for c in current]})
            current = []
        current.append(candidate)
        current_group = group
    if current:
        batches.append({"batch_no": len(batches) + 1, "group": current_group, "keys": [c.key for c in current]})
    return batches


def expected_changes(candidates: Sequence[Candidate]) -> dict[str, dict[str, int]]:
    """Rows each table will gain (insert) or have rewritten (update), counted from the candidates' operations."""
    counts: dict[str, Counter[str]] = {}
    for c in candidates:
        for op in c.operations:
            table, _, kind = op.partition(":")
            counts.setdefault(table, Counter())[kind] += 1
    return {t: {"insert": n["insert"], "update": n["update"]} for t, n in sorted(counts.items())}


def compose_plan(
    conn: Connection,
    env: Environment,
    job: Job,
    params: PlanParams,
    *,
    now: datetime,
    run_id: str | None = None,
    source: str = "plan",
) -> dict[str, Any]:
    """Read-only: runs prechecks and discovery and returns the hashed plan body (nothing is recorded or written)."""
    params.validate(job)
    prechecks: list[Check] = job.prechecks(conn, env.name)
    failed = [c for c in prechecks if c.verdict == "FAIL" and c.gating]
    if failed:
        raise GateBlocked("precheck", [f"{c.name}: {c.summary}" for c in failed])
    candidates = list(job.discover(conn, {"since": params.since, "profiles": params.profiles}))
    known = {c.key for c in candidates}
    rate = parse_rate(params.rate)
    batches = make_batches(candidates, params.priority, params.batch_size, now)
    runnable = [c for c in candidates if c.operations]
    by_category: dict[str, list[str]] = {}
    for c in candidates:
        by_category.setdefault(c.category, []).append(c.key)
    body: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "run_id": run_id or ledger.new_run_id("apply", now),
        "source": source,
        "created_at": format_utc(now),
        "environment": {"name": env.name, "kind": env.kind, "database": env.display_url},
        "job": job.name,
        "versions": dict(job.versions),
        "parameters": params.to_json(),
        "prechecks": [c.to_json() for c in prechecks],
        "categories": {k: {"count": len(v), "keys": v} for k, v in sorted(by_category.items())},
        "candidates": [
            {
                "key": c.key,
                "category": c.category,
                "created_at": format_utc(c.created_at),
                "operations": list(c.operations),
                "detail": dict(c.detail),
            }
            for c in candidates
        ],
        "batches": batches,
        "totals": {
            "candidates": len(runnable),
            "blocked_or_skipped": len(candidates) - len(runnable),
            "batches": len(batches),
            "priority_not_found": [p for p in params.priority if p not in known],
        },
        "expected_changes": expected_changes(runnable),
        "expected_runtime_seconds": rate.seconds_for(len(runnable)),
    }
    body["hash"] = plan_hash(body)
    return body


def build_plan(
    db: Database,
    env: Environment,
    job: Job,
    params: PlanParams,
    *,
    now: datetime,
    artifacts_dir: Path,
    source: str = "plan",
    run_id: str | None = None,
) -> Plan:
    """Composes the plan, records it as a planned run in the ledger and writes backfill_plan.json/.md."""
    params.validate(job)
    ledger.init_ledger(db)
    with db.connect() as conn:
        body = compose_plan(conn, env, job, params, now=now, run_id=run_id, source=source)
    with db.begin() as conn:
        ledger.create_run(
            conn,
            run_id=body["run_id"],
            phase="apply",
            environment=env.name,
            job=job.name,
            versions=job.versions,
            params=params.to_json(),
            now=now,
            plan=body,
            plan_hash=body["hash"],
        )
    return write_plan_files(body, artifacts_dir / body["run_id"], "backfill_plan")


def write_plan_files(body: Mapping[str, Any], out_dir: Path, stem: str) -> Plan:
    """Writes ``<stem>.json`` (the plan exactly) and ``<stem>.md`` (its review) into ``out_dir``."""
    json_path = write_json(out_dir / f"{stem}.json", body)
    md_path = write_text(out_dir / f"{stem}.md", render_plan_markdown(body))
    return Plan(body=body, json_path=json_path, md_path=md_path)


_CALLS = {"fc_scores": "score_fc_session", "profiles": "score_prism"}


def render_plan_markdown(body: Mapping[str, Any]) -> str:
    """``backfill_plan.md``: the plan's numbers laid out for review (nothing here is computed but counts)."""
    ops: dict[str, str] = {}
    calls: Counter[str] = Counter({"score_fc_session": 0, "score_prism": 0})
    for c in body["candidates"]:
        ops.setdefault(c["category"], ", ".join(c["operations"]) or "nothing (not processed)")
        for op in c["operations"]:
            calls[_CALLS.get(op.split(":")[0], op)] += 1
    return render("backfill_plan.md.j2", p=body, ops=ops, calls=calls, risks=plan_risks(body))


def plan_risks(body: Mapping[str, Any]) -> list[str]:
    """The risks a reviewer should weigh, each derived from the plan's own numbers."""
    cats = body["categories"]
    risks = [
        "Live traffic may finalize candidates while apply runs: each session is re-checked under a row lock and "
        "rows that appeared meanwhile are left alone and logged `already_present`.",
    ]
    stale = cats.get("stale_profile", {}).get("count", 0)
    if stale and body["parameters"]["profiles"] != "stale":
        risks.append(f"{stale} profiles carry another results_version and are NOT rescored (use --profiles stale).")
    fc_only = cats.get("fc_only", {}).get("count", 0)
    if fc_only:
        risks.append(
            f"{fc_only} fc_only sessions keep their existing profile, which was scored without the new FC rows."
        )
    for name in ("no_fc_responses", "unresolvable_fc_options", "insufficient_answers"):
        n = cats.get(name, {}).get("count", 0)
        if n:
            risks.append(f"{n} sessions are blocked ({name}); they are data-quality findings, not backfill work.")
    missing = body["totals"]["priority_not_found"]
    if missing:
        risks.append(f"Priority sessions not found among the candidates: {', '.join(missing)}.")
    if body["environment"]["kind"] == "production":
        risks.append("Production: apply requires an approved, passing staging soak of the same versions.")
    return risks


def plan_from_ledger(db: Database, run_id: str) -> dict[str, Any]:
    """The plan body stored with a run (``DataError`` if the run has none)."""
    with db.connect() as conn:
        run = ledger.get_run(conn, run_id, where=db.display_url)
    if run.plan is None:
        raise DataError(f"run {run_id} has no plan")
    return dict(run.plan)
