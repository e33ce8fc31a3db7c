"""Phase 1a, plan: discover, classify, batch in priority order, count the expected changes, and write an immutable,
content-hashed plan (``backfill_plan.json`` + ``backfill_plan.md``) under a new run id in the ledger.

The expected changes are counted from each candidate's ``operations``, the same tuple apply executes, so plan and
apply cannot disagree about what a candidate means. Batches follow the priority order of the seeds: the named
priority sessions, then those of the most recent 30 days, then older ones (each group oldest first).

A plan crosses modules as the frozen ``Plan`` (its candidates are the job's ``Candidate`` objects, its batches
``Batch``); JSON appears only at the boundary: ``Plan.to_json`` / ``write_plan_files`` write the file, ``load_plan``
(and ``Plan.from_json``, for the copy the ledger keeps) read it back and verify its hash.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import ijson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.artifacts import render, write_json, write_text
from gatefill.config import DEFAULT_BATCH_SIZE, DEFAULT_RATE, Environment
from gatefill.db import Database, canonical_json, format_utc, parse_utc
from gatefill.errors import DataError, GateBlocked, UsageError
from gatefill.job import Candidate, Check, Job
from gatefill.throttle import parse_rate

__all__ = [
    "PLAN_FORMAT",
    "Batch",
    "Plan",
    "PlanEnvironment",
    "PlanFiles",
    "PlanHead",
    "PlanParams",
    "build_plan",
    "candidate_from_json",
    "candidate_to_json",
    "compose_plan",
    "load_plan",
    "open_plan",
    "plan_from_ledger",
    "plan_hash",
    "plan_header",
    "record_plan_run",
    "store_plan_work",
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
class PlanEnvironment:
    """The environment a plan was made for (apply refuses it anywhere else)."""

    name: str
    kind: str
    database: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "database": self.database}


@dataclass(frozen=True)
class Batch:
    """One batch of the plan: its number, its priority group and its candidates' keys, in the order apply runs them."""

    batch_no: int
    group: str
    keys: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"batch_no": self.batch_no, "group": self.group, "keys": list(self.keys)}


