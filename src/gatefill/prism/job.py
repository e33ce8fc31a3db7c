"""The PRISM backfill as a gatefill Job: recreate missing v1.2 ``functions`` fc_scores and v1.2.1 profiles.

A candidate's ``operations`` are derived from its discovery category by ``operations_for``, which both the plan (to
count expected changes and calls) and apply (to decide what to write) use. ``process_batch`` runs inside the caller's
transaction: it locks the batch's session rows (so a live finalize of the same session waits, or is waited for),
re-reads what exists under that lock, then works through the sessions a chunk at a time: it loads a chunk's inputs
with one query, scores each session through ``scoring.score_session`` (the code path of the functions server too)
and writes the chunk with one bulk statement per table (``db.insert_rows``: COPY on Postgres) inside one savepoint.
Only if that fails (a live writer's row met at insert time, any database error) is the savepoint rolled back and the
chunk redone one savepoint per session, so the failing session is recorded with its error and the rest of the batch
still commits. The chunk's changes then go to the caller's ledger sink (``record``), in the same transaction. The
statements run on a helper thread, in order, while this thread scores the next chunk. Rows that appeared since the
plan (live traffic) are left alone and reported ``already_present``; nothing is overwritten unless the plan says
rescore. Every row written is reported with its before-image (None: absent) and its after-image, which for inserted
rows is the row as built here (every column set), for updated ones the row read back (a trigger sets updated_at).

Static reference data (scoring key, FC options, prototypes, calibration models) is read once per run; ``scoring_config``
is re-read every batch, so a drifted results_version shows from the next batch on.
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from gatefill import ledger
from gatefill.config import Environment
from gatefill.db import Database, UTCTimestamp, insert_rows, parse_utc
from gatefill.errors import DataError, UsageError
from gatefill.job import (
    LOCAL_EXECUTOR,
    NOT_APPLICABLE,
    BatchOutcome,
    Candidate,
    ChangeSink,
    Check,
    Executor,
    GateCheck,
    RowChange,
    SessionOutcome,
    SoakChecks,
    SoakSettings,
    WrittenTable,
)
from gatefill.prism import scoring
from gatefill.prism.checks.health import health_checks, newest_session_activity
from gatefill.prism.checks.soak import PrismSoakChecks, PrismSoakSettings
from gatefill.prism.discovery import Finding, discover
from gatefill.prism.functions_executor import FunctionsExecutor
from gatefill.prism.inputs import load_reference_data_from_db, load_session_inputs
from gatefill.prism.schema import (
    PRISM_TABLES,
    assessment_sessions,
    fc_blocks,
    fc_options,
    fc_scores,
    fn_logs,
    missing_columns,
    profiles,
    require_schema,
    scoring_config,
)

__all__ = ["PrismJob", "operations_for", "stamp_check"]

_FC_INSERT = "fc_scores:insert"
_PROFILE_INSERT = "profiles:insert"
_PROFILE_UPDATE = "profiles:update"


def operations_for(category: str, *, rescore_stale: bool) -> tuple[str, ...]:
    """The row operations a discovery category implies (empty: blocked, or stale and not asked to rescore)."""
    if category == "profile+fc":
        return (_FC_INSERT, _PROFILE_INSERT)
    if category == "fc_only":
        return (_FC_INSERT,)
    if category == "profile_only":
        return (_PROFILE_INSERT,)
    if category == "stale_profile" and rescore_stale:
        return (_PROFILE_UPDATE,)
    return ()


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as JSON-ready values (timestamps as ISO text) for the ledger's before/after images."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        out[key] = value.isoformat() if isinstance(value, datetime) else value
    return out


#: The health checks that count sessions needing backfill (their evidence's ``missing``).
_CANDIDATE_CHECKS = ("missing_profiles", "missing_fc_scores")

#: The final gate's checklist, as the seed documents' go/no-go reads (each row cites one check of the phase).
_GATE_CHECKS: dict[str, tuple[GateCheck, ...]] = {
    "soak": (
        GateCheck("version_stamps", "versions stamped (staging rows written)"),
        GateCheck("engine_version_override", "no engine_version_override"),
        GateCheck("legacy_fc", "no legacy FC"),
        GateCheck("token_gating", "tokenized results only"),
        GateCheck("conversion", "conversion not worse than baseline"),
        GateCheck("conversion_floor", "conversion at least the floor (seed: ≥ 85%)"),
    ),
    "health": (
        GateCheck("version_distribution", "production versions"),
        GateCheck("row_level_security", "production RLS"),
    ),
}

#: ``apply --executor functions``: batches through the PRISM edge functions over HTTP (the app's own code path).
FUNCTIONS_EXECUTOR = "functions"


class PrismJob:
    """The PRISM fc_scores + profiles backfill."""

    name = "prism"
    kind = "prism"

    def __init__(self, *, fc_version: str = scoring.FC_VERSION, engine_version: str = scoring.ENGINE_VERSION) -> None:
        self.fc_version = fc_version
        self.engine_version = engine_version
        self._reference: tuple[str, scoring.ReferenceData] | None = None  # (run id, data)
        self._uuids = _RandomUUIDs()
        self._fn_logs_sequence: dict[str, str | None] = {}  # database URL (no password) -> sequence name

    @property
    def versions(self) -> Mapping[str, str]:
        return {"fc_version": self.fc_version, "fc_kind": scoring.FC_KIND, "engine_version": self.engine_version}

    def parse_key(self, text: str) -> str:
        """A session id as a user typed it (``--priority``), in the database's form: a lower-case UUID."""
        try:
            return str(uuid.UUID(text.strip()))
        except ValueError:
            raise UsageError(f"{text!r} is not a session id (a UUID)") from None

    def post_checks(self, conn: Connection, run_id: str) -> list[Check]:
        """After apply: the version stamps of every row this run wrote, re-counted in the database."""
        return [stamp_check(conn, run_id, self.fc_version, self.engine_version)]

    def written_tables(self) -> Sequence[WrittenTable]:
        return (
            WrittenTable("fc_scores", ("session_id", "version", "fc_kind"), fc_scores),
            WrittenTable("profiles", ("id",), profiles),
            WrittenTable("fn_logs", ("id",), fn_logs),
        )

    def require_schema(self, db: Database) -> None:
        require_schema(db)

    # ---------------------------------------------------------------------------------------------- phase hooks

    def executors(self) -> tuple[str, ...]:
        return (LOCAL_EXECUTOR, FUNCTIONS_EXECUTOR)

    @contextmanager
    def open_executor(self, name: str, env: Environment) -> Iterator[Executor | None]:
        if name == LOCAL_EXECUTOR:
            yield None
            return
        if name != FUNCTIONS_EXECUTOR:
            raise UsageError(f"unknown executor '{name}' (use {' or '.join(self.executors())})")
        with FunctionsExecutor.from_env(env) as functions:
            yield functions

    def health_checks(
        self,
        conn: Connection,
        *,
        since: datetime,
        now: datetime,
        row_level_security: bool,
        timings: dict[str, float] | None = None,
    ) -> list[Check]:
        return health_checks(
            conn,
            since=since,
            now=now,
            fc_version=self.fc_version,
            engine_version=self.engine_version,
            row_level_security=row_level_security,
            timings=timings,
        )

    def needs_backfill(self, checks: Sequence[Check]) -> bool:
        """A candidate is a completed session of the window without a profile or without the current FC row:
        exactly what missing_profiles and missing_fc_scores count."""
        return any(int(c.evidence.get("missing", 0)) for c in checks if c.name in _CANDIDATE_CHECKS)

    def gate_checks(self, phase: str) -> Sequence[GateCheck]:
        return _GATE_CHECKS.get(phase, ())

    def newest_activity(self, conn: Connection, since: datetime) -> tuple[datetime | None, str]:
        return newest_session_activity(conn, since)

    @contextmanager
    def soak_checks(self, env: Environment, settings: SoakSettings) -> Iterator[SoakChecks]:
        """PRISM's soak checks; under a simulated clock the probes carry the service-role key to tell the server
        each look's time (from the environment unless the options name one)."""
        chosen = PrismSoakSettings(
            latency_p95_ms=settings.latency_p95_ms,
            fc_version=self.fc_version,
            engine_version=self.engine_version,
            **settings.options,
        )
        if settings.simulated_clock and chosen.service_role_key is None:
            chosen = replace(chosen, service_role_key=env.service_role_key())
        with PrismSoakChecks(env, chosen) as checks:
            yield checks

    # ---------------------------------------------------------------------------------------------------- prechecks

    def prechecks(self, conn: Connection, environment: str) -> list[Check]:
        """Schema, version config, FC seed, write privileges; each with its query and counts."""
        checks: list[Check] = []
        missing = missing_columns(conn)
        checks.append(
            Check(
                "required_tables",
                "PASS" if not missing else "FAIL",
                "all PRISM tables and columns present" if not missing else f"missing: {', '.join(missing[:8])}",
                {"missing": missing, "tables_checked": len(PRISM_TABLES)},
                "information schema (SQLAlchemy inspector)",
            )
        )
        if missing:
            return checks
        value = conn.execute(sa.select(scoring_config.c.value).where(scoring_config.c.key == "results_version")).first()
        db_version = value[0] if value else None
        checks.append(
            Check(
                "results_version",
                "PASS" if db_version == self.engine_version else "FAIL",
                f"scoring_config.results_version = {db_version!r}, engine {self.engine_version}",
                {"scoring_config": db_version, "engine": self.engine_version},
                "SELECT value FROM scoring_config WHERE key = 'results_version'",
            )
        )
        n_blocks = conn.execute(
            sa.select(sa.func.count())
            .select_from(fc_blocks)
            .where(fc_blocks.c.version == self.fc_version, fc_blocks.c.is_active)
        ).scalar_one()
        n_options = conn.execute(
            sa.select(sa.func.count())
            .select_from(fc_options.join(fc_blocks, fc_blocks.c.id == fc_options.c.block_id))
            .where(fc_blocks.c.version == self.fc_version)
        ).scalar_one()
        checks.append(
            Check(
                "fc_seed",
                "PASS" if n_blocks == 6 and n_options == 24 else "FAIL",
                f"{n_blocks} active {self.fc_version} blocks, {n_options} options (expected 6 and 24)",
                {"blocks": n_blocks, "options": n_options},
                "SELECT count(*) FROM fc_blocks WHERE version = :v AND is_active; options joined to those blocks",
            )
        )
        checks.append(_write_privileges(conn))
        return checks

    # ---------------------------------------------------------------------------------------------------- discovery

    def discover(self, conn: Connection, params: Mapping[str, Any]) -> Iterator[Candidate]:
        rescore = params.get("profiles", "missing") == "stale"
        for finding in discover(
            conn, since=params["since"], fc_version=self.fc_version, engine_version=self.engine_version
        ):
            yield Candidate(
                key=finding.session_id,
                category=finding.category,
                created_at=finding.created_at,
                operations=operations_for(finding.category, rescore_stale=rescore),
                detail=_finding_detail(finding),
            )

    # ---------------------------------------------------------------------------------------------------- apply

    def process_batch(
        self,
        conn: Connection,
        candidates: Sequence[Candidate],
        *,
        now: datetime,
        run_id: str,
        record: ChangeSink | None = None,
    ) -> BatchOutcome:
        with _cyclic_gc_paused():
            return self._process_batch(conn, candidates, now=now, run_id=run_id, record=record)

    def _process_batch(
        self,
        conn: Connection,
        candidates: Sequence[Candidate],
        *,
        now: datetime,
        run_id: str,
        record: ChangeSink | None,
    ) -> BatchOutcome:
        """Locks, re-checks, scores and writes one batch (see the module docstring); outcomes in key order."""
        ordered = sorted(candidates, key=lambda c: c.key)
        ids = [c.key for c in ordered]
        if not ids:
            return BatchOutcome()
        started = time.perf_counter()
        locked = _lock_sessions(conn, ids)
        present_fc, existing_fc = self._present_fc(conn, ids)
        present_profiles = self._present_profiles(conn, ordered)
        ref = self._reference_data(conn, run_id)
        results: dict[str, SessionOutcome] = {}
        todo = self._triage(ordered, locked, present_fc, present_profiles, results)
        changes: dict[str, list[RowChange]] = {}
        scoring_seconds = self._score_and_write(conn, todo, existing_fc, ref, now, run_id, record, results, changes)
        # Shared work (locks, loads, the bulk writes) is spread evenly over the batch's sessions.
        shared = max(0.0, time.perf_counter() - started - scoring_seconds) / len(ordered)
        return _batch_outcome(ordered, results, changes, shared)

    def _triage(
        self,
        ordered: Sequence[Candidate],
        locked: set[str],
        present_fc: set[str],
        present_profiles: Mapping[str, Mapping[str, Any]],
        results: dict[str, SessionOutcome],
    ) -> list[tuple[Candidate, _Wants]]:
        """Settles in ``results`` the candidates with nothing to do (gone, or present); returns the rest, with wants."""
        todo: list[tuple[Candidate, _Wants]] = []
        for candidate in ordered:
            if candidate.key not in locked:
                results[candidate.key] = SessionOutcome(candidate.key, "failed", error="session no longer exists")
                continue
            wants = self._recheck(candidate, candidate.key in present_fc, present_profiles.get(candidate.key))
            if wants.nothing:
                results[candidate.key] = SessionOutcome(candidate.key, "already_present", wants.ops)
            else:
                todo.append((candidate, wants))
        return todo

    def _score_and_write(
        self,
        conn: Connection,
        todo: Sequence[tuple[Candidate, _Wants]],
        existing_fc: Mapping[str, object],
        ref: scoring.ReferenceData,
        now: datetime,
        run_id: str,
        record: ChangeSink | None,
        results: dict[str, SessionOutcome],
        changes: dict[str, list[RowChange]],
    ) -> float:
        """Scores ``todo`` by chunks while one thread loads and writes them; returns the seconds spent scoring."""
        scoring_seconds = 0.0
        chunks = [todo[lo : lo + _LOAD_CHUNK] for lo in range(0, len(todo), _LOAD_CHUNK)]
        # One thread runs this batch's statements in order (load chunk k+1, write chunk k, ...) while this one
        # scores: the database works on one core while Python scores on the other. The connection is never used by
        # both threads at once: this thread touches it again only after the last write has finished.
        db_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatefill-batch-db")
        try:
            writes: list[Future[tuple[dict[str, list[RowChange]], dict[str, SessionOutcome]]]] = []
            load = db_thread.submit(_load_inputs, conn, [c.key for c, _ in chunks[0]], existing_fc) if chunks else None
            for k, chunk in enumerate(chunks):
                assert load is not None
                # Inputs are loaded a chunk at a time and dropped once scored: ~250 answers a session make them
                # the largest thing a batch holds, so the chunk, not the batch, bounds the memory they take.
                inputs = load.result()
                if k + 1 < len(chunks):
                    load = db_thread.submit(_load_inputs, conn, [c.key for c, _ in chunks[k + 1]], existing_fc)
                pending, seconds = self._score_chunk(chunk, inputs, ref, now, run_id, results)
                scoring_seconds += seconds
                del inputs
                writes.append(db_thread.submit(self._write_batch, conn, pending, record))
            for write in writes:
                written, failed = write.result()
                changes.update(written)
                results.update(failed)
        finally:
            db_thread.shutdown(wait=True, cancel_futures=True)
        return scoring_seconds

    def _score_chunk(
        self,
        chunk: Sequence[tuple[Candidate, _Wants]],
        inputs: dict[str, scoring.SessionInputs],
        ref: scoring.ReferenceData,
        now: datetime,
        run_id: str,
        results: dict[str, SessionOutcome],
    ) -> tuple[list[_Pending], float]:
        """Scores one chunk's sessions, each timed, into ``results``; returns the rows to write and the time taken."""
        pending: list[_Pending] = []
        seconds = 0.0
        for candidate, wants in chunk:
            t0 = time.perf_counter()
            prepared = self._prepare(candidate, wants, inputs.pop(candidate.key), ref, now, run_id)
            session = prepared if isinstance(prepared, SessionOutcome) else prepared.outcome
            session.seconds = time.perf_counter() - t0
            seconds += session.seconds
            if isinstance(prepared, SessionOutcome):
                results[candidate.key] = prepared
            else:
                pending.append(prepared)
                results[candidate.key] = prepared.outcome
        return pending, seconds

    def _present_fc(self, conn: Connection, ids: Sequence[str]) -> tuple[set[str], dict[str, object]]:
        """Sessions that have this job's fc_scores row, and the v1.2/functions scores that scoring reads as input."""
        s = fc_scores
        present: set[str] = set()
        existing: dict[str, object] = {}
        for sid, version, scores_json in conn.execute(
            sa.select(s.c.session_id, s.c.version, s.c.scores_json).where(
                s.c.session_id.in_(ids),
                s.c.version.in_(sorted({self.fc_version, scoring.FC_VERSION})),
                s.c.fc_kind == scoring.FC_KIND,
            )
        ):
            if version == self.fc_version:
                present.add(sid)
            if version == scoring.FC_VERSION:
                existing[sid] = scores_json
        return present, existing

    def _present_profiles(self, conn: Connection, ordered: Sequence[Candidate]) -> dict[str, Mapping[str, Any]]:
        """Existing profiles: the few columns the re-check and scoring read, whole rows where an update needs a
        before-image (decoding every JSON column of every existing profile would cost more than scoring it)."""
        p = profiles
        ids = [c.key for c in ordered]
        found: dict[str, Mapping[str, Any]] = {
            row.session_id: dict(row._mapping)
            for row in conn.execute(
                sa.select(p.c.id, p.c.session_id, p.c.results_version, p.c.submitted_at).where(p.c.session_id.in_(ids))
            )
        }
        rescore = [c.key for c in ordered if _PROFILE_UPDATE in c.operations and c.key in found]
        if rescore:
            for row in conn.execute(sa.select(p).where(p.c.session_id.in_(rescore))):
                found[row.session_id] = dict(row._mapping)
        return found

    def _reference_data(self, conn: Connection, run_id: str) -> scoring.ReferenceData:
        """Reference data with the static tables read once per run (they change only by migration);
        ``scoring_config`` is re-read every batch (one tiny query), so a drifted results_version shows at once."""
        config = {key: value for key, value in conn.execute(sa.select(scoring_config.c.key, scoring_config.c.value))}
        cached = self._reference
        if cached is None or cached[0] != run_id or dict(cached[1].scoring_config) != config:
            cached = self._reference = (run_id, load_reference_data_from_db(conn))
        return cached[1]

    def _recheck(self, candidate: Candidate, fc_present: bool, existing: Mapping[str, Any] | None) -> _Wants:
        """What the candidate still needs under the lock; rows that appeared since the plan are left alone."""
        ops: list[dict[str, Any]] = []
        wants_fc = _FC_INSERT in candidate.operations
        wants_profile = _PROFILE_INSERT in candidate.operations or _PROFILE_UPDATE in candidate.operations
        if wants_fc and fc_present:
            ops.append({"op": _FC_INSERT, "result": "already_present"})
            wants_fc = False
        if _PROFILE_INSERT in candidate.operations and existing is not None:
            ops.append({"op": _PROFILE_INSERT, "result": "already_present"})
            wants_profile = False
        if _PROFILE_UPDATE in candidate.operations and (
            existing is None or existing.get("results_version") == self.engine_version
        ):
            ops.append({"op": _PROFILE_UPDATE, "result": "already_present"})
            wants_profile = False
        return _Wants(wants_fc, wants_profile, existing, ops)

    def _prepare(
        self,
        candidate: Candidate,
        wants: _Wants,
        inputs: scoring.SessionInputs,
        ref: scoring.ReferenceData,
        now: datetime,
        run_id: str,
    ) -> _Pending | SessionOutcome:
        """Scores one session and builds every row it will write (or says why it cannot be written)."""
        sid = candidate.key
        ops = list(wants.ops)
        existing = wants.existing_profile
        try:
            scored = scoring.score_session(inputs, ref, now, existing)
        except DataError as exc:
            return SessionOutcome(sid, "failed", ops, error=f"scoring failed: {_one_line(exc)}")
        problem = _blocking_problem(scored, wants.fc, wants.profile)
        if problem:
            return SessionOutcome(sid, "failed", ops, error=problem)
        if wants.profile and scored.profile_row is not None:
            unknown = sorted(set(scored.profile_row) - set(_PROFILE_COLUMNS))
            if unknown:
                return SessionOutcome(sid, "failed", ops, error=f"profiles has no column(s) {', '.join(unknown)}")
        pending = _Pending(sid, SessionOutcome(sid, "written", ops))
        if wants.fc and scored.fc_scores_row is not None:
            row = {**scored.fc_scores_row, "created_at": now}
            pending.fc_row = {c: row[c] for c in _FC_COLUMNS}
            ops.append({"op": _FC_INSERT, "result": "written", "blocks_answered": row["blocks_answered"]})
        if wants.profile and scored.profile_row is not None:
            if existing is None:
                # Every column is given (absent ones as NULL), so the row stored is exactly the row built here.
                generated = {"id": self._uuids.next(), "share_token": self._uuids.next(), "user_id": None}
                values = {**scored.profile_row, **generated}
                pending.profile_insert = {c: values.get(c) for c in _PROFILE_COLUMNS}
                ops.append({"op": _PROFILE_INSERT, "result": "written"})
            else:
                pending.profile_update = (existing, dict(scored.profile_row))
                ops.append({"op": _PROFILE_UPDATE, "result": "written"})
        # Events say who wrote them, so the soak can tell backfill rows from live traffic; a session whose scoring
        # logged nothing gets one gatefill_backfill event, so that every session written has at least one.
        for evt, payload in scored.events or [("gatefill_backfill", {})]:
            body: dict[str, Any] = {**payload, "session_id": sid, "source": "gatefill", "run_id": run_id}
            pending.events.append({"evt": evt, "payload": body, "at": now})
        return pending

    def _write_batch(
        self, conn: Connection, pending: Sequence[_Pending], record: ChangeSink | None
    ) -> tuple[dict[str, list[RowChange]], dict[str, SessionOutcome]]:
        """Writes ``pending`` (``_write_chunk``), then hands what was written to ``record``."""
        written, failed = self._write_chunk(conn, pending)
        if record is not None and written:
            record([change for session_changes in written.values() for change in session_changes])
        return written, failed

    def _write_chunk(
        self, conn: Connection, pending: Sequence[_Pending]
    ) -> tuple[dict[str, list[RowChange]], dict[str, SessionOutcome]]:
        """Writes the pending sessions in one savepoint; if that fails, redoes them one savepoint per session so the
        culprit is recorded (a live race as ``already_present``, any other failure as ``failed``) and the rest are
        written. Returns the changes per session written and the outcomes of the sessions that were not."""
        if not pending:
            return {}, {}
        try:
            with conn.begin_nested():
                return self._write(conn, pending), {}
        except sa.exc.StatementError as exc:
            _raise_if_disconnected(exc)
            if len(pending) == 1:
                return {}, {pending[0].key: _write_failure(pending[0], exc)}
        changes: dict[str, list[RowChange]] = {}
        failed: dict[str, SessionOutcome] = {}
        for p in pending:
            try:
                with conn.begin_nested():
                    changes.update(self._write(conn, [p]))
            except sa.exc.StatementError as exc:
                _raise_if_disconnected(exc)
                failed[p.key] = _write_failure(p, exc)
        return changes, failed

    def _write(self, conn: Connection, pending: Sequence[_Pending]) -> dict[str, list[RowChange]]:
        """The rows of ``pending`` written with one bulk statement per table; the changes they made."""
        insert_rows(conn, fc_scores, [p.fc_row for p in pending if p.fc_row is not None])
        insert_rows(conn, profiles, [p.profile_insert for p in pending if p.profile_insert is not None])
        updated: dict[str, Mapping[str, Any]] = {}
        for p in pending:
            if p.profile_update is not None:
                existing, values = p.profile_update
                conn.execute(profiles.update().where(profiles.c.id == existing["id"]).values(**values))
                updated[str(existing["id"])] = existing
        after_update: dict[str, dict[str, Any]] = {}
        if updated:
            # An UPDATE fires the updated_at trigger: the stored row is read back rather than assumed.
            for stored in conn.execute(sa.select(profiles).where(profiles.c.id.in_(sorted(updated)))):
                after_update[str(stored.id)] = _plain(dict(stored._mapping))
        ids = self._insert_events(conn, [e for p in pending for e in p.events])
        changes: dict[str, list[RowChange]] = {}
        next_id = iter(ids)
        for p in pending:
            out = changes[p.key] = []
            if p.fc_row is not None:
                fc = p.fc_row
                key = {"session_id": p.key, "version": fc["version"], "fc_kind": fc["fc_kind"]}
                out.append(RowChange("fc_scores", key, None, _plain(fc), p.key))
            if p.profile_insert is not None:
                inserted = p.profile_insert
                out.append(RowChange("profiles", {"id": inserted["id"]}, None, _profile_image(inserted), p.key))
            if p.profile_update is not None:
                existing, _ = p.profile_update
                pid = str(existing["id"])
                out.append(RowChange("profiles", {"id": pid}, _plain(existing), after_update[pid], p.key))
            for event in p.events:
                new_id = next(next_id)
                after = {"id": new_id, "evt": event["evt"], "payload": event["payload"], "at": event["at"].isoformat()}
                out.append(RowChange("fn_logs", {"id": new_id}, None, after, p.key))
        return changes

    def _insert_events(self, conn: Connection, events: Sequence[Mapping[str, Any]]) -> Sequence[int]:
        """Inserts the fn_logs rows of ``events``; their ids, in order.

        On Postgres the ids are drawn from the id column's own sequence first and the rows go in with one COPY
        (``insert_rows``); an id column without a sequence, or one that refuses given values (GENERATED ALWAYS),
        gets a multi-row INSERT ... RETURNING instead.
        """
        if not events:
            return ()
        sequence = self._event_id_sequence(conn) if conn.dialect.name == "postgresql" else None
        if sequence is None:
            returning = fn_logs.insert().returning(fn_logs.c.id, sort_by_parameter_order=True)
            return conn.execute(returning, list(events)).scalars().all()
        ids = (
            conn.execute(
                sa.text("SELECT nextval(CAST(:sequence AS regclass)) FROM generate_series(1, :n)"),
                {"sequence": sequence, "n": len(events)},
            )
            .scalars()
            .all()
        )
        insert_rows(conn, fn_logs, [{"id": new_id, **event} for new_id, event in zip(ids, events, strict=True)])
        return ids

    def _event_id_sequence(self, conn: Connection) -> str | None:
        """The sequence behind ``fn_logs.id`` if rows may be given their id (looked up once per database)."""
        database = conn.engine.url.render_as_string(hide_password=True)
        if database not in self._fn_logs_sequence:
            row = conn.execute(
                sa.text(
                    "SELECT pg_get_serial_sequence('fn_logs', 'id'), a.attidentity FROM pg_attribute a "
                    "WHERE a.attrelid = CAST('fn_logs' AS regclass) AND a.attname = 'id'"
                )
            ).one()
            self._fn_logs_sequence[database] = row[0] if row[1] != "a" else None
        return self._fn_logs_sequence[database]


