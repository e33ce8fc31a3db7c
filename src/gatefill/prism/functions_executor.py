"""The ``functions`` executor of ``gatefill apply``: batches run through the PRISM edge functions over HTTP
(``score_fc_session``, then ``score_prism``, with the service-role key) and the ledger records exactly the rows those
calls wrote, with their before-images.

Why three steps rather than one transaction: the functions commit in the server's own transactions, so the executor
cannot hold one transaction around them (on SQLite an open write transaction of ours would even block the server: a
deadlock). So, per batch:

1. *Intent*, one transaction: the before-image of every row the batch may write (the v1.2/functions ``fc_scores``
   row and the profile of each session), the request ids its calls will carry and the highest ``fn_logs`` id so far
   (where the batch's log window starts) are committed to ``gatefill_fn_intents`` before any call is made.
2. *Calls*: per session, the rows are looked at again just before each call and a call whose row exists is skipped
   (upstream score_prism always overwrites, so it is never called over a profile unless the plan says rescore).
   Calls carry ``X-Request-Id`` and a timeout, and are retried with exponential backoff and jitter on 429, 5xx,
   timeouts and connection errors; any other 4xx is final. No transaction of ours is open meanwhile.
3. *Commit*, one transaction: the rows are read back and attributed (below); their changes (before-image from the
   intent, after-image as read), the calls' ``fn_logs`` rows (inserts, so rollback deletes them), session_results
   and the batch row are written, and the intents deleted, all together.

Intents that outlive a crash, a kill or a lost connection are finished by ``recover`` (or by apply's retry of the same
batch): a call whose row is already there as ours is not repeated, the others are made again with the same request
ids (both functions are idempotent upserts), then step 3 runs. So every row a call wrote ends up in the ledger, once,
and no session is processed twice.

Attribution: a row is *ours* only if a stamp the server writes in the same transaction as the row matches one of our
calls. The server stamps every event of a call with the call's "now" (``fn_logs.at``); the same instant is the
``fc_scores.created_at`` it inserts (kept by later upserts), a new profile's ``created_at`` and a re-scored profile's
``recomputed_at``. A row that does not carry such a stamp, or whose session got a write logged by another writer inside
the batch's window (a live finalize, the local executor), is someone else's: reported ``already_present``, never
recorded, so rollback never touches it. Events are ours when their payload carries our request id (the server has to
stamp ``X-Request-Id`` into its payloads); against a server that ignores the header, the score_fc_session/score_prism
events of the batch's sessions inside its window are taken as ours, and the batch log says so
(``fn_logs_attribution: session_window`` instead of ``request_id``).

The service-role key is sent only in the ``Authorization`` header; it never appears in a log, an error, the ledger or
``repr``.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.clock import Clock
from gatefill.config import Environment
from gatefill.db import Database, parse_utc
from gatefill.errors import ConfigError, DataError, ExecutorUnavailable
from gatefill.job import BatchRecord, BatchTask, Fence, Job, RowChange, SessionOutcome, WrittenTable
from gatefill.prism import scoring
from gatefill.prism.schema import assessment_sessions, fc_scores, fn_logs, profiles

__all__ = [
    "FC_FUNCTION",
    "PRISM_FUNCTION",
    "CallResult",
    "FunctionsExecutor",
    "FunctionsUnavailable",
]

FC_FUNCTION = "score_fc_session"
PRISM_FUNCTION = "score_prism"
REQUEST_ID_HEADER = "X-Request-Id"

# The plan's row operations (``gatefill.prism.job.operations_for``); they are part of the plan file format.
_FC_INSERT = "fc_scores:insert"
_PROFILE_INSERT = "profiles:insert"
_PROFILE_UPDATE = "profiles:update"

# Events by which *another* writer shows it wrote a session's row: the functions' own success events (finalize runs
# the FC step too) and the local executor's marker.
_FC_WRITE_EVENTS = frozenset({"fc_scoring_complete", "gatefill_backfill"})
_PROFILE_WRITE_EVENTS = frozenset({"finalize_complete", "gatefill_backfill"})
# score_prism logs one of these on every call that scored (success or not); its success has no event of its own.
_PRISM_SCORING_EVENTS = frozenset({"fc_scores_loaded", "fc_fallback_legacy"})
_OUR_FUNCTIONS = frozenset({FC_FUNCTION, PRISM_FUNCTION})

_LIVE_NOTE = "another writer wrote this row while the batch ran: left alone, not recorded"

#: Longest error text kept from a response body (it goes into the ledger and the batch log).
_MAX_ERROR_CHARS = 200


# ---------------------------------------------------------------------------------------------------- errors, results


class FunctionsUnavailable(ExecutorUnavailable):
    """The functions server gave no answer (connection errors or timeouts) to one call after every retry.

    The batch stops where it is; its intents are kept, so the next apply (``recover``) finishes it.
    """

    def __init__(self, url: str, function: str, attempts: int, reason: str) -> None:
        self.url = url
        self.function = function
        self.attempts = attempts
        self.reason = reason
        super().__init__(f"functions server {url} did not answer {function} after {attempts} attempt(s): {reason}")


@dataclass(frozen=True)
class CallResult:
    """One function call as the executor saw it: final HTTP status, decoded body, attempts and time taken."""

    function: str
    request_id: str
    status: int
    body: Mapping[str, Any]
    attempts: int
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "call": self.function,
            "request_id": self.request_id,
            "status": self.status,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 6),
        }
        if self.error:
            out["error"] = self.error
        return out


# ---------------------------------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Intent:
    """One session's intent row, decoded."""

    run_id: str
    session_id: str
    batch_no: int
    candidate: Mapping[str, Any]
    request_ids: Mapping[str, str]
    before: Mapping[str, Any]
    fn_logs_after: int
    retrying: bool
    batch_started_at: datetime

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(self.candidate.get("operations", ()))

    @property
    def exists(self) -> bool:
        return bool(self.before.get("exists"))

    @property
    def fc_before(self) -> Mapping[str, Any] | None:
        value = self.before.get("fc_scores")
        return value if isinstance(value, Mapping) else None

    @property
    def profile_before(self) -> Mapping[str, Any] | None:
        value = self.before.get("profiles")
        return value if isinstance(value, Mapping) else None

    @property
    def profile_op(self) -> str | None:
        if _PROFILE_UPDATE in self.operations:
            return _PROFILE_UPDATE
        if _PROFILE_INSERT in self.operations:
            return _PROFILE_INSERT
        return None


