"""The PRISM backfill as a gatefill Job: recreate missing v1.2 ``functions`` fc_scores and v1.2.1 profiles.

A candidate's ``operations`` are derived from its discovery category by ``operations_for``, which both the plan (to
count expected changes and calls) and apply (to decide what to write) use. ``process_batch`` runs inside the caller's
transaction: it locks the batch's session rows (so a live finalize of the same session waits, or is waited for),
re-reads what exists under that lock, loads every input with one query per table, scores each session through
``scoring.score_session`` (the code path of the functions server too), and writes each session inside a savepoint, so
one failing session is recorded and the rest of the batch still commits. Rows that appeared since the plan (live
traffic) are left alone and reported ``already_present``; nothing is overwritten unless the plan says rescore.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from gatefill.job import BatchOutcome, Candidate, Check, RowChange, SessionOutcome, WrittenTable
from gatefill.prism import scoring
from gatefill.prism.discovery import Finding, discover
from gatefill.prism.schema import (
    PRISM_TABLES,
    assessment_sessions,
    fc_blocks,
    fc_options,
    fc_scores,
    fn_logs,
    missing_columns,
    profiles,
    scoring_config,
)
from gatefill.prism.service import load_reference_data_from_db, load_session_inputs

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


class PrismJob:
    """The PRISM fc_scores + profiles backfill."""

    name = "prism"

    def __init__(self, *, fc_version: str = scoring.FC_VERSION, engine_version: str = scoring.ENGINE_VERSION) -> None:
        self.fc_version = fc_version
        self.engine_version = engine_version

    @property
    def versions(self) -> Mapping[str, str]:
        return {"fc_version": self.fc_version, "fc_kind": scoring.FC_KIND, "engine_version": self.engine_version}

    def post_checks(self, conn: Connection, run_id: str) -> list[Check]:
        """After apply: the version stamps of every row this run wrote, re-counted in the database."""
        return [stamp_check(conn, run_id, self.fc_version, self.engine_version)]

    def written_tables(self) -> Sequence[WrittenTable]:
        return (
            WrittenTable("fc_scores", ("session_id", "version", "fc_kind"), fc_scores),
            WrittenTable("profiles", ("id",), profiles),
            WrittenTable("fn_logs", ("id",), fn_logs),
        )

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
        self, conn: Connection, candidates: Sequence[Candidate], *, now: datetime, run_id: str
    ) -> BatchOutcome:
        ids = sorted(c.key for c in candidates)
        outcome = BatchOutcome()
        if not ids:
            return outcome
        # Lock order = id order, the same order the functions server's single-session locks fall into.
        sessions = {
            row.id: row
            for row in conn.execute(
                sa.select(assessment_sessions.c.id, assessment_sessions.c.user_id, assessment_sessions.c.status)
                .where(assessment_sessions.c.id.in_(ids))
                .order_by(assessment_sessions.c.id)
                .with_for_update()
            )
        }
        present_fc = {
            row.session_id: dict(row._mapping)
            for row in conn.execute(
                sa.select(fc_scores).where(
                    fc_scores.c.session_id.in_(ids),
                    fc_scores.c.version == self.fc_version,
                    fc_scores.c.fc_kind == scoring.FC_KIND,
                )
            )
        }
        present_profiles = {
            row.session_id: dict(row._mapping)
            for row in conn.execute(sa.select(profiles).where(profiles.c.session_id.in_(ids)))
        }
        inputs = load_session_inputs(conn, ids)
        ref = load_reference_data_from_db(conn)
        for candidate in sorted(candidates, key=lambda c: c.key):
            started = time.perf_counter()
            if candidate.key not in sessions:
                outcome.sessions.append(SessionOutcome(candidate.key, "failed", error="session no longer exists"))
                continue
            result = self._process_one(
                conn, candidate, inputs[candidate.key], ref, present_fc, present_profiles, now, run_id, outcome
            )
            result.seconds = time.perf_counter() - started
            outcome.sessions.append(result)
        return outcome

    def _process_one(
        self,
        conn: Connection,
        candidate: Candidate,
        inputs: scoring.SessionInputs,
        ref: scoring.ReferenceData,
        present_fc: Mapping[str, Mapping[str, Any]],
        present_profiles: Mapping[str, Mapping[str, Any]],
        now: datetime,
        run_id: str,
        outcome: BatchOutcome,
    ) -> SessionOutcome:
        sid = candidate.key
        ops: list[dict[str, Any]] = []
        wants_fc = _FC_INSERT in candidate.operations
        wants_profile = _PROFILE_INSERT in candidate.operations or _PROFILE_UPDATE in candidate.operations
        existing_profile = present_profiles.get(sid)
        fc_present = sid in present_fc
        if wants_fc and fc_present:
            ops.append({"op": _FC_INSERT, "result": "already_present"})
            wants_fc = False
        if _PROFILE_INSERT in candidate.operations and existing_profile is not None:
            ops.append({"op": _PROFILE_INSERT, "result": "already_present"})
            wants_profile = False
        if _PROFILE_UPDATE in candidate.operations and (
            existing_profile is None or existing_profile.get("results_version") == self.engine_version
        ):
            ops.append({"op": _PROFILE_UPDATE, "result": "already_present"})
            wants_profile = False
        if not wants_fc and not wants_profile:
            return SessionOutcome(sid, "already_present", ops)

        scored = scoring.score_session(inputs, ref, now, existing_profile)
        problem = _blocking_problem(scored, wants_fc, wants_profile)
        if problem:
            return SessionOutcome(sid, "failed", ops, error=problem)

        changes: list[RowChange] = []
        try:
            with conn.begin_nested():
                if wants_fc and scored.fc_scores_row is not None:
                    row = {**scored.fc_scores_row, "created_at": now}
                    conn.execute(fc_scores.insert().values(**row))
                    key = {"session_id": sid, "version": row["version"], "fc_kind": row["fc_kind"]}
                    changes.append(RowChange("fc_scores", key, None, _plain(row), sid))
                    ops.append({"op": _FC_INSERT, "result": "written", "blocks_answered": row["blocks_answered"]})
                if wants_profile and scored.profile_row is not None:
                    changes.append(self._write_profile(conn, sid, scored.profile_row, existing_profile, now))
                    ops.append(
                        {"op": _PROFILE_INSERT if existing_profile is None else _PROFILE_UPDATE, "result": "written"}
                    )
                events: list[tuple[str, Mapping[str, object]]] = [*scored.events, ("gatefill_backfill", {})]
                for evt, payload in events:
                    # Events say who wrote them, so the soak can tell backfill rows from live traffic.
                    body: dict[str, Any] = {**payload, "session_id": sid, "source": "gatefill", "run_id": run_id}
                    new_id = conn.execute(
                        fn_logs.insert().values(evt=evt, payload=body, at=now).returning(fn_logs.c.id)
                    ).scalar_one()
                    changes.append(
                        RowChange(
                            "fn_logs",
                            {"id": new_id},
                            None,
                            {"id": new_id, "evt": evt, "payload": body, "at": now.isoformat()},
                            sid,
                        )
                    )
        except IntegrityError as exc:
            # A live writer inserted the same row between our re-check and our insert: theirs stands.
            return SessionOutcome(
                sid, "already_present", ops, error=f"raced by a live writer: {str(exc.orig).splitlines()[0]}"
            )
        outcome.changes.extend(changes)
        return SessionOutcome(sid, "written", ops)

    def _write_profile(
        self,
        conn: Connection,
        sid: str,
        profile_row: Mapping[str, Any],
        existing: Mapping[str, Any] | None,
        now: datetime,
    ) -> RowChange:
        if existing is None:
            row = {**profile_row, "id": str(uuid.uuid4()), "share_token": str(uuid.uuid4()), "user_id": None}
            conn.execute(profiles.insert().values(**row))
            after = conn.execute(sa.select(profiles).where(profiles.c.id == row["id"])).one()
            return RowChange("profiles", {"id": row["id"]}, None, _plain(dict(after._mapping)), sid)
        conn.execute(profiles.update().where(profiles.c.id == existing["id"]).values(**profile_row))
        after = conn.execute(sa.select(profiles).where(profiles.c.id == existing["id"])).one()
        return RowChange("profiles", {"id": existing["id"]}, _plain(existing), _plain(dict(after._mapping)), sid)


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


def _write_privileges(conn: Connection) -> Check:
    if conn.dialect.name != "postgresql":
        return Check(
            "write_privileges",
            "PASS",
            "SQLite: the file is writable by this process (no roles or RLS)",
            {"dialect": conn.dialect.name},
        )
    row = conn.execute(
        sa.text(
            "SELECT current_user AS who, r.rolsuper, r.rolbypassrls, "
            "has_table_privilege(current_user, 'fc_scores', 'INSERT,UPDATE,DELETE') AS fc_ok, "
            "has_table_privilege(current_user, 'profiles', 'INSERT,UPDATE,DELETE') AS profiles_ok, "
            "has_table_privilege(current_user, 'fn_logs', 'INSERT,DELETE') AS logs_ok, "
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
        "has_table_privilege(...) on fc_scores/profiles/fn_logs; rolsuper/rolbypassrls/table owner vs relrowsecurity",
    )


def stamp_check(conn: Connection, run_id: str, fc_version: str, engine_version: str) -> Check:
    """Re-counts, in the database, the version stamps of the rows a run wrote (as the ledger lists them)."""
    changes = sa.table("gatefill_changes", sa.column("run_id"), sa.column("table_name"), sa.column("session_id"))
    fc_sessions = sa.select(changes.c.session_id).where(changes.c.run_id == run_id, changes.c.table_name == "fc_scores")
    profile_sessions = sa.select(changes.c.session_id).where(
        changes.c.run_id == run_id, changes.c.table_name == "profiles"
    )
    fc_total, fc_ok = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.count().filter(sa.and_(fc_scores.c.version == fc_version, fc_scores.c.fc_kind == scoring.FC_KIND)),
        ).where(sa.cast(fc_scores.c.session_id, sa.Text).in_(fc_sessions))
    ).one()
    p_total, p_ok = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.count().filter(
                sa.and_(profiles.c.results_version == engine_version, profiles.c.version == engine_version)
            ),
        ).where(sa.cast(profiles.c.session_id, sa.Text).in_(profile_sessions))
    ).one()
    ok = fc_total == fc_ok and p_total == p_ok
    return Check(
        "version_stamps",
        "PASS" if ok else "FAIL",
        f"fc_scores {fc_ok}/{fc_total} stamped {fc_version}/{scoring.FC_KIND}; "
        f"profiles {p_ok}/{p_total} stamped {engine_version}",
        {"fc_scores": {"rows": fc_total, "correct": fc_ok}, "profiles": {"rows": p_total, "correct": p_ok}},
        "rows of the run's sessions (gatefill_changes) re-read from fc_scores/profiles with their stamps",
    )