@dataclass
class _Wants:
    """What one candidate still needs after the locked re-check, and the operations already found present."""

    fc: bool
    profile: bool
    existing_profile: Mapping[str, Any] | None
    ops: list[dict[str, Any]]

    @property
    def nothing(self) -> bool:
        return not self.fc and not self.profile


@dataclass
class _Pending:
    """One scored session whose rows are built and about to be written, with the outcome it has if they are."""

    key: str
    outcome: SessionOutcome
    fc_row: dict[str, Any] | None = None
    profile_insert: dict[str, Any] | None = None
    profile_update: tuple[Mapping[str, Any], dict[str, Any]] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


class _RandomUUIDs:
    """Random (version 4) UUID strings, from ``os.urandom`` a thousand at a time.

    ``uuid.uuid4()`` reads ``os.urandom`` once per id, and that call releases the GIL: with the batch's database
    thread busy in Python, each release cost a thread switch, a tenth of the apply's wall time. The randomness is
    the same (the operating system's CSPRNG), so these serve as profile ids and share tokens alike.
    """

    _DRAW = 1024

    def __init__(self) -> None:
        self._ready: list[str] = []
        self._pid = os.getpid()

    def next(self) -> str:
        if self._pid != os.getpid():
            # A forked child must not hand out the ids its parent holds.
            self._ready, self._pid = [], os.getpid()
        if not self._ready:
            raw = os.urandom(16 * self._DRAW)
            self._ready = [str(uuid.UUID(bytes=raw[i : i + 16], version=4)) for i in range(0, len(raw), 16)]
        return self._ready.pop()