@dataclass
class _Seen:
    """What the database shows for one session after (some of) its calls: its rows and how they are attributed."""

    fc: Mapping[str, Any] | None
    profile: Mapping[str, Any] | None
    events: list[Mapping[str, Any]] = field(default_factory=list)  # our calls' fn_logs rows
    fc_at: set[datetime] = field(default_factory=set)  # "now" of each of our score_fc_session calls
    # "now" of each of our score_prism calls, to the millisecond: profile stamps are toISOString() text (ms).
    prism_at: set[datetime] = field(default_factory=set)
    foreign_fc: bool = False  # another writer logged an fc_scores write for this session in the window
    foreign_profile: bool = False  # ... a profile write


@dataclass(frozen=True)
class _Verdict:
    """Where one row operation of a session stands: written (by us), already_present, pending (not there) or failed."""

    op: str
    result: str
    note: str | None = None


def _image(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as the ledger stores before/after images (timestamps as ISO text; the rest as the driver returns it)."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def _instant(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        return parse_utc(value)
    return None


def _to_ms(value: datetime) -> datetime:
    """The instant truncated to the millisecond, as ``Date.prototype.toISOString()`` (the profile stamps) keeps it."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _ms(value: object) -> datetime | None:
    instant = _instant(value)
    return _to_ms(instant) if instant is not None else None


def _one_line(text: str, limit: int = _MAX_ERROR_CHARS) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:limit]


def _display_url(url: str) -> str:
    """The URL without any user:password part (a misconfigured URL must not leak credentials into messages)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid url>"
    return str(parsed.copy_with(username=None, password=None)) if parsed.userinfo else str(parsed)


# ---------------------------------------------------------------------------------------------------- the executor


class FunctionsExecutor:
    """Runs apply batches through the PRISM functions over HTTP and records what they wrote; see the module docstring.

    ``commit_batch`` has the contract of ``gatefill.apply._commit_batch``; ``recover`` finishes batches whose intents
    survived an interruption. ``retries`` is the number of attempts after the first; backoff doubles from
    ``backoff_base`` seconds (times a jitter factor in [0.5, 1.5)), capped at ``backoff_max``, and a 429's
    ``Retry-After`` is honoured up to that cap. ``sleep`` is real time by default even under a simulated apply clock:
    the server needs real time to recover.
    """

    def __init__(
        self,
        base_url: str,
        service_key: str,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"functions URL {_display_url(base_url)!r} must start with http:// or https://")
        if not service_key:
            raise ConfigError("the functions executor needs the service-role key")
        if retries < 0 or timeout <= 0 or backoff_base < 0 or backoff_max < 0:
            raise ConfigError("functions executor: retries, backoff must be >= 0 and timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.display_url = _display_url(self.base_url)
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._key = service_key
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout), transport=transport, headers={"user-agent": "gatefill-functions-executor"}
        )
        self._tables_ready: set[str] = set()
        # The job's written tables (their column kinds digest the after-images): set by commit_batch and recover.
        self._written: tuple[WrittenTable, ...] = ()

    @classmethod
    def from_env(cls, env: Environment, **options: Any) -> FunctionsExecutor:
        """The executor for ``env``: its ``functions_url`` and the key from its ``service_role_key_env`` variable.

        A missing URL or key is a one-line ``ConfigError`` naming the setting (never the key's value).
        """
        if not env.functions_url:
            raise ConfigError(f"environment '{env.name}': functions_url is not set (needed by --executor functions)")
        key = env.service_role_key()
        if not key:
            raise ConfigError(
                f"environment '{env.name}': variable {env.service_role_key_env} (service_role_key_env) is not set "
                "(needed by --executor functions)"
            )
        return cls(env.functions_url, key, **options)

    def __repr__(self) -> str:
        return f"FunctionsExecutor(base_url={self.display_url!r}, timeout={self.timeout}, retries={self.retries})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FunctionsExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ public API

    def commit_batch(self, db: Database, job: Job, task: BatchTask, clock: Clock, fence: Fence) -> BatchRecord:
        """Runs one batch (intent, calls, commit) and returns it as the ledger recorded it; the intents' and the
        commit's transactions are fenced with the run's lease.

        If the same batch already has intents (apply retrying it after a lost connection), it is finished instead of
        started again. Intents of any other batch of the run must be recovered first (``DataError`` otherwise).
        """
        fc_version = _fc_version(job)
        self._written = tuple(job.written_tables())
        self._prepare(db)
        run_id, batch_no = task.run_id, task.batch_no
        with db.connect() as conn:
            leftover = _load_intents(conn, run_id)
        if leftover:
            keys = {c.key for c in task.candidates}
            if {i.batch_no for i in leftover} == {batch_no} and {i.session_id for i in leftover} == keys:
                return self._finish(db, leftover, clock, fc_version, fence, resumed=True)
            raise DataError(
                f"run {run_id} has unfinished functions batch(es) "
                f"{sorted({i.batch_no for i in leftover})}: recover them before batch {batch_no}"
            )
        if not task.candidates:
            raise DataError(f"batch {batch_no} of run {run_id} is empty")
        recorded = self._record_intents(db, task, clock.now(), fc_version, fence)
        return self._finish(db, recorded, clock, fc_version, fence, resumed=False)

    def recover(self, db: Database, job: Job, run_id: str, *, clock: Clock, fence: Fence) -> list[BatchRecord]:
        """Finishes every batch of ``run_id`` left with intents, oldest first: calls whose rows are missing are made
        again, everything is read back and attributed, and each batch commits with its ledger rows (as step 3).

        Returns the finished batches (an empty list: nothing was pending). Apply calls this before it works out what
        is left to do, so those sessions count as done and batch numbers stay contiguous.
        """
        fc_version = _fc_version(job)
        self._written = tuple(job.written_tables())
        self._prepare(db)
        with db.connect() as conn:
            leftover = _load_intents(conn, run_id)
        by_batch: dict[int, list[_Intent]] = {}
        for intent in leftover:
            by_batch.setdefault(intent.batch_no, []).append(intent)
        return [self._finish(db, by_batch[n], clock, fc_version, fence, resumed=True) for n in sorted(by_batch)]

    # ------------------------------------------------------------------------------------------------ step 1

    def _prepare(self, db: Database) -> None:
        where = db.engine.url.render_as_string(hide_password=True)
        if where not in self._tables_ready:
            ledger.init_intents(db)
            self._tables_ready.add(where)

    def _record_intents(
        self, db: Database, task: BatchTask, started: datetime, fc_version: str, fence: Fence
    ) -> list[_Intent]:
        """Step 1: before-images, request ids and the fn_logs watermark of every session, committed before any call."""
        ids = [c.key for c in task.candidates]
        with db.begin() as conn:
            fence(conn)
            existing = set(
                conn.execute(sa.select(assessment_sessions.c.id).where(assessment_sessions.c.id.in_(ids))).scalars()
            )
            fc_rows = {
                row.session_id: _image(dict(row._mapping))
                for row in conn.execute(sa.select(fc_scores).where(*_fc_filter(ids, fc_version)))
            }
            profile_rows = {
                row.session_id: _image(dict(row._mapping))
                for row in conn.execute(sa.select(profiles).where(profiles.c.session_id.in_(ids)))
            }
            watermark = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(fn_logs.c.id), 0))).scalar_one())
            rows = [
                {
                    "run_id": task.run_id,
                    "session_id": c.key,
                    "batch_no": task.batch_no,
                    "position": position,
                    "candidate": {
                        "key": c.key,
                        "category": c.category,
                        "operations": list(c.operations),
                        "group": task.group,
                    },
                    # One id per function: every attempt of a call, and its redo in recovery, carries the same one.
                    "request_ids": {fn: f"gatefill-{uuid.uuid4().hex}" for fn in (FC_FUNCTION, PRISM_FUNCTION)},
                    "before": {
                        "exists": c.key in existing,
                        "fc_scores": fc_rows.get(c.key),
                        "profiles": profile_rows.get(c.key),
                    },
                    "fn_logs_after": watermark,
                    "retrying": task.retrying,
                    "batch_started_at": started,
                    "created_at": started,
                }
                for position, c in enumerate(task.candidates)
            ]
            ledger.record_intents(conn, rows)
        return [_intent_from(r) for r in rows]

    # ------------------------------------------------------------------------------------------------ steps 2 and 3

    def _finish(
        self,
        db: Database,
        batch_intents: Sequence[_Intent],
        clock: Clock,
        fc_version: str,
        fence: Fence,
        *,
        resumed: bool,
    ) -> BatchRecord:
        """Steps 2 and 3 for a batch whose intents are recorded (new, or left over from an interrupted attempt)."""
        calls: dict[str, list[CallResult]] = {}
        seconds: dict[str, float] = {}
        with db.connect() as conn:
            seen, _ = _observe(conn, batch_intents, fc_version)
        for intent in batch_intents:
            t0 = time.perf_counter()
            calls[intent.session_id] = self._call_session(db, intent, seen[intent.session_id], fc_version)
            seconds[intent.session_id] = time.perf_counter() - t0
        return self._record(db, batch_intents, calls, seconds, clock, fc_version, fence, resumed)

    def _call_session(self, db: Database, intent: _Intent, seen: _Seen, fc_version: str) -> list[CallResult]:
        """Step 2 for one session: the calls it still needs, each made only if its row is still missing right before."""
        if not intent.exists:
            return []
        verdicts = {v.op: v for v in _judge(intent, seen)}
        made: list[CallResult] = []
        fc = verdicts.get(_FC_INSERT)
        if fc is not None and fc.result == "pending":
            if not self._peek(db, intent.session_id, fc_version)[0]:
                made.append(
                    self._call(
                        FC_FUNCTION,
                        {"session_id": intent.session_id, "version": fc_version, "basis": scoring.FC_KIND},
                        intent.request_ids[FC_FUNCTION],
                    )
                )
            if not self._peek(db, intent.session_id, fc_version)[0]:
                # As the local executor: a session whose FC row cannot be written gets no profile either.
                return made
        op = intent.profile_op
        profile = verdicts.get(op) if op is not None else None
        if profile is not None and profile.result == "pending":
            now = self._peek(db, intent.session_id, fc_version)[1]
            if op == _PROFILE_INSERT:
                unchanged = now is None
            else:
                unchanged = now is not None and seen.profile is not None and _same_version(now, seen.profile)
            if unchanged:
                made.append(
                    self._call(PRISM_FUNCTION, {"session_id": intent.session_id}, intent.request_ids[PRISM_FUNCTION])
                )
        return made

    def _peek(self, db: Database, session_id: str, fc_version: str) -> tuple[bool, Mapping[str, Any] | None]:
        """Whether the fc_scores row exists and the profile's provenance columns, read just before a call."""
        with db.connect() as conn:
            fc = conn.execute(sa.select(fc_scores.c.session_id).where(*_fc_filter([session_id], fc_version))).first()
            p = profiles.c
            row = conn.execute(
                sa.select(p.id, p.results_version, p.updated_at, p.recomputed_at).where(p.session_id == session_id)
            ).first()
        return fc is not None, (dict(row._mapping) if row is not None else None)

    def _record(
        self,
        db: Database,
        batch_intents: Sequence[_Intent],
        calls: Mapping[str, Sequence[CallResult]],
        seconds: Mapping[str, float],
        clock: Clock,
        fc_version: str,
        fence: Fence,
        resumed: bool,
    ) -> BatchRecord:
        """Step 3: reads every row back, attributes it, and commits changes, results and the batch row in one go."""
        first = batch_intents[0]
        run_id, batch_no, started = first.run_id, first.batch_no, first.batch_started_at
        with db.begin() as conn:
            fence(conn)
            _claim_intents(conn, run_id, batch_no, batch_intents)
            seen, mode = _observe(conn, batch_intents, fc_version)
            outcomes: list[SessionOutcome] = []
            changes: list[RowChange] = []
            for intent in batch_intents:
                sid = intent.session_id
                outcome, session_changes = _settle(intent, seen[sid], calls.get(sid, ()), fc_version)
                outcome.seconds = seconds.get(sid, 0.0)
                outcomes.append(outcome)
                changes.extend(session_changes)
            changes = ledger.row_changes_not_recorded(conn, run_id, changes)
            ledger.record_row_changes(conn, run_id, batch_no, changes, at=started, tables=self._written)
            batch = BatchRecord(
                run_id=run_id,
                batch_no=batch_no,
                group=first.candidate.get("group"),
                categories={i.session_id: str(i.candidate["category"]) for i in batch_intents},
                sessions=tuple(outcomes),
                changes=tuple(changes),
                started_at=started,
                finished_at=clock.now(),
                retrying=any(i.retrying for i in batch_intents),
                detail={"executor": "functions", "fn_logs_attribution": mode, "recovered": resumed},
            )
            ledger.record_batch(conn, batch)
            ledger.drop_intents(conn, run_id, batch_no)
        return batch

    # ------------------------------------------------------------------------------------------------ HTTP

    def _call(self, function: str, body: Mapping[str, Any], request_id: str) -> CallResult:
        """One call with retries: 429, 5xx and transport errors are retried with backoff; other answers are final.

        Transport errors that outlast every retry raise ``FunctionsUnavailable`` (the batch cannot go on); an error
        status that does is this session's failure.
        """
        url = f"{self.base_url}/{function}"
        headers = {"authorization": f"Bearer {self._key}", REQUEST_ID_HEADER: request_id}
        started = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._translate(function, attempt):
                    response = self._client.post(url, json=dict(body), headers=headers)
            except FunctionsUnavailable:
                if attempt > self.retries:
                    raise
                self._sleep(self._delay(attempt, None))
                continue
            status = response.status_code
            if (status == 429 or status >= 500) and attempt <= self.retries:
                self._sleep(self._delay(attempt, response.headers.get("retry-after")))
                continue
            decoded = _decode(response)
            error = None if 200 <= status < 300 else self._error_text(function, status, decoded, attempt)
            return CallResult(function, request_id, status, decoded, attempt, time.perf_counter() - started, error)

    @contextmanager
    def _translate(self, function: str, attempt: int) -> Iterator[None]:
        """httpx's transport errors become ``FunctionsUnavailable`` here, once, with a message free of the key."""
        try:
            yield
        except httpx.TransportError as exc:
            reason = self._scrub(_one_line(str(exc)) or type(exc).__name__)
            raise FunctionsUnavailable(self.display_url, function, attempt, f"{type(exc).__name__}: {reason}") from exc

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff_base * float(2 ** (attempt - 1)) * (0.5 + self._rng.random())
        if retry_after is not None and retry_after.strip().isdigit():
            delay = max(delay, float(retry_after.strip()))
        return min(delay, self.backoff_max)

    def _error_text(self, function: str, status: int, body: Mapping[str, Any], attempts: int) -> str:
        message = body.get("error") if isinstance(body.get("error"), str) else None
        code = body.get("code") if isinstance(body.get("code"), str) else None
        text = f"{function} answered HTTP {status}"
        if code:
            text += f" {code}"
        if message:
            text += f": {message}"
        if attempts > 1:
            text += f" (after {attempts} attempts)"
        return self._scrub(_one_line(text, 300))

    def _scrub(self, text: str) -> str:
        # Our server never echoes the key, but a proxy or a misconfigured server might: never pass it on.
        return text.replace(self._key, "***")


