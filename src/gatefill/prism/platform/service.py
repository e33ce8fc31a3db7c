"""The PRISM platform's server side as a library: the edge functions' reads, scoring and writes, one transaction each.

``PrismService`` is what ``gatefill serve functions`` runs behind HTTP: ``score_fc_session``, ``score_prism``,
``finalize`` (finalizeAssessment) and ``get_results`` (get-results-by-session). Scoring goes through
``gatefill.prism.scoring`` only (``score_fc_session`` for the tally, ``score_session`` for the profile), so these rows
equal what every other gatefill writer produces. Writes are dialect-neutral SQLAlchemy Core with ON CONFLICT upserts;
every function writes its ``fn_logs`` events in the transaction that writes its rows, with the request's "now" as
``at``.

Where this departs from the original functions (spec prism-data-model §2), on purpose:
- A failed write is an error (5xx plus a ``fc_upsert_error``/``profile_write_failed`` event), never a 200.
- An ``fc_scores`` row of ``{}`` is never written (scoring spec §7.3); such a session gets ``fc_scores_empty``.
- finalize runs in one transaction (upstream: three calls, each committing). A failed write rolls the whole call
  back; the failure event and, for finalize, the session's completion are then recorded in a second transaction
  (the respondent did finish; the missing rows are what a backfill finds). finalize stores the real number of
  answered questions in ``completed_questions`` (upstream stored ``profile.fc_answered_ct``), and fails when the FC
  write fails instead of scoring with legacy FC.
- Results access answers 403 for a wrong, expired or foreign token *and* for an unknown or unfinished session, so
  the status never reveals whether a session exists; the token is compared in constant time and only its sha256
  is stored.

Concurrency: a scoring transaction first locks the session row (``SELECT ... FOR UPDATE`` on Postgres; SQLite
serialises writers with ``BEGIN IMMEDIATE``), so concurrent finalize calls for one session run one after the other:
one profile per session, ``recomputed_at`` set by the later one, nothing lost or duplicated.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, NoReturn, TypeAlias

import sqlalchemy as sa
from psycopg.pq.abc import PGresult
from sqlalchemy.engine import Connection, Dialect

from gatefill.clock import Clock
from gatefill.db import Database
from gatefill.errors import DatabaseError, DatabaseUnreachable, DataError, GatefillError
from gatefill.prism import scoring
from gatefill.prism.inputs import (
    StaticReference,
    load_scoring_config,
    load_session_inputs,
    load_static_reference,
    token_hash,
)
from gatefill.prism.jsmath import to_fixed
from gatefill.prism.platform import service_pg
from gatefill.prism.schema import (
    assessment_responses,
    assessment_sessions,
    fc_responses,
    fc_scores,
    fn_logs,
    insert_for,
    profiles,
    results_token_access_logs,
)

__all__ = [
    "DRIFTED_RESULTS_VERSION",
    "EVENTS",
    "FAULT_NAMES",
    "SHARE_TOKEN_TTL",
    "CallContext",
    "Faults",
    "FunctionFailure",
    "PrismService",
    "ResultsOutcome",
]

_log = logging.getLogger("gatefill.prism.platform.service")

#: Every ``fn_logs`` event these functions write, with what it means. Each payload carries ``fn`` (the function),
#: ``session_id`` and ``request_id``, plus ``injected`` (the fault names) when the call carried faults.
EVENTS: dict[str, str] = {
    # score_fc_session, upstream names (spec prism-data-model §2.1)
    "fc_version_mismatch": "score_fc_session asked for version v1.1 or none",
    "fc_scoring_start": "FC scoring began {version, basis}",
    "fc_no_responses": "no fc_responses: nothing written",
    "fc_option_not_found": "an FC answer names an unknown option {option_id}",
    "fc_tally_complete": "the tally is done {blocks_answered}",
    "fc_scores_normalized": "the scores are normalised {keys}",
    "fc_upsert_error": "the fc_scores write failed {error}: 5xx",
    "fc_scoring_complete": "the fc_scores row was written {blocks_answered}",
    # gatefill findings instead of writing a wrong row (scoring spec §7.3)
    "fc_scores_empty": "answers exist but no option resolved: no {} row written",
    "fc_scores_non_finite": "non-finite FC scores: nothing written",
    # score_prism, upstream names (§2.2), emitted by gatefill.prism.scoring
    "fc_scores_loaded": "the profile used the stored v1.2 fc_scores row",
    "fc_fallback_legacy": "no fc_scores row: the profile used legacy FC from fc_map",
    "engine_version_override": "scoring_config.results_version differs from v1.2.1 {db_version, engine_version}",
    "no_responses": "no answers to score: 400 (finalize: 422)",
    # gatefill's own
    "scoring_failed": "the answers could not be scored {error}: 422",
    "profile_withheld": "scoring findings make the row wrong {findings}: 422",
    "profile_write_failed": "the profile write failed {error}: 5xx, no profile",
    "finalize_complete": "finalize wrote the profile and completed the session "
    "{profile_created, type_code, fc_source, delay_ms}",
    "finalize_failed": "finalize could not score the session {findings}",
    "call_timeout": "the call had not answered within the server's deadline {timeout_s}: 504 (it may still finish)",
    "server_error": "the call answered 5xx for a reason no other event records {status, code}",
    # get-results-by-session
    "tokenless_access": "a results request without a token {served} (upstream name, §2.4)",
    "results_access_denied": "results refused {reason, status}: no_token, unknown_session, token_mismatch, "
    "not_completed or expired",
}

#: Server-side faults a request may ask for when the server allows fault injection.
FAULT_NAMES = ("engine_version_override", "legacy_fc", "profile_write_fail", "token_bypass", "slow", "server_error")
#: The scoring_config.results_version an ``engine_version_override`` fault pretends is stored (the pre-v1.2.1 value).
DRIFTED_RESULTS_VERSION = "v1.2.0"
SHARE_TOKEN_TTL = timedelta(days=30)
_DEFAULT_SLOW_MS = 250.0
_MAX_SLOW_MS = 10_000.0
_MAX_TOKEN_CHARS = 256

Event: TypeAlias = tuple[str, dict[str, object]]


class FunctionFailure(GatefillError):
    """A function call that ends in an error response: HTTP ``status``, machine ``code`` and a one-line message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class Faults:
    """The faults one request asked for (only honoured where the server allows fault injection)."""

    names: frozenset[str] = frozenset()
    slow_ms: float = 0.0

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __bool__(self) -> bool:
        return bool(self.names)

    @classmethod
    def parse(cls, header: str) -> Faults:
        """Parses ``name[=value], ...`` (``slow=MS`` sets the delay); raises ValueError on unknown names or values."""
        names: set[str] = set()
        slow_ms = 0.0
        for part in header.split(","):
            item = part.strip()
            if not item:
                continue
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in FAULT_NAMES:
                raise ValueError(f"unknown fault {name[:40]!r} (known: {', '.join(FAULT_NAMES)})")
            names.add(name)
            if name == "slow":
                try:
                    slow_ms = float(value) if value.strip() else _DEFAULT_SLOW_MS
                except ValueError:
                    raise ValueError("slow needs a delay in milliseconds (slow=250)") from None
                if not 0 <= slow_ms <= _MAX_SLOW_MS:
                    raise ValueError(f"slow delay must be within 0..{_MAX_SLOW_MS:g} ms")
            elif value:
                raise ValueError(f"fault {name} takes no value")
        return cls(frozenset(names), slow_ms)

    def header(self) -> str:
        """The ``X-Gatefill-Fault`` value that asks for these faults."""
        return ", ".join(f"slow={self.slow_ms:g}" if n == "slow" else n for n in sorted(self.names))