#: Sessions whose inputs are loaded by one query (and held at once).
_LOAD_CHUNK = 250
_FC_COLUMNS: tuple[str, ...] = tuple(c.name for c in fc_scores.columns)
_PROFILE_COLUMNS: tuple[str, ...] = tuple(c.name for c in profiles.columns)
_PROFILE_TIMESTAMPS = frozenset(c.name for c in profiles.columns if isinstance(c.type, UTCTimestamp))
_PROFILE_FLOATS = frozenset(c.name for c in profiles.columns if isinstance(c.type, sa.Float))


def _profile_image(row: Mapping[str, Any]) -> dict[str, Any]:
    """The after-image of a profile this job inserted, in the form a read-back gives: timestamps as ISO text of
    the UTC instant, float columns as floats (the engine may hand over an int), JSON values as written."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if value is None:
            out[name] = None
        elif name in _PROFILE_TIMESTAMPS:
            instant = parse_utc(value) if isinstance(value, str) else value
            out[name] = instant.astimezone(UTC).isoformat() if isinstance(instant, datetime) else instant
        elif name in _PROFILE_FLOATS and isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
        else:
            out[name] = value
    return out


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector for one batch (reference counting still frees everything).

    A batch allocates a few hundred thousand short-lived, acyclic containers (answer rows, rows to write, images);
    each time they trip the collector's thresholds it walks every long-lived object of the process, the whole plan
    included, which measured at a third of a millisecond per session. Whatever cyclic garbage a batch makes is
    collected once the collector runs again; a caller that had paused it keeps it paused.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _raise_if_disconnected(exc: sa.exc.StatementError) -> None:
    """A lost connection is not a session's failure: it aborts the batch, which apply retries as a whole."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        raise exc