# ---------------------------------------------------------------------------------------------------- helpers


def _fc_version(job: Job) -> str:
    """The fc_scores version of the job; the server writes profiles of its own engine only, so that must match."""
    versions = job.versions
    engine = versions.get("engine_version", scoring.ENGINE_VERSION)
    if engine != scoring.ENGINE_VERSION:
        raise ConfigError(
            f"the functions executor writes profiles with the server's engine {scoring.ENGINE_VERSION}, "
            f"not {engine}: use --executor local"
        )
    return str(versions.get("fc_version", scoring.FC_VERSION))


def _fc_filter(ids: Sequence[str], fc_version: str) -> tuple[sa.ColumnElement[bool], ...]:
    return (fc_scores.c.session_id.in_(ids), fc_scores.c.version == fc_version, fc_scores.c.fc_kind == scoring.FC_KIND)


def _decode(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _claim_intents(conn: Connection, run_id: str, batch_no: int, batch_intents: Sequence[_Intent]) -> None:
    """Locks the batch's intents for the commit; ``DataError`` if another process finished the batch meanwhile."""
    if ledger.lock_intents(conn, run_id, batch_no) != {i.session_id for i in batch_intents}:
        raise DataError(f"batch {batch_no} of run {run_id} was finished by another process meanwhile")


def _intent_from(row: Mapping[str, Any]) -> _Intent:
    started = _instant(row["batch_started_at"])
    assert started is not None
    return _Intent(
        run_id=str(row["run_id"]),
        session_id=str(row["session_id"]),
        batch_no=int(row["batch_no"]),
        candidate=dict(row["candidate"]),
        request_ids=dict(row["request_ids"]),
        before=dict(row["before"]),
        fn_logs_after=int(row["fn_logs_after"]),
        retrying=bool(row["retrying"]),
        batch_started_at=started,
    )


def _load_intents(conn: Connection, run_id: str) -> list[_Intent]:
    return [_intent_from(row) for row in ledger.intents_for(conn, run_id)]


def _observe(conn: Connection, batch_intents: Sequence[_Intent], fc_version: str) -> tuple[dict[str, _Seen], str]:
    """The rows of the batch's sessions now, and which events in the batch's log window are our calls'.

    Returns the per-session view and the attribution mode: ``request_id`` when the server stamped our request ids into
    its events, ``session_window`` when it did not (then our functions' events for the session count as ours).
    """
    ids = [i.session_id for i in batch_intents]
    fc_now = {
        r.session_id: dict(r._mapping) for r in conn.execute(sa.select(fc_scores).where(*_fc_filter(ids, fc_version)))
    }
    profile_now = {
        r.session_id: dict(r._mapping) for r in conn.execute(sa.select(profiles).where(profiles.c.session_id.in_(ids)))
    }
    after = min(i.fn_logs_after for i in batch_intents)
    window = [
        dict(r._mapping) for r in conn.execute(sa.select(fn_logs).where(fn_logs.c.id > after).order_by(fn_logs.c.id))
    ]
    ours_ids = {rid for i in batch_intents for rid in i.request_ids.values()}
    exact = any(_payload(e).get("request_id") in ours_ids for e in window)
    mode = "request_id" if exact else "session_window"
    by_session: dict[str, list[Mapping[str, Any]]] = {}
    for row in window:
        sid = _payload(row).get("session_id")
        if isinstance(sid, str):
            by_session.setdefault(sid.lower(), []).append(row)
    seen: dict[str, _Seen] = {}
    for intent in batch_intents:
        view = _Seen(fc_now.get(intent.session_id), profile_now.get(intent.session_id))
        for event in by_session.get(intent.session_id.lower(), ()):
            if int(event["id"]) <= intent.fn_logs_after:
                continue
            payload = _payload(event)
            fn = payload.get("fn")
            if exact:
                ours = fn in _OUR_FUNCTIONS and payload.get("request_id") == intent.request_ids.get(str(fn))
            else:
                ours = fn in _OUR_FUNCTIONS
            if ours:
                view.events.append(event)
                at = _instant(event["at"])
                if at is not None and fn == FC_FUNCTION:
                    view.fc_at.add(at)
                elif at is not None:
                    view.prism_at.add(_to_ms(at))
                continue
            evt = event["evt"]
            if evt in _FC_WRITE_EVENTS:
                view.foreign_fc = True
            if evt in _PROFILE_WRITE_EVENTS or (fn == PRISM_FUNCTION and evt in _PRISM_SCORING_EVENTS):
                view.foreign_profile = True
        seen[intent.session_id] = view
    return seen, mode


def _payload(event: Mapping[str, Any]) -> Mapping[str, Any]:
    payload = event.get("payload")
    return payload if isinstance(payload, Mapping) else {}


def _same_version(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two reads of a profile show the same write (nobody wrote it in between)."""
    return all(_instant(a.get(c)) == _instant(b.get(c)) for c in ("updated_at", "recomputed_at")) and a.get(
        "results_version"
    ) == b.get("results_version")


def _judge(intent: _Intent, seen: _Seen) -> list[_Verdict]:
    """Where each row operation of the session stands, from its before-image, its row now and our calls' stamps."""
    out: list[_Verdict] = []
    if _FC_INSERT in intent.operations:
        fc = seen.fc
        if intent.fc_before is not None:
            out.append(_Verdict(_FC_INSERT, "already_present"))
        elif fc is None:
            out.append(_Verdict(_FC_INSERT, "pending"))
        elif _instant(fc.get("created_at")) in seen.fc_at and not seen.foreign_fc:
            out.append(_Verdict(_FC_INSERT, "written"))
        else:
            out.append(_Verdict(_FC_INSERT, "already_present", _LIVE_NOTE))
    op = intent.profile_op
    profile = seen.profile
    before = intent.profile_before
    if op == _PROFILE_INSERT:
        if before is not None:
            out.append(_Verdict(op, "already_present"))
        elif profile is None:
            out.append(_Verdict(op, "pending"))
        elif _ours_new_profile(profile, seen):
            out.append(_Verdict(op, "written"))
        else:
            out.append(_Verdict(op, "already_present", _LIVE_NOTE))
    elif op == _PROFILE_UPDATE:
        engine = scoring.ENGINE_VERSION
        if before is None or before.get("results_version") == engine:
            out.append(_Verdict(op, "already_present"))
        elif profile is None:
            out.append(_Verdict(op, "failed", "the profile was deleted while the batch ran"))
        elif _ms(profile.get("recomputed_at")) in seen.prism_at and not seen.foreign_profile:
            out.append(_Verdict(op, "written"))
        elif not _same_version(profile, before):
            out.append(_Verdict(op, "already_present", "re-written meanwhile by another writer, left alone"))
        else:
            out.append(_Verdict(op, "pending"))
    return out


def _ours_new_profile(profile: Mapping[str, Any], seen: _Seen) -> bool:
    """A profile our score_prism created: created by one of our calls and, if re-scored since, re-scored by ours."""
    if seen.foreign_profile:
        return False
    created = _ms(profile.get("created_at"))
    recomputed = _ms(profile.get("recomputed_at"))
    return created in seen.prism_at and (recomputed is None or recomputed in seen.prism_at)


def _settle(
    intent: _Intent, seen: _Seen, calls: Sequence[CallResult], fc_version: str
) -> tuple[SessionOutcome, list[RowChange]]:
    """The session's outcome and the changes to record, after its calls."""
    sid = intent.session_id
    call_log = [c.to_json() for c in calls]
    changes: list[RowChange] = [RowChange("fn_logs", {"id": int(e["id"])}, None, _image(e), sid) for e in seen.events]
    if not intent.exists:
        return SessionOutcome(sid, "failed", call_log, error="session no longer exists"), changes
    ops: list[dict[str, Any]] = []
    errors: list[str] = []
    written = False
    fc_failed = False
    for verdict in _judge(intent, seen):
        entry: dict[str, Any] = {"op": verdict.op, "result": verdict.result}
        if verdict.note:
            entry["note"] = verdict.note
        if verdict.result == "written":
            written = True
            if verdict.op == _FC_INSERT and seen.fc is not None:
                fc = seen.fc
                entry["blocks_answered"] = fc.get("blocks_answered")
                key = {"session_id": sid, "version": fc_version, "fc_kind": scoring.FC_KIND}
                changes.append(RowChange("fc_scores", key, None, _image(fc), sid))
            elif seen.profile is not None:
                before = intent.profile_before if verdict.op == _PROFILE_UPDATE else None
                changes.append(
                    RowChange("profiles", {"id": str(seen.profile["id"])}, before, _image(seen.profile), sid)
                )
        elif verdict.result == "pending":
            if verdict.op != _FC_INSERT and fc_failed:
                entry["result"] = "not_written"
            else:
                entry["result"] = "failed"
                errors.append(_why_missing(verdict.op, calls))
                fc_failed = fc_failed or verdict.op == _FC_INSERT
        elif verdict.result == "failed":
            errors.append(verdict.note or f"{verdict.op} failed")
        ops.append(entry)
    ops.extend(call_log)
    if errors:
        return SessionOutcome(sid, "failed", ops, error="; ".join(errors)), changes
    return SessionOutcome(sid, "written" if written else "already_present", ops), changes


def _why_missing(op: str, calls: Sequence[CallResult]) -> str:
    """Why an operation's row is not there after the calls, from the last call that should have written it."""
    function = FC_FUNCTION if op == _FC_INSERT else PRISM_FUNCTION
    made = [c for c in calls if c.function == function]
    if not made:
        return f"{function} was not called (its row changed just before the call)"
    last = made[-1]
    if last.error:
        return last.error
    info = last.body.get("info")
    reason = f": {info}" if isinstance(info, str) and info else ""
    table = "fc_scores" if op == _FC_INSERT else "profiles"
    return _one_line(f"{function} answered HTTP {last.status} but wrote no {table} row{reason}", 300)