@dataclass(frozen=True)
class CallContext:
    """One call's circumstances: its "now" (simulated or real), faults, request id and client."""

    now: datetime
    faults: Faults = field(default_factory=Faults)
    request_id: str = ""
    ip: str | None = None
    ua: str | None = None


@dataclass(frozen=True)
class ResultsOutcome:
    """The answer to one results request: HTTP status, body, whether access was granted and why not."""

    status: int
    body: dict[str, object]
    granted: bool
    reason: str


class _ReferenceCache:
    """Reference data per call: scoring_config read every time (drift must show at once), the rest kept ``ttl`` s.

    When the static part expires, one call reloads it while the others go on with the copy they have: under load
    every in-flight call would otherwise reload the same tables at once.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._static: StaticReference | None = None
        self._loaded_at = 0.0
        self._reloading = False
        self._built: dict[str, scoring.ReferenceData] = {}

    def get(
        self,
        load_static: Callable[[], StaticReference],
        config: Mapping[str, object],
        *,
        drift: bool,
        background: Callable[[Callable[[], object]], object] | None = None,
    ) -> scoring.ReferenceData:
        """The reference data of one call: ``config`` is scoring_config as the call read it, ``load_static`` reads
        the static tables when the cached copy has expired.

        With ``background`` (a call on the event loop, which must not block on a query) an expired copy is still
        used and the reload handed to ``background``; only the very first load happens in the call.
        """
        # Wall time, not the injected clock: this is a performance cache, and a simulated clock may never move.
        now = time.monotonic()
        with self._lock:
            static = self._static
            reload = static is None or (now - self._loaded_at >= self.ttl and not self._reloading)
            if reload:
                self._reloading = True
        if reload:
            if static is not None and background is not None:
                background(partial(self._reload_quietly, load_static, now))
            else:
                static = self._reload(load_static, now)
        assert static is not None
        config = dict(config)
        if drift:
            config["results_version"] = DRIFTED_RESULTS_VERSION
        fingerprint = json.dumps(config, sort_keys=True, default=str)
        with self._lock:
            ref = self._built.get(fingerprint) if self._static is static else None
        if ref is None:
            ref = static.build(config)
            with self._lock:
                if self._static is static:
                    if len(self._built) > 8:
                        self._built.clear()
                    self._built[fingerprint] = ref
        return ref

    def _reload_quietly(self, load_static: Callable[[], StaticReference], now: float) -> None:
        """A reload nobody waits for: its failure is logged here (the calls go on with the copy they have, and the
        next one tries again), not left in a future nobody reads."""
        try:
            self._reload(load_static, now)
        except GatefillError as exc:
            _log.warning("reloading the reference tables failed (%s); the cached copy stays in use", exc)
        except Exception:
            _log.exception("reloading the reference tables failed; the cached copy stays in use")

    def _reload(self, load_static: Callable[[], StaticReference], now: float) -> StaticReference:
        try:
            static = load_static()
            with self._lock:
                self._static, self._loaded_at, self._built = static, now, {}
            return static
        finally:
            with self._lock:
                self._reloading = False


# ====================================================================================================================
# The service


def _jsonable(value: object) -> object:
    kind = type(value)
    # Most values are plain scalars: answer them before the isinstance checks (this runs ~100 times per call).
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


_PROFILE_COLUMNS = frozenset(c.name for c in profiles.columns)
# Events the FC tally inside score_session emits; score_prism never tallies, so they are not its events.
_TALLY_EVENTS = frozenset({"fc_no_responses", "fc_option_not_found"})
_UPSERTS: dict[tuple[str, str], Any] = {}


def _upsert(dialect: Dialect, table: sa.Table, conflict: tuple[str, ...], keep: frozenset[str]) -> Any:
    """``INSERT ... ON CONFLICT (conflict) DO UPDATE`` of every column but ``keep``, built once per dialect.

    Reusing one construct lets SQLAlchemy's compiled cache hit (building ``excluded`` costs more than the query).
    """
    key = (dialect.name, table.name)
    stmt = _UPSERTS.get(key)
    if stmt is None:
        base = insert_for(dialect, table)
        update = {c.name: base.excluded[c.name] for c in table.columns if c.name not in keep and c.name not in conflict}
        stmt = _UPSERTS[key] = base.on_conflict_do_update(index_elements=list(conflict), set_=update)
    return stmt


def _fc_step(
    session_id: str, responses: Sequence[Mapping[str, object]], ref: scoring.ReferenceData, version: str, basis: str
) -> tuple[list[Event], dict[str, object], dict[str, object] | None]:
    """score_fc_session's computation: its events, its reply, and the fc_scores row to upsert (None: write nothing)."""
    events: list[Event] = []
    if not version or version == "v1.1":
        events.append(("fc_version_mismatch", {"session_id": session_id, "version": version}))
    events.append(("fc_scoring_start", {"session_id": session_id, "version": version, "basis": basis}))
    reply: dict[str, object] = {"session_id": session_id, "version": version, "basis": basis}
    tally = scoring.score_fc_session(responses, ref.fc_options, basis)
    if not tally.written:
        events.append(("fc_no_responses", {"session_id": session_id}))
        return events, {**reply, "blocks_answered": 0, "scores": {}, "info": "no fc responses"}, None
    for option_id in tally.unresolved_option_ids:
        events.append(("fc_option_not_found", {"session_id": session_id, "option_id": option_id}))
    events.append(("fc_tally_complete", {"session_id": session_id, "blocks_answered": tally.blocks_answered}))
    events.append(("fc_scores_normalized", {"session_id": session_id, "keys": len(tally.scores)}))
    if not tally.writable:
        empty = not tally.scores
        events.append(("fc_scores_empty" if empty else "fc_scores_non_finite", {"session_id": session_id}))
        info = "no fc option resolved" if empty else "non-finite fc scores"
        return (
            events,
            {**reply, "blocks_answered": tally.blocks_answered, "scores": {}, "written": False, "info": info},
            None,
        )
    return (
        events,
        {**reply, "blocks_answered": tally.blocks_answered, "scores": tally.scores},
        tally.to_row(session_id, version),
    )