def _is_unique_violation(exc: sa.exc.StatementError) -> bool:
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else None
    # SQLSTATE 23505 (Postgres) or SQLite's extended result code; other constraint failures are not races.
    return getattr(orig, "sqlstate", None) == "23505" or getattr(orig, "sqlite_errorname", None) in (
        "SQLITE_CONSTRAINT_UNIQUE",
        "SQLITE_CONSTRAINT_PRIMARYKEY",
    )


def _write_failure(p: _Pending, exc: sa.exc.StatementError) -> SessionOutcome:
    """The outcome of a session whose own writes failed (they were rolled back to its savepoint)."""
    ops = [op if op.get("result") != "written" else {**op, "result": "not_written"} for op in p.outcome.operations]
    reason = _one_line(exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc)
    seconds = p.outcome.seconds
    if isinstance(exc, IntegrityError) and _is_unique_violation(exc):
        # A live writer inserted the same row between our re-check and our insert: theirs stands.
        return SessionOutcome(p.key, "already_present", ops, f"raced by a live writer: {reason}", seconds)
    return SessionOutcome(p.key, "failed", ops, f"write failed: {reason}", seconds)


# One row per session, in the order of ``:ids``: its answers in question order and its FC answers in (answered_at,
# block_id) order, as two arrays each (the orders ``load_session_inputs`` reads them in). A lateral subquery per
# session is one index range scan on uniq_session_question / fc_responses_pkey, where a GROUP BY over the whole
# chunk would sort every answer row of it first.
_PG_INPUTS = sa.text(
    """
    SELECT c.id::text AS session_id, a.qids, a.vals, f.blocks, f.options
    FROM unnest(CAST(:ids AS uuid[])) AS c(id)
    CROSS JOIN LATERAL (
        SELECT array_agg(r.question_id ORDER BY r.question_id) AS qids,
               array_agg(r.answer_value ORDER BY r.question_id) AS vals
        FROM assessment_responses r WHERE r.session_id = c.id) a
    CROSS JOIN LATERAL (
        SELECT array_agg(f.block_id::text ORDER BY f.answered_at, f.block_id) AS blocks,
               array_agg(f.option_id::text ORDER BY f.answered_at, f.block_id) AS options
        FROM fc_responses f WHERE f.session_id = c.id) f
    """
).bindparams(sa.bindparam("ids", type_=pg.ARRAY(sa.Text)))