@dataclass(frozen=True)
class Plan:
    """An immutable, content-hashed plan: every candidate (runnable or blocked, as ``Candidate``), the batches in
    priority order, the parameters and prechecks it was made with. Categories, totals, expected changes and runtime
    are derived from those, so they cannot disagree with them; ``to_json`` is the plan file, exactly."""

    run_id: str
    source: str
    created_at: datetime
    environment: PlanEnvironment
    job: str
    versions: Mapping[str, str]
    parameters: PlanParams
    prechecks: tuple[Check, ...]
    candidates: tuple[Candidate, ...]
    batches: tuple[Batch, ...]
    hash: str = ""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Plan:
        """The plan a plan file (or the ledger) holds; ``UsageError`` (exit 2) for another format, a hash that does
        not match the content, or content this version of gatefill would not have written."""
        if body.get("format") != PLAN_FORMAT:
            raise UsageError(f"not a gatefill plan (format {body.get('format')!r}, expected {PLAN_FORMAT})")
        if body.get("hash") != plan_hash(body):
            raise UsageError("plan hash does not match its content: the plan was modified after it was made")
        try:
            plan = _plan_from_json(body)
            same = plan.to_json() == dict(body)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"malformed gatefill plan: {type(exc).__name__}: {exc}") from None
        if not same:
            raise UsageError("plan content does not match what gatefill derives from it (made by another version?)")
        return plan

    def sealed(self) -> Plan:
        """This plan with its hash computed from its content."""
        return replace(self, hash=plan_hash(self.to_json()))

    @cached_property
    def runnable(self) -> tuple[Candidate, ...]:
        """The candidates apply processes (those with operations), in discovery order."""
        return tuple(c for c in self.candidates if c.operations)

    def categories(self) -> dict[str, list[str]]:
        """Category → keys of its candidates (discovery order), categories sorted by name."""
        by_category: dict[str, list[str]] = {}
        for c in self.candidates:
            by_category.setdefault(c.category, []).append(c.key)
        return dict(sorted(by_category.items()))

    def blocked_categories(self) -> dict[str, int]:
        """Categories none of whose candidates is processed (blocked or not selected), with their sizes."""
        processed = {c.category for c in self.runnable}
        return {name: len(keys) for name, keys in self.categories().items() if name not in processed}

    def operations_of(self, category: str) -> tuple[str, ...]:
        """The row operations of a category's first candidate (every candidate of a category has the same)."""
        return next((c.operations for c in self.candidates if c.category == category), ())

    @property
    def priority_not_found(self) -> list[str]:
        known = {c.key for c in self.candidates}
        return [p for p in self.parameters.priority if p not in known]

    def expected_changes(self) -> dict[str, dict[str, int]]:
        return expected_changes(self.runnable)

    def to_json(self) -> dict[str, Any]:
        """The plan file's content (the key order is the file's; the hash ignores it)."""
        runnable = len(self.runnable)
        body: dict[str, Any] = {
            "format": PLAN_FORMAT,
            "run_id": self.run_id,
            "source": self.source,
            "created_at": format_utc(self.created_at),
            "environment": self.environment.to_json(),
            "job": self.job,
            "versions": dict(self.versions),
            "parameters": self.parameters.to_json(),
            "prechecks": [c.to_json() for c in self.prechecks],
            "categories": {k: {"count": len(v), "keys": v} for k, v in self.categories().items()},
            "candidates": [candidate_to_json(c) for c in self.candidates],
            "batches": [b.to_json() for b in self.batches],
            "totals": {
                "candidates": runnable,
                "blocked_or_skipped": len(self.candidates) - runnable,
                "batches": len(self.batches),
                "priority_not_found": self.priority_not_found,
            },
            "expected_changes": self.expected_changes(),
            "expected_runtime_seconds": parse_rate(self.parameters.rate).seconds_for(runnable),
        }
        if self.hash:
            body["hash"] = self.hash
        return body

    def head(self) -> PlanHead:
        """This plan's head, its work in memory."""
        return PlanHead.from_header(plan_header(self.to_json()), plan=self)

    def dump(self, path: Path) -> Path:
        """Writes the plan file (its JSON, exactly) to ``path``."""
        return write_json(path, self.to_json())


def candidate_to_json(c: Candidate) -> dict[str, Any]:
    """A candidate as the plan file (and a worker's job arguments) carry it."""
    return {
        "key": c.key,
        "category": c.category,
        "created_at": format_utc(c.created_at),
        "operations": list(c.operations),
        "detail": dict(c.detail),
    }


def candidate_from_json(c: Mapping[str, Any]) -> Candidate:
    """The candidate ``candidate_to_json`` wrote."""
    return Candidate(c["key"], c["category"], parse_utc(c["created_at"]), tuple(c["operations"]), c["detail"])


def _plan_from_json(body: Mapping[str, Any]) -> Plan:
    p = body["parameters"]
    return Plan(
        run_id=str(body["run_id"]),
        source=str(body["source"]),
        created_at=parse_utc(body["created_at"]),
        environment=PlanEnvironment(**body["environment"]),
        job=str(body["job"]),
        versions=dict(body["versions"]),
        parameters=PlanParams(
            since=parse_utc(p["since"]),
            priority=tuple(p["priority"]),
            rate=p["rate"],
            batch_size=p["batch_size"],
            profiles=p["profiles"],
        ),
        prechecks=tuple(Check(**c) for c in body["prechecks"]),
        candidates=tuple(candidate_from_json(c) for c in body["candidates"]),
        batches=tuple(Batch(b["batch_no"], b["group"], tuple(b["keys"])) for b in body["batches"]),
        hash=str(body["hash"]),
    )


@dataclass(frozen=True)
class PlanFiles:
    """A plan and the files it was written to (``<stem>.json``, the plan exactly, and ``<stem>.md``, its review)."""

    plan: Plan
    json_path: Path
    md_path: Path

    @property
    def run_id(self) -> str:
        return self.plan.run_id

    @property
    def hash(self) -> str:
        return self.plan.hash


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