@dataclass
class _Work:
    """What one call computed and wrote, kept outside its transaction so a failure can still be recorded."""

    events: list[Event] = field(default_factory=list)
    fc_reply: dict[str, object] | None = None
    score: scoring.SessionScore | None = None
    writing: str | None = None  # "fc"/"profile" while that write runs: its failure aborts the transaction
    events_kept: int = 0  # how many events had been logged when the write named by ``writing`` ran
    share_token: str | None = None
    failure: FunctionFailure | None = None

    @property
    def row(self) -> dict[str, object]:
        """The profile row written (only asked for once the write succeeded)."""
        if self.score is None or self.score.profile_row is None:
            raise DataError("no profile row was scored")
        return self.score.profile_row


@dataclass(frozen=True)
class _Reads:
    """What a scoring call read under the session's row lock."""

    locked: tuple[str | None, datetime | None] | None  # the session's share_token and its expiry; None: no session
    ref: scoring.ReferenceData
    inputs: scoring.SessionInputs
    profile_exists: bool
    submitted_at: datetime | None


@dataclass(frozen=True)
class _Write:
    """One planned write: ``kind`` fc/profile/session, or ``fail`` (an error raised where that write would run).

    ``label`` is what ``_Work.writing`` names while it runs (its failure has an event of its own) and ``events_at``
    how many events had been logged by then.
    """

    kind: str
    values: dict[str, object] | DatabaseError
    label: str | None = None
    events_at: int = 0


_s = assessment_sessions
_SESSION_UPDATE = (
    sa.update(_s)
    .where(_s.c.id == sa.bindparam("b_id", type_=_s.c.id.type))
    .values(
        status=sa.bindparam("b_status", type_=_s.c.status.type),
        completed_at=sa.bindparam("b_completed_at", type_=_s.c.completed_at.type),
        finalized_at=sa.bindparam("b_finalized_at", type_=_s.c.finalized_at.type),
        completed_questions=sa.bindparam("b_completed_questions", type_=_s.c.completed_questions.type),
        share_token=sa.bindparam("b_share_token", type_=_s.c.share_token.type),
        share_token_expires_at=sa.bindparam("b_share_token_expires_at", type_=_s.c.share_token_expires_at.type),
        updated_at=sa.bindparam("b_updated_at", type_=_s.c.updated_at.type),
    )
)


def _session_update(
    session_id: str, ctx: CallContext, responses_count: int, token: str, expires: datetime | None
) -> dict[str, object]:
    """§2.3's completion: status, completed_at, finalized_at, the answered count and the share token (kept if set)."""
    return {
        "b_id": session_id,
        "b_status": "completed",
        "b_completed_at": ctx.now,
        "b_finalized_at": ctx.now,
        "b_completed_questions": responses_count,
        "b_share_token": token,
        "b_share_token_expires_at": expires or ctx.now + SHARE_TOKEN_TTL,
        "b_updated_at": ctx.now,
    }


def _write_statement(dialect: Dialect, kind: str) -> Any:
    """The construct of a planned write of ``kind`` (both paths run these, so their rows are the same)."""
    if kind == "fc":
        return _upsert(dialect, fc_scores, ("session_id", "version", "fc_kind"), frozenset({"created_at"}))
    if kind == "profile":
        return _upsert(dialect, profiles, ("session_id",), frozenset({"id", "share_token", "user_id"}))
    return _SESSION_UPDATE


def _log_insert(count: int) -> Any:
    """One INSERT of ``count`` fn_logs rows (bind names ``evt_0``, ``payload_0``, ``at_0``, ...), typed by the
    columns so their bind processors apply: one statement per call instead of one per event."""
    c = fn_logs.c
    return fn_logs.insert().values(
        [
            {
                "evt": sa.bindparam(f"evt_{i}", type_=c.evt.type),
                "payload": sa.bindparam(f"payload_{i}", type_=c.payload.type),
                "at": sa.bindparam(f"at_{i}", type_=c.at.type),
            }
            for i in range(count)
        ]
    )