def _lock_sessions(conn: Connection, ids: Sequence[str]) -> set[str]:
    """Locks the batch's session rows and returns the ids that still exist."""
    # Lock order = id order, the same order the functions server's single-session locks fall into.
    return set(
        conn.execute(
            sa.select(assessment_sessions.c.id)
            .where(assessment_sessions.c.id.in_(ids))
            .order_by(assessment_sessions.c.id)
            .with_for_update()
        ).scalars()
    )


def _batch_outcome(
    ordered: Sequence[Candidate],
    results: Mapping[str, SessionOutcome],
    changes: Mapping[str, list[RowChange]],
    shared: float,
) -> BatchOutcome:
    """The batch's outcome in key order, each session charged its share of the batch's shared work."""
    outcome = BatchOutcome()
    for candidate in ordered:
        session = results[candidate.key]
        session.seconds = (session.seconds or 0.0) + shared
        outcome.sessions.append(session)
        outcome.changes.extend(changes.get(candidate.key, ()))
    return outcome


def _load_inputs(
    conn: Connection, ids: Sequence[str], existing_fc: Mapping[str, object]
) -> dict[str, scoring.SessionInputs]:
    """The scoring inputs of ``ids``, equal to ``service.load_session_inputs`` (the functions' own reader).

    On Postgres one query reads them, per session two arrays of answers and two of FC answers, ids as text: ~250
    answer rows per session would otherwise cost more to decode, row by row into UUID objects, than scoring them.
    JIT is off for the rest of the transaction: the planner prices these per-session index scans high enough to
    compile them, which costs more than running them. A session whose answers repeat a question (possible only
    without ``uniq_session_question``) is re-read by ``load_session_inputs`` itself, which picks the latest answer
    as upstream did. SQLite, local and cheap per row, uses that reader for everything.
    """
    if conn.dialect.name != "postgresql":
        return load_session_inputs(conn, ids)
    conn.exec_driver_sql("SET LOCAL jit = off")
    out: dict[str, scoring.SessionInputs] = {}
    repeated: list[str] = []
    for sid, qids, values, blocks, options in conn.execute(_PG_INPUTS, {"ids": list(ids)}):
        qids, values = qids or [], values or []
        if len(set(qids)) != len(qids):
            repeated.append(sid)
            continue
        answers = [{"question_id": q, "answer_value": v} for q, v in zip(qids, values, strict=True)]
        fc = [{"block_id": b, "option_id": o} for b, o in zip(blocks or (), options or (), strict=True)]
        out[sid] = scoring.SessionInputs(sid, answers, fc, existing_fc.get(sid))
    if repeated:
        out.update(load_session_inputs(conn, repeated))
    return out