def verify_plan(plan: Plan | PlanHead, env: Environment) -> None:
    """Refuses a plan made for another environment (its hash and format were verified when it was read)."""
    if plan.environment.name != env.name:
        raise UsageError(f"plan was made for environment '{plan.environment.name}', not '{env.name}'")
    if plan.environment.database != env.display_url:
        raise UsageError(f"plan was made for database {plan.environment.database}, not {env.display_url}")


def load_plan(path: Path) -> Plan:
    """Reads and verifies a plan file (``UsageError`` if missing, not JSON, not a plan or modified)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"plan file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read plan {path}: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError(f"{path} is not a gatefill plan")
    return Plan.from_json(body)


def _group(candidate: Candidate, priority: set[str], recent_from: datetime) -> str:
    if candidate.key in priority:
        return "priority"
    if candidate.created_at >= recent_from:
        return f"recent_{RECENT_DAYS}d"
    return "older"


def make_batches(
    candidates: Sequence[Candidate], priority: Sequence[str], batch_size: int, now: datetime
) -> tuple[Batch, ...]:
    """Splits the runnable candidates into batches: priority sessions, then the last 30 days, then older ones; within
    a group by creation time, then in discovery order (the job's key order: numeric keys stay numeric)."""
    wanted = set(priority)
    recent_from = now - timedelta(days=RECENT_DAYS)
    order = {"priority": 0, f"recent_{RECENT_DAYS}d": 1, "older": 2}
    runnable = [c for c in candidates if c.operations]
    priority_rank = {key: i for i, key in enumerate(priority)}
    discovered = {c.key: i for i, c in enumerate(runnable)}

    def sort_key(c: Candidate) -> tuple[int, int, datetime, int]:
        group = _group(c, wanted, recent_from)
        return (order[group], priority_rank.get(c.key, 0), c.created_at, discovered[c.key])

    batches: list[Batch] = []
    current: list[Candidate] = []
    current_group = ""
    for candidate in sorted(runnable, key=sort_key):
        group = _group(candidate, wanted, recent_from)
        if current and (group != current_group or len(current) == batch_size):
            batches.append(Batch(len(batches) + 1, current_group, tuple(c.key for c in current)))
            current = []
        current.append(candidate)
        current_group = group
    if current:
        batches.append(Batch(len(batches) + 1, current_group, tuple(c.key for c in current)))
    return tuple(batches)


def expected_changes(candidates: Sequence[Candidate]) -> dict[str, dict[str, int]]:
    """Rows each table will gain (insert) or have rewritten (update), counted from the candidates' operations."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for op, n in Counter(op for c in candidates for op in c.operations).items():
        table, _, kind = op.partition(":")
        counts[table][kind] += n
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
) -> Plan:
    """Read-only: runs prechecks and discovery and returns the hashed plan (nothing is recorded or written)."""
    params.validate(job)
    prechecks: list[Check] = job.prechecks(conn, env.name)
    failed = [c for c in prechecks if c.verdict == "FAIL" and c.gating]
    if failed:
        raise GateBlocked("precheck", [f"{c.name}: {c.summary}" for c in failed])
    candidates = tuple(job.discover(conn, {"since": params.since, "profiles": params.profiles}))
    plan = Plan(
        run_id=run_id or ledger.new_run_id("apply", now),
        source=source,
        created_at=now,
        environment=PlanEnvironment(env.name, env.kind, env.display_url),
        job=job.name,
        versions=dict(job.versions),
        parameters=params,
        prechecks=tuple(prechecks),
        candidates=candidates,
        batches=make_batches(candidates, params.priority, params.batch_size, now),
    )
    return plan.sealed()


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
) -> PlanFiles:
    """Composes the plan, records it as a planned run in the ledger and writes backfill_plan.json/.md."""
    params.validate(job)
    ledger.init_ledger(db)
    with db.connect() as conn:
        plan = compose_plan(conn, env, job, params, now=now, run_id=run_id, source=source)
    body = plan.to_json()
    with db.begin() as conn:
        record_plan_run(conn, plan.head(), now=now)
    return _write_plan_files(plan, body, artifacts_dir / plan.run_id, "backfill_plan")


def record_plan_run(conn: Connection, head: PlanHead, *, now: datetime) -> ledger.Run:
    """Records the planned run of a plan: its header on the run's row, its work (runnable candidates and batches)
    beside it, streamed from where the plan is (memory or its file), in the caller's transaction. A plan whose batches
    are not exactly its runnable candidates, each once, is refused (``UsageError``) and the transaction must roll back.
    """
    run = ledger.create_run(
        conn,
        run_id=head.run_id,
        phase="apply",
        environment=head.environment.name,
        job=head.job,
        versions=head.versions,
        params=head.parameters.to_json(),
        now=now,
        plan=head.header,
        plan_hash=head.hash,
    )
    store_plan_work(conn, head)
    return run


def store_plan_work(conn: Connection, head: PlanHead) -> None:
    """Stores a plan's work with its (recorded) run and checks that every batch key is a runnable candidate and every
    runnable candidate is batched once."""
    candidates, batches = head.work()
    try:
        n_candidates, _ = ledger.record_plan_work(conn, head.run_id, candidates, batches)
    except sa.exc.IntegrityError:
        raise UsageError(
            f"plan of run {head.run_id} lists a candidate twice (in its candidates or its batches)"
        ) from None
    stored, batched, joined = ledger.unbatched_work(conn, head.run_id)
    if not (stored == batched == joined == n_candidates == head.runnable):
        raise UsageError(
            f"plan of run {head.run_id}: its batches list {batched} sessions, {joined} of them among its "
            f"{stored} runnable candidates (the header says {head.runnable}): not a plan gatefill made"
        )


def write_plan_files(plan: Plan, out_dir: Path, stem: str) -> PlanFiles:
    """Writes ``<stem>.json`` (the plan exactly) and ``<stem>.md`` (its review) into ``out_dir``."""
    return _write_plan_files(plan, plan.to_json(), out_dir, stem)


def _write_plan_files(plan: Plan, body: Mapping[str, Any], out_dir: Path, stem: str) -> PlanFiles:
    json_path = write_json(out_dir / f"{stem}.json", body)
    md_path = write_text(out_dir / f"{stem}.md", render_plan_markdown(body))
    return PlanFiles(plan, json_path, md_path)


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


def plan_from_ledger(db: Database, run_id: str) -> PlanHead:
    """The plan stored with a run: its header (its work stays in the ledger, where apply reads it a batch at a time).
    A run recorded before plans were stored apart has its whole plan on its row: that is verified as a plan file is,
    and its work is stored apart when it is applied. ``DataError`` if the run has no plan."""
    with db.connect() as conn:
        run = ledger.get_run(conn, run_id, where=db.display_url)
    if run.plan is None:
        raise DataError(f"run {run_id} has no plan")
    if "candidates" in run.plan:
        return Plan.from_json(run.plan).head()
    return PlanHead.from_header(run.plan)


# ---------------------------------------------------------------------------------------------------- plan heads
# A plan of 1M candidates is a file of hundreds of MB: apply never holds it whole. It works from the plan's header
# (everything but the lists of candidates and batches, and the categories' key lists) and reads the work itself a
# batch at a time from the ledger, where it was stored when the run was recorded.

#: The plan body's fields that list every candidate: the ledger keeps them apart from the run's header.
_LISTS = ("batches", "candidates")


def plan_header(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plan body without its candidate and batch lists, its categories with their counts only: what the ledger
    keeps on the run's row (``gatefill_runs.plan``)."""
    head = {k: v for k, v in body.items() if k not in _LISTS}
    head["categories"] = {name: {"count": c["count"]} for name, c in body["categories"].items()}
    return head


@dataclass(frozen=True)
class PlanHead:
    """What apply needs of a plan up front, and where its work comes from: the plan in memory, or a plan file read
    again (streamed) when the run is recorded; once recorded, the ledger holds the work (``gatefill.worklist``)."""

    run_id: str
    job: str
    environment: PlanEnvironment
    versions: Mapping[str, str]
    parameters: PlanParams
    hash: str
    header: Mapping[str, Any]
    plan: Plan | None = None
    path: Path | None = None
    #: sha256 of the file's batch items and of its candidate items as they were verified (``batches:candidates``);
    #: read again to be recorded, they must give the same.
    work_digest: str = ""

    @classmethod
    def from_header(
        cls, header: Mapping[str, Any], *, plan: Plan | None = None, path: Path | None = None, work_digest: str = ""
    ) -> PlanHead:
        bare = _plan_from_json({**header, "candidates": [], "batches": [], "hash": header.get("hash", "")})
        return cls(
            bare.run_id,
            bare.job,
            bare.environment,
            bare.versions,
            bare.parameters,
            bare.hash,
            dict(header),
            plan,
            path,
            work_digest,
        )

    @property
    def runnable(self) -> int:
        return int(self.header["totals"]["candidates"])

    def work(self) -> tuple[Iterator[Candidate], Iterator[tuple[int, str, str]]]:
        """The runnable candidates, and the batches as ``(batch_no, group, key)`` in run order, one at a time."""
        if self.plan is not None:
            batches = ((b.batch_no, b.group, key) for b in self.plan.batches for key in b.keys)
            return iter(self.plan.runnable), batches
        if self.path is None:
            raise DataError(f"plan of run {self.run_id}: its work is stored in the ledger, not here")
        streamed = _StreamedWork(self.path, self.work_digest)
        return streamed.candidates(), streamed.batch_rows()


class _Tally:
    """What a streaming pass over a plan file's lists derives, to compare with what the file says of them."""

    def __init__(self, priority: Sequence[str]) -> None:
        self.priority = set(priority)
        self.found: set[str] = set()
        self.candidates = 0
        self.runnable = 0
        self.batches = 0
        self.operations: Counter[str] = Counter()
        self.by_category: dict[str, tuple[int, Any]] = {}  # name -> (count, sha256 of its keys in order)

    def candidate(self, item: Mapping[str, Any]) -> None:
        c = candidate_from_json(item)
        if candidate_to_json(c) != dict(item):
            raise UsageError("plan content does not match what gatefill derives from it (made by another version?)")
        self.candidates += 1
        self.runnable += bool(c.operations)
        self.operations.update(c.operations)
        if c.key in self.priority:
            self.found.add(c.key)
        n, keys = self.by_category.get(c.category, (0, hashlib.sha256()))
        keys.update(canonical_json(c.key).encode("utf-8") + b",")
        self.by_category[c.category] = (n + 1, keys)


def _parse_events(f: Any) -> Iterator[tuple[str, str, Any]]:
    return ijson.parse(f, use_float=True)  # type: ignore[no-any-return]


def _read_header(path: Path) -> dict[str, Any]:
    """Every top-level field of a plan file but its candidate and batch lists, the categories without their key lists,
    in one streaming pass (nothing list-long is built)."""
    header: dict[str, Any] = {}
    key: str | None = None
    builder: Any = None
    skip_depth = depth = 0
    with path.open("rb") as f:
        for prefix, event, value in _parse_events(f):
            if prefix == "" and event in ("start_map", "end_map", "map_key"):
                if builder is not None and key is not None:
                    header[key] = builder.value
                key, builder = (value, None) if event == "map_key" else (None, None)
                if event == "map_key" and value not in _LISTS:
                    builder = ijson.ObjectBuilder()
                continue
            if prefix == "":
                raise UsageError(f"{path} is not a gatefill plan")
            if builder is None:
                continue
            if key == "categories":
                depth += event in ("start_map", "start_array")
                depth -= event in ("end_map", "end_array")
                if skip_depth:
                    skip_depth = 0 if depth < skip_depth else skip_depth
                    continue
                if event == "map_key" and value == "keys" and depth == 2:
                    skip_depth = 3  # the key list that follows (ends when depth falls below 3)
                    continue
            builder.event(event, value)
    return header


def _hash_categories(path: Path, digest: Any) -> dict[str, tuple[int, Any]]:
    """Feeds the canonical JSON of the plan's categories to ``digest`` with their key lists streamed; returns each
    category's stated count and a sha256 of its keys. Only the shape gatefill writes (names sorted, ``count`` then
    ``keys``) is accepted: anything else was not written by gatefill."""
    found: dict[str, tuple[int, Any]] = {}
    name: str | None = None
    count: int | None = None
    keys: Any = None
    first = True
    digest.update(b"{")
    with path.open("rb") as f:
        events = ((p, e, v) for p, e, v in _parse_events(f) if p == "categories" or p.startswith("categories."))
        for prefix, event, value in events:
            if prefix == "categories" and event == "map_key":
                if not isinstance(value, str) or (name is not None and value <= name):
                    raise _not_derived()
                digest.update((b"," if name is not None else b"") + canonical_json(value).encode("utf-8"))
                digest.update(b':{"count":')
                name, count, keys = value, None, hashlib.sha256()
            elif event == "number" and count is None and isinstance(value, int) and not isinstance(value, bool):
                count, first = value, True
                digest.update(str(value).encode() + b',"keys":[')
            elif event == "string" and count is not None and prefix.endswith(".keys.item"):
                text = canonical_json(value).encode("utf-8")
                keys.update(text + b",")
                digest.update(text if first else b"," + text)
                first = False
            elif event == "end_array" and name is not None and count is not None and name not in found:
                digest.update(b"]}")
                found[name] = (count, keys)
            elif event == "map_key" and value in ("count", "keys"):
                continue
            elif event not in ("start_map", "end_map", "start_array"):
                raise _not_derived()
    digest.update(b"}")
    return found


def _not_derived() -> UsageError:
    return UsageError("plan content does not match what gatefill derives from it (made by another version?)")


def _hash_items(path: Path, field: str, digest: Any, work: Any, each: Callable[[Any], None]) -> None:
    """Feeds the canonical JSON of the list ``field`` to ``digest`` an item at a time (and to ``work``, the work
    digest), calling ``each`` with every item."""
    digest.update(b"[")
    with path.open("rb") as f:
        for i, item in enumerate(ijson.items(f, f"{field}.item", use_float=True)):
            text = canonical_json(item).encode("utf-8")
            digest.update((b"," if i else b"") + text)
            work.update(text + b"\n")
            each(item)
    digest.update(b"]")


def open_plan(path: Path) -> PlanHead:
    """Reads and verifies a plan file as ``load_plan`` does, without ever holding its candidates: one streaming pass
    reads the header, and one per list (batches, candidates, categories) feeds the hash in its canonical order and
    tallies what the header says of them (categories, totals, expected changes). ``UsageError`` for a missing or
    malformed file, another format, or content modified after the plan was made; nothing is written."""
    try:
        header = _read_header(path)
        if header.get("format") != PLAN_FORMAT:
            raise UsageError(f"not a gatefill plan (format {header.get('format')!r}, expected {PLAN_FORMAT})")
        digest, work, tally, categories = _stream_hash(path, header)
    except FileNotFoundError:
        raise UsageError(f"plan file not found: {path}") from None
    except (OSError, ijson.JSONError, ijson.IncompleteJSONError) as exc:
        raise UsageError(f"cannot read plan {path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"malformed gatefill plan: {type(exc).__name__}: {exc}") from None
    if header.get("hash") != digest:
        raise UsageError("plan hash does not match its content: the plan was modified after it was made")
    head = PlanHead.from_header(header, path=path, work_digest=work)
    _check_derived(head, tally, categories)
    return head


def _stream_hash(path: Path, header: Mapping[str, Any]) -> tuple[str, str, _Tally, dict[str, tuple[int, Any]]]:
    """The plan hash (``plan_hash``'s, exactly) and the work digest of a plan file, streamed."""
    digest = hashlib.sha256(b"{")
    work = {name: hashlib.sha256() for name in _LISTS}
    tally = _Tally(header["parameters"]["priority"])
    categories: dict[str, tuple[int, Any]] = {}

    def batch(item: Any) -> None:
        if Batch(item["batch_no"], item["group"], tuple(item["keys"])).to_json() != item:
            raise _not_derived()
        tally.batches += 1

    keys = sorted({*header, *_LISTS} - {"hash"})
    for i, key in enumerate(keys):
        digest.update(("," if i else "").encode() + canonical_json(key).encode("utf-8") + b":")
        if key == "batches":
            _hash_items(path, key, digest, work[key], batch)
        elif key == "candidates":
            _hash_items(path, key, digest, work[key], tally.candidate)
        elif key == "categories":
            categories = _hash_categories(path, digest)
        else:
            digest.update(canonical_json(header[key]).encode("utf-8"))
    digest.update(b"}")
    return digest.hexdigest(), ":".join(work[name].hexdigest() for name in _LISTS), tally, categories


def _check_derived(head: PlanHead, tally: _Tally, categories: Mapping[str, tuple[int, Any]]) -> None:
    """Refuses a file whose header says of its lists what gatefill would not derive from them, as ``load_plan`` does
    by comparing the whole content."""
    stated = {name: (n, keys.hexdigest()) for name, (n, keys) in categories.items()}
    derived = {name: (n, keys.hexdigest()) for name, (n, keys) in tally.by_category.items()}
    expected = _derived_header(head, tally)
    if stated != derived or canonical_json(expected) != canonical_json(head.header):
        raise _not_derived()


def _derived_header(head: PlanHead, tally: _Tally) -> dict[str, Any]:
    """The header gatefill would write for ``head``'s fields and the tallied lists."""
    bare = Plan(
        head.run_id,
        str(head.header["source"]),
        parse_utc(head.header["created_at"]),
        head.environment,
        head.job,
        head.versions,
        head.parameters,
        tuple(Check(**c) for c in head.header["prechecks"]),
        (),
        (),
        head.hash,
    )
    body = bare.to_json()
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for op, n in tally.operations.items():
        table, _, kind = op.partition(":")
        counts[table][kind] += n
    body["categories"] = {name: {"count": n} for name, (n, _) in sorted(tally.by_category.items())}
    body["totals"] = {
        "candidates": tally.runnable,
        "blocked_or_skipped": tally.candidates - tally.runnable,
        "batches": tally.batches,
        "priority_not_found": [p for p in head.parameters.priority if p not in tally.found],
    }
    body["expected_changes"] = {t: {"insert": n["insert"], "update": n["update"]} for t, n in sorted(counts.items())}
    body["expected_runtime_seconds"] = parse_rate(head.parameters.rate).seconds_for(tally.runnable)
    return plan_header({**body, "categories": {k: {**v, "keys": []} for k, v in body["categories"].items()}})


class _StreamedWork:
    """A plan file's work read again, when its run is recorded: each list streamed from the file, its digest checked
    against the one verified when the file was opened (a file changed in between is refused, and the transaction
    recording the run rolls back)."""

    def __init__(self, path: Path, work_digest: str) -> None:
        self.path = path
        self.expected = dict(zip(_LISTS, work_digest.split(":"), strict=True))

    def _items(self, field: str) -> Iterator[Any]:
        work = hashlib.sha256()
        with self.path.open("rb") as f:
            for item in ijson.items(f, f"{field}.item", use_float=True):
                work.update(canonical_json(item).encode("utf-8") + b"\n")
                yield item
        if work.hexdigest() != self.expected[field]:
            raise UsageError(f"plan file {self.path} changed while it was read ({field}): nothing was recorded")

    def batch_rows(self) -> Iterator[tuple[int, str, str]]:
        for item in self._items("batches"):
            for key in item["keys"]:
                yield int(item["batch_no"]), str(item["group"]), str(key)

    def candidates(self) -> Iterator[Candidate]:
        for item in self._items("candidates"):
            if item["operations"]:
                yield candidate_from_json(item)