def _log_params(rows: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """The parameters of ``_log_insert(len(rows))`` for these fn_logs rows."""
    params: dict[str, object] = {}
    for i, row in enumerate(rows):
        params[f"evt_{i}"] = row["evt"]
        params[f"payload_{i}"] = row["payload"]
        params[f"at_{i}"] = row["at"]
    return params


class _StaleConnection(Exception):
    """The parked connection a call started on was dropped by the server while idle: retry on a fresh one."""


def _score_prism_reply(work: _Work) -> dict[str, object]:
    row = work.row
    conf = row["conf_calibrated"]
    return {
        "status": "success",
        "profile": _jsonable(row),
        "gap_to_second": row.get("top_gap"),
        "confidence_numeric": to_fixed(float(conf) * 100, 1) if isinstance(conf, int | float) else None,
    }


def _finalize_reply(session_id: str, work: _Work, results_base_url: str) -> dict[str, object]:
    token = work.share_token or ""
    return {
        "ok": True,
        "status": "success",
        "session_id": session_id,
        "share_token": token,
        "profile": _jsonable(work.row),
        "results_url": f"{results_base_url.rstrip('/')}/results/{session_id}?t={token}",
    }


class PrismService:
    """The four PRISM functions over one database, with reference data cached briefly and time from each call."""

    def __init__(self, db: Database, *, clock: Clock, reference_ttl: float = 10.0) -> None:
        self.db = db
        self.clock = clock
        self._reference = _ReferenceCache(reference_ttl)
        # Postgres: scoring calls run on parked psycopg connections (service_pg), not through the pool each time.
        self._parked = (
            service_pg.ParkedConnections(db.engine, db.transaction_settings)
            if db.caps.dialect == "postgresql"
            else None
        )

    def close(self) -> None:
        """Returns the connections this service keeps to the pool (before the database is disposed)."""
        if self._parked is not None:
            self._parked.dispose()

    def _load_static(self) -> StaticReference:
        # Translated here too: a background reload's failure is logged, and only gatefill's messages are scrubbed.
        with self.db.translate_errors(), self.db.connect() as conn:
            return load_static_reference(conn)

    # ---------------------------------------------------------------------------------------------------------------
    # helpers

    def _log(self, conn: Connection, fn: str, ctx: CallContext, events: Iterable[Event]) -> None:
        rows = self._log_rows(fn, ctx, events)
        if rows:
            conn.execute(fn_logs.insert(), rows)

    def _log_rows(self, fn: str, ctx: CallContext, events: Iterable[Event]) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for name, payload in events:
            body: dict[str, object] = {"fn": fn, **payload}
            if ctx.request_id:
                body["request_id"] = ctx.request_id
            if ctx.faults:
                body["injected"] = sorted(ctx.faults.names)
            rows.append({"evt": name, "payload": _jsonable(body), "at": ctx.now})
        return rows

    def record_timeout(self, fn: str, session_id: str, ctx: CallContext, seconds: float) -> None:
        """The ``call_timeout`` event of a call the server answered 504, so the soak counts it with the failures."""
        with self.db.translate_errors(), self.db.begin() as conn:
            self._log(conn, fn, ctx, [("call_timeout", {"session_id": session_id, "timeout_s": seconds})])

    def record_server_error(self, fn: str, session_id: str | None, ctx: CallContext, status: int, code: str) -> None:
        """The ``server_error`` event of a call the server answered 5xx for a reason no other event records."""
        with self.db.translate_errors(), self.db.begin() as conn:
            self._log(conn, fn, ctx, [("server_error", {"session_id": session_id, "status": status, "code": code})])

    def _write_fc(self, conn: Connection, work: _Work, row: Mapping[str, object], ctx: CallContext) -> None:
        work.writing = "fc"
        # created_at is only inserted, never updated: re-runs keep it, as upstream's upsert did.
        conn.execute(
            _upsert(conn.dialect, fc_scores, ("session_id", "version", "fc_kind"), frozenset({"created_at"})),
            {
                **row,
                "created_at": ctx.now,
            },
        )
        work.writing = None
        work.events.append(
            ("fc_scoring_complete", {"session_id": row["session_id"], "blocks_answered": row["blocks_answered"]})
        )

    # ---------------------------------------------------------------------------------------------------------------
    # score_fc_session

    def score_fc_session(
        self, session_id: str, ctx: CallContext, *, version: str = scoring.FC_VERSION, basis: str = scoring.FC_KIND
    ) -> dict[str, object]:
        """Tallies the session's FC responses and upserts ``fc_scores`` (created_at kept on re-runs); never ``{}``."""
        fn = "score_fc_session"
        work = _Work()
        try:
            with self.db.begin() as conn:
                ref = self._reference.get(partial(load_static_reference, conn), load_scoring_config(conn), drift=False)
                responses = [
                    {"block_id": row.block_id, "option_id": row.option_id}
                    for row in conn.execute(
                        sa.select(fc_responses.c.block_id, fc_responses.c.option_id)
                        .where(fc_responses.c.session_id == session_id)
                        .order_by(fc_responses.c.answered_at, fc_responses.c.block_id)
                    )
                ]
                work.events, reply, row = _fc_step(session_id, responses, ref, version, basis)
                if row is not None:
                    self._write_fc(conn, work, row, ctx)
                self._log(conn, fn, ctx, work.events)
                return reply
        except DatabaseUnreachable:
            raise
        except DatabaseError as exc:
            if work.writing is None:
                raise
            work.events.append(("fc_upsert_error", {"session_id": session_id, "error": _reason(exc)}))
            with self.db.begin() as conn:
                self._log(conn, fn, ctx, work.events)
            raise FunctionFailure(500, "FC_UPSERT_ERROR", "fc_scores write failed") from exc

    # ---------------------------------------------------------------------------------------------------------------
    # score_prism and finalize

    def score_prism(self, session_id: str, ctx: CallContext) -> dict[str, object]:
        """Scores the profile from stored answers and the stored v1.2 FC row (legacy FC without one) and upserts it."""
        work = self._score(session_id, ctx, fn="score_prism", tally_fc=False, finalize=False, responses_count=None)
        return _score_prism_reply(work)

    def finalize(
        self, session_id: str, ctx: CallContext, *, responses_count: int | None = None, results_base_url: str
    ) -> dict[str, object]:
        """finalizeAssessment: FC scoring, then profile scoring, then the session's completion with its share token.

        One transaction (one commit) instead of upstream's three calls; its rows are the same. ``legacy_fc`` skips
        the FC step, as a finalize that never reached score_fc_session.
        """
        work = self._score(
            session_id,
            ctx,
            fn="finalizeAssessment",
            tally_fc="legacy_fc" not in ctx.faults,
            finalize=True,
            responses_count=responses_count,
        )
        return _finalize_reply(session_id, work, results_base_url)

    async def score_prism_async(self, session_id: str, ctx: CallContext, executor: Executor) -> dict[str, object]:
        """``score_prism`` with its round trips waited for on the running event loop (see ``_score_async``)."""
        work = await self._score_async(
            session_id, ctx, fn="score_prism", tally_fc=False, finalize=False, responses_count=None, executor=executor
        )
        return _score_prism_reply(work)

    async def finalize_async(
        self,
        session_id: str,
        ctx: CallContext,
        executor: Executor,
        *,
        responses_count: int | None = None,
        results_base_url: str,
    ) -> dict[str, object]:
        """``finalize`` with its round trips waited for on the running event loop (see ``_score_async``)."""
        work = await self._score_async(
            session_id,
            ctx,
            fn="finalizeAssessment",
            tally_fc="legacy_fc" not in ctx.faults,
            finalize=True,
            responses_count=responses_count,
            executor=executor,
        )
        return _finalize_reply(session_id, work, results_base_url)

    def _score(
        self,
        session_id: str,
        ctx: CallContext,
        *,
        fn: str,
        tally_fc: bool,
        finalize: bool,
        responses_count: int | None,
        portable: bool = False,
    ) -> _Work:
        """Runs one scoring call in one transaction; a write failure is recorded (events, completion) and raised.

        ``portable`` skips the Postgres path (it found repeated answers, which the portable reader resolves).
        """
        work = _Work()
        try:
            if (
                portable
                or self._parked is None
                or not self._score_pg(work, session_id, ctx, fn, tally_fc, finalize, responses_count)
            ):
                work = _Work()
                with self.db.begin() as conn:
                    reads = self._read(conn, session_id, ctx, tally_fc)
                    writes = self._plan(reads, work, session_id, ctx, tally_fc, finalize, responses_count)
                    self._execute(conn, work, writes, fn, ctx)
        except DatabaseUnreachable:
            raise
        except DatabaseError as exc:
            if work.writing is None:
                raise
            self._record_write_failure(work, exc, session_id, ctx, fn, finalize, responses_count)
        if work.failure is not None:
            raise work.failure
        return work

    def _record_write_failure(
        self,
        work: _Work,
        exc: DatabaseError,
        session_id: str,
        ctx: CallContext,
        fn: str,
        finalize: bool,
        responses_count: int | None,
    ) -> NoReturn:
        """After the write ``work.writing`` failed: its event and, for finalize, the completion, then the failure.

        The failed write rolled the call back (its other writes too: no savepoint, which would cost two round trips
        on every call). The failure and, for finalize, the completion are recorded in a new transaction: the
        respondent did finish, and the missing rows are what a backfill then finds. The events are those logged up
        to the failed write.
        """
        del work.events[work.events_kept :]
        failure = FunctionFailure(500, "FC_UPSERT_ERROR", "fc_scores write failed")
        event = "fc_upsert_error"
        if work.writing == "profile":
            failure = FunctionFailure(500, "PROFILE_WRITE_FAILED", "profile write failed")
            event = "profile_write_failed"
        work.events.append((event, {"session_id": session_id, "error": _reason(exc)}))
        with self.db.begin() as conn:
            if finalize:
                self._complete_session(conn, session_id, ctx, responses_count)
            self._log(conn, fn, ctx, work.events)
        raise failure from exc

    def _score_pg(
        self,
        work: _Work,
        session_id: str,
        ctx: CallContext,
        fn: str,
        tally_fc: bool,
        finalize: bool,
        responses_count: int | None,
    ) -> bool:
        """The Postgres path of ``_score``: reads in one round trip, writes and COMMIT in another, on a parked
        connection. False (nothing written) when the session has repeated answers, which the portable reader
        resolves."""
        assert self._parked is not None
        fresh = False
        while True:
            with self.db.translate_errors(), self._parked.transaction(fresh=fresh) as (conn, reused):
                flow = self._pg_flow(
                    conn, reused, work, session_id, ctx, fn, tally_fc, finalize, responses_count, background=None
                )
                batch = next(flow)
                try:
                    while True:
                        try:
                            results = conn.run(batch)
                        except service_pg.PipelineStepFailed as exc:
                            batch = flow.throw(exc)
                        else:
                            batch = flow.send(results)
                except StopIteration as done:
                    return bool(done.value)
                except _StaleConnection:
                    fresh = True

    async def _score_async(
        self,
        session_id: str,
        ctx: CallContext,
        *,
        fn: str,
        tally_fc: bool,
        finalize: bool,
        responses_count: int | None,
        executor: Executor,
    ) -> _Work:
        """``_score`` with the Postgres path's two round trips waited for on the running event loop, not a thread.

        What is rare or blocking runs on ``executor``, as the synchronous call would: the whole call on SQLite,
        a session with repeated answers (the portable reader resolves them), and recording a failed write.
        """
        loop = asyncio.get_running_loop()
        call = partial(
            self._score, session_id, ctx, fn=fn, tally_fc=tally_fc, finalize=finalize, responses_count=responses_count
        )
        if self._parked is None:
            return await loop.run_in_executor(executor, call)
        work = _Work()
        try:
            background = partial(loop.run_in_executor, executor)
            done = await self._score_pg_async(
                work, session_id, ctx, fn, tally_fc, finalize, responses_count, background
            )
        except DatabaseUnreachable:
            raise
        except DatabaseError as exc:
            if work.writing is None:
                raise
            record = partial(self._record_write_failure, work, exc, session_id, ctx, fn, finalize, responses_count)
            await loop.run_in_executor(executor, record)
            raise  # not reached: recording the failure raises it
        if not done:
            return await loop.run_in_executor(executor, partial(call, portable=True))
        if work.failure is not None:
            raise work.failure
        return work

    async def _score_pg_async(
        self,
        work: _Work,
        session_id: str,
        ctx: CallContext,
        fn: str,
        tally_fc: bool,
        finalize: bool,
        responses_count: int | None,
        background: Callable[[Callable[[], object]], object],
    ) -> bool:
        """``_score_pg`` with ``PgConnection.run_async``: the same flow, the same statements."""
        assert self._parked is not None
        fresh = False
        while True:
            with self.db.translate_errors():
                async with self._parked.transaction_async(fresh=fresh) as (conn, reused):
                    flow = self._pg_flow(
                        conn, reused, work, session_id, ctx, fn, tally_fc, finalize, responses_count, background
                    )
                    batch = next(flow)
                    try:
                        while True:
                            try:
                                results = await conn.run_async(batch)
                            except service_pg.PipelineStepFailed as exc:
                                batch = flow.throw(exc)
                            else:
                                batch = flow.send(results)
                    except StopIteration as done:
                        return bool(done.value)
                    except _StaleConnection:
                        fresh = True

    def _pg_flow(
        self,
        conn: service_pg.PgConnection,
        reused: bool,
        work: _Work,
        session_id: str,
        ctx: CallContext,
        fn: str,
        tally_fc: bool,
        finalize: bool,
        responses_count: int | None,
        background: Callable[[Callable[[], object]], object] | None,
    ) -> Generator[service_pg.Batch, list[PGresult], bool]:
        """One Postgres scoring call as the batches it sends: yields the reads, then the writes with COMMIT; the
        driver (``_score_pg`` on a thread, ``_score_pg_async`` on the event loop) sends each batch's results back,
        or throws its ``PipelineStepFailed`` in. Returns False (nothing written) for repeated answers."""
        try:
            results = yield service_pg.read_batch(conn, session_id, with_fc_responses=tally_fc)
        except service_pg.PipelineStepFailed as exc:
            if exc.disconnected and reused:
                # A parked connection the server dropped while it waited: nothing ran, try a fresh one.
                raise _StaleConnection from exc
            raise self.db.driver_error(exc.cause, disconnected=exc.disconnected) from exc.cause
        pg = service_pg.read_results(conn, session_id, results)
        if pg.inputs is None:
            return False
        drift = "engine_version_override" in ctx.faults
        ref = self._reference.get(self._load_static, pg.config, drift=drift, background=background)
        reads = _Reads(pg.locked, ref, pg.inputs, pg.profile_exists, pg.submitted_at)
        writes = self._plan(reads, work, session_id, ctx, tally_fc, finalize, responses_count)
        steps, labels, failure = self._write_steps(writes, self._log_rows(fn, ctx, work.events))
        batch, step_of = service_pg.write_batch(steps, commit=failure is None)
        try:
            # The writes before a planned failure still run (a real failure among them is the one reported).
            yield batch
        except service_pg.PipelineStepFailed as exc:
            index = step_of[min(exc.index, len(step_of) - 1)]
            failed = labels[index] if index < len(labels) else None
            if failed is not None:
                work.writing, work.events_kept = failed.label, failed.events_at
            raise self.db.driver_error(exc.cause, disconnected=exc.disconnected) from exc.cause
        if failure is not None:
            work.writing, work.events_kept = failure.label, failure.events_at
            assert isinstance(failure.values, DatabaseError)
            raise failure.values
        return True

    def _read(self, conn: Connection, session_id: str, ctx: CallContext, tally_fc: bool) -> _Reads:
        """Locks the session row (serialising concurrent scoring of one session; a no-op on SQLite, whose writers
        queue anyway), then reads the reference data, the session's inputs and its existing profile."""
        drift = "engine_version_override" in ctx.faults
        s = assessment_sessions
        locked = conn.execute(
            sa.select(s.c.share_token, s.c.share_token_expires_at).where(s.c.id == session_id).with_for_update()
        ).first()
        ref = self._reference.get(partial(load_static_reference, conn), load_scoring_config(conn), drift=drift)
        inputs = load_session_inputs(conn, [session_id], with_fc_responses=tally_fc)[session_id]
        existing = conn.execute(sa.select(profiles.c.submitted_at).where(profiles.c.session_id == session_id)).first()
        return _Reads(
            None if locked is None else (locked.share_token, locked.share_token_expires_at),
            ref,
            inputs,
            existing is not None,
            existing.submitted_at if existing is not None else None,
        )

    def _plan(
        self,
        reads: _Reads,
        work: _Work,
        session_id: str,
        ctx: CallContext,
        tally_fc: bool,
        finalize: bool,
        responses_count: int | None,
    ) -> list[_Write]:
        """Scores the call (no I/O): fills ``work`` (events, replies, failure) and returns the writes, in order."""
        writes: list[_Write] = []
        fc_value = _tally_step(reads, work, session_id, ctx, writes) if tally_fc else reads.inputs.existing_fc_scores
        score = _score_step(reads, work, session_id, ctx, fc_value)
        if score is None:
            return writes
        row = score.profile_row
        if row is None:
            _withhold(score, work, session_id, finalize)
            return writes
        failure = _planned_write_failure(row, ctx, len(work.events))
        if failure is not None:
            writes.append(failure)
            return writes
        writes.append(_Write("profile", row, "profile", len(work.events)))
        if finalize:
            _completion_step(reads, work, session_id, ctx, responses_count, row, fc_value, writes)
        return writes

    def _execute(self, conn: Connection, work: _Work, writes: list[_Write], fn: str, ctx: CallContext) -> None:
        """Runs the planned writes, then the events (unless a write failed); ``work.writing`` names a failed write."""
        logs = self._log_rows(fn, ctx, work.events)
        for write in writes:
            work.writing, work.events_kept = write.label, write.events_at
            if isinstance(write.values, DatabaseError):
                raise write.values
            conn.execute(_write_statement(conn.dialect, write.kind), write.values)
        work.writing = None
        if logs:
            conn.execute(fn_logs.insert(), logs)

    def _write_steps(
        self, writes: list[_Write], logs: list[dict[str, object]]
    ) -> tuple[list[tuple[service_pg.CompiledWrite, Sequence[Mapping[str, object]]]], list[_Write], _Write | None]:
        """The planned writes and the events (one INSERT) as compiled statements, with the write behind each step;
        a planned failure (``fail``) ends them (nothing after it is sent, so the transaction is rolled back) and is
        returned third."""
        dialect = self.db.engine.dialect
        steps: list[tuple[service_pg.CompiledWrite, Sequence[Mapping[str, object]]]] = []
        labels: list[_Write] = []
        for write in writes:
            if isinstance(write.values, DatabaseError):
                return steps, labels, write
            keys = tuple(write.values) if write.kind in ("fc", "profile") else ()
            statement = service_pg.compiled(
                dialect, (write.kind, keys), partial(_write_statement, dialect, write.kind), keys or None
            )
            steps.append((statement, [write.values]))
            labels.append(write)
        if logs:
            statement = service_pg.compiled(dialect, ("logs", len(logs)), partial(_log_insert, len(logs)), None)
            steps.append((statement, [_log_params(logs)]))
        return steps, labels, None

    def _complete_session(
        self, conn: Connection, session_id: str, ctx: CallContext, responses_count: int | None
    ) -> str | None:
        """§2.3's session update after a failed write; returns the share token (the existing one, else a new one)."""
        s = assessment_sessions
        locked = conn.execute(
            sa.select(s.c.share_token, s.c.share_token_expires_at).where(s.c.id == session_id).with_for_update()
        ).first()
        if locked is None:
            return None
        if responses_count is None:
            r = assessment_responses
            responses_count = int(
                conn.execute(
                    sa.select(sa.func.count(sa.distinct(r.c.question_id))).where(r.c.session_id == session_id)
                ).scalar_one()
            )
        token = str(locked.share_token or uuid.uuid4())
        conn.execute(
            _write_statement(conn.dialect, "session"),
            _session_update(session_id, ctx, responses_count, token, locked.share_token_expires_at),
        )
        return token

    # ---------------------------------------------------------------------------------------------------------------
    # get-results-by-session

    def get_results(self, session_id: str, token: str | None, ctx: CallContext) -> ResultsOutcome:
        """The token check: 401 without a token, 403 for anything that is not this completed session's live token
        (unknown sessions included), 404 without a profile, else 200. Every access is logged with the token's sha256.
        """
        presented = token or None
        s = assessment_sessions
        with self.db.begin() as conn:
            session = conn.execute(
                sa.select(
                    s.c.id, s.c.status, s.c.share_token, s.c.share_token_expires_at, s.c.completed_at, s.c.finalized_at
                ).where(s.c.id == session_id)
            ).first()
            reason = _access_reason(session, presented, ctx)
            granted = reason == "ok"
            profile = None
            if granted:
                profile = (
                    conn.execute(sa.select(profiles).where(profiles.c.session_id == session_id)).mappings().first()
                )
            self._log_access(conn, session_id, presented, granted, reason, profile, ctx)
        return _results_outcome(session, profile, granted, reason)

    def _log_access(
        self,
        conn: Connection,
        session_id: str,
        presented: str | None,
        granted: bool,
        reason: str,
        profile: sa.RowMapping | None,
        ctx: CallContext,
    ) -> None:
        """Records one results request: its access-log row (the token's sha256, never the token) and its events."""
        conn.execute(
            results_token_access_logs.insert().values(
                profile_id=profile["id"] if profile is not None else None,
                session_id=session_id,
                token_hash=token_hash(presented),
                success=granted,
                ip=ctx.ip,
                ua=(ctx.ua or "")[:512] or None,
                ts=ctx.now,
            )
        )
        events: list[Event] = []
        if presented is None:
            events.append(("tokenless_access", {"session_id": session_id, "served": granted}))
        if not granted:
            status = 401 if reason == "no_token" else 403
            events.append(("results_access_denied", {"session_id": session_id, "reason": reason, "status": status}))
        self._log(conn, "get-results-by-session", ctx, events)


def _access_reason(session: sa.Row[*tuple[Any, ...]] | None, presented: str | None, ctx: CallContext) -> str:
    """Why a results request is refused (no_token, unknown_session, token_mismatch, not_completed, expired) or "ok"."""
    expected = (session.share_token if session is not None else None) or ""
    # Always compare, against a stand-in of the same length when there is no session: same work either way.
    matches = (
        hmac.compare_digest(
            (presented or "")[:_MAX_TOKEN_CHARS].encode("utf-8"), (expected or "-" * 36).encode("utf-8")
        )
        and len(presented or "") <= _MAX_TOKEN_CHARS
    )
    if "token_bypass" in ctx.faults:
        # The misconfigured endpoint: it serves any existing session, token or not.
        return "ok" if session is not None else "unknown_session"
    if presented is None:
        return "no_token"
    if session is None:
        return "unknown_session"
    if not matches or not expected:
        return "token_mismatch"
    if session.status != "completed":
        return "not_completed"
    if session.share_token_expires_at is not None and session.share_token_expires_at <= ctx.now:
        return "expired"
    return "ok"


def _results_outcome(
    session: sa.Row[*tuple[Any, ...]] | None, profile: sa.RowMapping | None, granted: bool, reason: str
) -> ResultsOutcome:
    """The HTTP answer to a results request once its access is decided and its profile, if any, read."""
    if not granted:
        if reason == "no_token":
            return ResultsOutcome(401, {"error": "share token required", "code": "TOKEN_REQUIRED"}, False, reason)
        return ResultsOutcome(403, {"error": "access denied", "code": "ACCESS_DENIED"}, False, reason)
    if profile is None:
        return ResultsOutcome(404, {"error": "profile not found", "code": "PROFILE_NOT_FOUND"}, True, "no_profile")
    assert session is not None
    body_profile = {k: v for k, v in profile.items() if k != "share_token"}
    body_session = {
        "id": session.id,
        "status": session.status,
        "completed_at": session.completed_at,
        "finalized_at": session.finalized_at,
    }
    return ResultsOutcome(
        200,
        {"status": "success", "profile": _jsonable(body_profile), "session": _jsonable(body_session)},
        True,
        reason,
    )


def _tally_step(reads: _Reads, work: _Work, session_id: str, ctx: CallContext, writes: list[_Write]) -> object:
    """The call's FC tally: its events, reply and fc_scores write; returns the FC value the profile is scored with."""
    events, work.fc_reply, fc_row = _fc_step(
        session_id, reads.inputs.fc_responses, reads.ref, scoring.FC_VERSION, scoring.FC_KIND
    )
    work.events.extend(events)
    if fc_row is None:
        return reads.inputs.existing_fc_scores
    # created_at is only inserted, never updated: re-runs keep it, as upstream's upsert did.
    writes.append(_Write("fc", {**fc_row, "created_at": ctx.now}, "fc", len(work.events)))
    work.events.append(
        ("fc_scoring_complete", {"session_id": fc_row["session_id"], "blocks_answered": fc_row["blocks_answered"]})
    )
    return fc_row["scores_json"]


def _score_step(
    reads: _Reads, work: _Work, session_id: str, ctx: CallContext, fc_value: object
) -> scoring.SessionScore | None:
    """Scores the session's profile into ``work``; None (with the 422 recorded) when its answers cannot be scored."""
    try:
        score = scoring.score_session(
            scoring.SessionInputs(session_id, reads.inputs.answers, (), fc_value),
            reads.ref,
            ctx.now,
            {"submitted_at": reads.submitted_at} if reads.profile_exists else None,
        )
    except DataError as exc:
        work.events.append(("scoring_failed", {"session_id": session_id, "error": _reason(exc)}))
        work.failure = FunctionFailure(422, "SCORING_FAILED", "the session's answers cannot be scored")
        return None
    work.score = score
    work.events.extend(event for event in score.events if event[0] not in _TALLY_EVENTS)
    return score


def _withhold(score: scoring.SessionScore, work: _Work, session_id: str, finalize: bool) -> None:
    """Records why a scored session has no profile to write: no answers, or findings that would make the row wrong."""
    if "no_responses" in score.findings:
        # score_prism answers 400 "no responses"; finalize turned any score_prism failure into 422.
        work.failure = FunctionFailure(422 if finalize else 400, "NO_RESPONSES", "no responses")
    else:
        work.events.append(("profile_withheld", {"session_id": session_id, "findings": score.findings}))
        work.failure = FunctionFailure(422, "PROFILE_WITHHELD", "profile withheld: " + ", ".join(score.findings))
    if finalize:
        work.events.append(("finalize_failed", {"session_id": session_id, "findings": score.findings}))


def _planned_write_failure(row: Mapping[str, object], ctx: CallContext, events_at: int) -> _Write | None:
    """A profile write that is known to fail (unknown columns, or the injected fault), planned where it would run."""
    unknown = sorted(set(row) - _PROFILE_COLUMNS)
    if unknown:
        return _Write("fail", DatabaseError(f"profiles has no column(s) {', '.join(unknown)}"), "profile", events_at)
    if "profile_write_fail" in ctx.faults:
        # The injected fault fails the write where a real failure would, so it takes the real failure's path.
        error = DatabaseError("profile write failed (injected fault profile_write_fail)")
        return _Write("fail", error, "profile", events_at)
    return None


def _completion_step(
    reads: _Reads,
    work: _Work,
    session_id: str,
    ctx: CallContext,
    responses_count: int | None,
    row: Mapping[str, object],
    fc_value: object,
    writes: list[_Write],
) -> None:
    """finalize's completion of the session (its share token kept or made) and its finalize_complete event."""
    if reads.locked is not None:
        token, expires = reads.locked
        work.share_token = token or str(uuid.uuid4())
        answered = len({a["question_id"] for a in reads.inputs.answers})
        count = responses_count if responses_count is not None else answered
        writes.append(_Write("session", _session_update(session_id, ctx, count, work.share_token, expires)))
    work.events.append(
        (
            "finalize_complete",
            {
                "session_id": session_id,
                "profile_created": not reads.profile_exists,
                "type_code": row.get("type_code"),
                "fc_source": "fc_scores" if fc_value is not None else "legacy",
                "delay_ms": ctx.faults.slow_ms,
            },
        )
    )


def _reason(exc: BaseException) -> str:
    """A one-line reason for an event payload (gatefill's DB errors are already masked and single-line)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