def _blocking_problem(scored: scoring.SessionScore, wants_fc: bool, wants_profile: bool) -> str | None:
    if wants_fc and scored.fc_scores_row is None:
        return "no fc_scores row can be written: " + (", ".join(scored.findings) or "no FC responses")
    if wants_profile and scored.profile_row is None:
        return "no profile can be written: " + (", ".join(scored.findings) or "no answers")
    return None


def _finding_detail(f: Finding) -> dict[str, Any]:
    return {
        "status": f.status,
        "answers": f.answers,
        "fc_answers": f.fc_answers,
        "fc_resolved": f.fc_resolved,
        "has_fc": f.has_fc,
        "has_profile": f.has_profile,
        "profile_version": f.profile_version,
    }


def _all_privileges(table: str, *privileges: str) -> str:
    """SQL that is true only when the current user holds every one of ``privileges`` on ``table`` (both constants)."""
    return "(" + " AND ".join(f"has_table_privilege(current_user, '{table}', '{p}')" for p in privileges) + ")"


def _write_privileges(conn: Connection) -> Check:
    if conn.dialect.name != "postgresql":
        return Check(
            "write_privileges",
            NOT_APPLICABLE,
            f"{conn.dialect.name} has no roles, privileges or row-level security: there is nothing to check",
            {"dialect": conn.dialect.name},
        )
    row = conn.execute(
        sa.text(
            "SELECT current_user AS who, r.rolsuper, r.rolbypassrls, "
            # One privilege per call: with a list, has_table_privilege is true when ANY of them is held.
            f"{_all_privileges('fc_scores', 'INSERT', 'UPDATE', 'DELETE')} AS fc_ok, "
            f"{_all_privileges('profiles', 'INSERT', 'UPDATE', 'DELETE')} AS profiles_ok, "
            f"{_all_privileges('fn_logs', 'INSERT', 'DELETE')} AS logs_ok, "
            "(SELECT relrowsecurity FROM pg_class WHERE oid = 'profiles'::regclass) AS rls_on, "
            "pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = 'profiles'::regclass), 'MEMBER') "
            "AS owns FROM pg_roles r WHERE r.rolname = current_user"
        )
    ).one()
    passes_rls = bool(row.rolsuper or row.rolbypassrls or row.owns or not row.rls_on)
    ok = bool(row.fc_ok and row.profiles_ok and row.logs_ok and passes_rls)
    return Check(
        "write_privileges",
        "PASS" if ok else "FAIL",
        f"{row.who}: privileges {'ok' if row.fc_ok and row.profiles_ok and row.logs_ok else 'MISSING'}, "
        f"RLS {'bypassed' if passes_rls else 'would filter writes'}",
        dict(row._mapping),
        "has_table_privilege(...) per privilege on fc_scores/profiles/fn_logs; rolsuper/rolbypassrls/table owner vs "
        "relrowsecurity",
    )


def _count_stamped(conn: Connection, run_id: str, table: sa.Table, ok: sa.ColumnElement[bool]) -> tuple[int, int]:
    """Rows of ``table`` for the sessions whose row of it the run changed (as the ledger lists them), and how many of
    them are stamped as ``ok`` says; read a page of sessions at a time."""
    total = good = 0
    for page in ledger.change_pages(conn, run_id, table=table.name):
        sessions = sorted({c.candidate for c in page if c.candidate})
        n, k = conn.execute(
            sa.select(sa.func.count(), sa.func.count().filter(ok)).where(
                sa.cast(table.c.session_id, sa.Text).in_(sessions)
            )
        ).one()
        total, good = total + n, good + k
    return total, good


def stamp_check(conn: Connection, run_id: str, fc_version: str, engine_version: str) -> Check:
    """Re-counts, in the database, the version stamps of the rows a run wrote (as the ledger lists them)."""
    fc_ok_when = sa.and_(fc_scores.c.version == fc_version, fc_scores.c.fc_kind == scoring.FC_KIND)
    fc_total, fc_ok = _count_stamped(conn, run_id, fc_scores, fc_ok_when)
    p_ok_when = sa.and_(profiles.c.results_version == engine_version, profiles.c.version == engine_version)
    p_total, p_ok = _count_stamped(conn, run_id, profiles, p_ok_when)
    ok = fc_total == fc_ok and p_total == p_ok
    summary = (
        f"fc_scores {fc_ok}/{fc_total} stamped {fc_version}/{scoring.FC_KIND}; "
        f"profiles {p_ok}/{p_total} stamped {engine_version}"
    )
    verdict = "PASS" if ok else "FAIL"
    if fc_total + p_total == 0:
        verdict = NOT_APPLICABLE
        summary = "no fc_scores or profiles row of the run's sessions is present: no stamp to check"
    return Check(
        "version_stamps",
        verdict,
        summary,
        {"fc_scores": {"rows": fc_total, "correct": fc_ok}, "profiles": {"rows": p_total, "correct": p_ok}},
        "rows of the run's sessions (its ledger change sets) re-read from fc_scores/profiles with their stamps",
    )
