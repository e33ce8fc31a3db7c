"""What the PRISM job and the platform both read from the PRISM tables: a session's scoring inputs, the reference data
scoring needs, and a share token's stored hash. The job reads sessions exactly as the functions do, from one place."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill.prism import scoring
from gatefill.prism.schema import (
    assessment_responses,
    assessment_scoring_key,
    calibration_model,
    fc_options,
    fc_responses,
    fc_scores,
    scoring_config,
    type_prototypes,
)

__all__ = [
    "StaticReference",
    "load_reference_data_from_db",
    "load_scoring_config",
    "load_session_inputs",
    "load_static_reference",
    "token_hash",
]


def token_hash(token: str | None) -> str:
    """The sha256 hex of a share token as results_token_access_logs stores it (no token → hash of '')."""
    return hashlib.sha256((token or "").encode("utf-8")).hexdigest()


def load_reference_data_from_db(
    conn: Connection, *, config_override: Mapping[str, object] | None = None
) -> scoring.ReferenceData:
    """``scoring.ReferenceData`` from the database's reference tables, as score_prism reads them (spec §4.1).

    ``calibration_model`` rows of version v1.2.1 become the knots lookup keyed by ``(stratum.dim_band,
    stratum.overlay)``, the latest ``trained_at`` winning; ``config_override`` replaces scoring_config keys.
    """
    static = load_static_reference(conn)
    config = load_scoring_config(conn)
    if config_override:
        config.update(config_override)
    return static.build(config)


def load_session_inputs(
    conn: Connection, session_ids: Sequence[str], *, with_fc_responses: bool = True
) -> dict[str, scoring.SessionInputs]:
    """The stored scoring inputs of each session, one query per table.

    Answers come in question order and FC responses in (answered_at, block_id) order: stable stand-ins for upstream's
    unordered reads (integer answers and weights sum exactly in any order). ``uniq_session_question`` makes a
    question's answer unique, so only ``question_id`` and ``answer_value`` are read (``id`` and ``created_at``
    matter only to pick the latest of several answers, and decoding them doubled the cost of this read); a session
    that nonetheless has repeated questions is re-read with both, in (created_at, id) order, so the latest answer
    still wins exactly as upstream picks it. ``existing_fc_scores`` is the v1.2/functions ``scores_json`` or None.
    """
    ids = list(dict.fromkeys(session_ids))
    if not ids:
        return {}
    answers = _answers(conn, ids)
    fc_rows = _fc_responses(conn, ids) if with_fc_responses else {sid: [] for sid in ids}
    existing = _existing_fc_scores(conn, ids)
    return {
        sid: scoring.SessionInputs(
            session_id=sid, answers=answers[sid], fc_responses=fc_rows[sid], existing_fc_scores=existing.get(sid)
        )
        for sid in ids
    }


def _answers(conn: Connection, ids: Sequence[str]) -> dict[str, list[dict[str, object]]]:
    """Each session's answers in question order, with the sessions that repeat a question re-read in full."""
    r = assessment_responses
    answers: dict[str, list[dict[str, object]]] = {sid: [] for sid in ids}
    repeated: set[str] = set()
    last: tuple[object, object] = (None, None)
    for sid, qid, value in conn.execute(
        sa.select(r.c.session_id, r.c.question_id, r.c.answer_value)
        .where(r.c.session_id.in_(ids))
        .order_by(r.c.session_id, r.c.question_id)
    ):
        if (sid, qid) == last:
            repeated.add(sid)
        last = (sid, qid)
        answers[sid].append({"question_id": qid, "answer_value": value})
    if repeated:
        _reread_repeated(conn, answers, repeated)
    return answers


def _reread_repeated(conn: Connection, answers: dict[str, list[dict[str, object]]], repeated: set[str]) -> None:
    """Replaces the answers of sessions that repeat a question with every answer, in (created_at, id) order."""
    r = assessment_responses
    for sid in repeated:
        answers[sid] = []
    for row in conn.execute(
        sa.select(r.c.session_id, r.c.id, r.c.question_id, r.c.answer_value, r.c.created_at)
        .where(r.c.session_id.in_(sorted(repeated)))
        .order_by(r.c.session_id, r.c.created_at, r.c.id)
    ):
        answers[row.session_id].append(
            {
                "id": row.id,
                "question_id": row.question_id,
                "answer_value": row.answer_value,
                "created_at": row.created_at,
            }
        )


def _fc_responses(conn: Connection, ids: Sequence[str]) -> dict[str, list[dict[str, object]]]:
    """Each session's FC responses in (answered_at, block_id) order."""
    f = fc_responses
    fc_rows: dict[str, list[dict[str, object]]] = {sid: [] for sid in ids}
    for fc_row in conn.execute(
        sa.select(f.c.session_id, f.c.block_id, f.c.option_id)
        .where(f.c.session_id.in_(ids))
        .order_by(f.c.session_id, f.c.answered_at, f.c.block_id)
    ):
        fc_rows[fc_row.session_id].append({"block_id": fc_row.block_id, "option_id": fc_row.option_id})
    return fc_rows


def _existing_fc_scores(conn: Connection, ids: Sequence[str]) -> dict[str, object]:
    """The v1.2/functions ``scores_json`` of the sessions that have one."""
    s = fc_scores
    existing: dict[str, object] = {}
    for score_row in conn.execute(
        sa.select(s.c.session_id, s.c.scores_json).where(
            s.c.session_id.in_(ids), s.c.version == scoring.FC_VERSION, s.c.fc_kind == scoring.FC_KIND
        )
    ):
        existing[score_row.session_id] = score_row.scores_json
    return existing


@dataclass(frozen=True)
class StaticReference:
    """The reference tables that change only by migration: scoring key, FC options, prototypes, calibration knots."""

    key_rows: tuple[scoring.KeyRow, ...]
    options: dict[object, object]
    prototypes: list[tuple[object, object, object]]
    knots: dict[tuple[str, str], Sequence[Any]]

    def build(self, config: Mapping[str, object]) -> scoring.ReferenceData:
        return scoring.ReferenceData(
            scoring_key=self.key_rows,
            fc_options=self.options,
            scoring_config=dict(config),
            type_prototypes=self.prototypes,
            calibration_knots=self.knots,
        )


def load_static_reference(conn: Connection) -> StaticReference:
    k = assessment_scoring_key
    key_rows = tuple(
        scoring.KeyRow(
            question_id=int(row.question_id),
            scale_type=row.scale_type,
            tag=row.tag,
            reverse_scored=bool(row.reverse_scored),
            pair_group=row.pair_group,
            social_desirability=bool(row.social_desirability),
            fc_map=row.fc_map,
            weight=float(row.weight) if row.weight is not None else 1.0,
        )
        for row in conn.execute(sa.select(k).order_by(k.c.question_id))
    )
    options = {row.id: row.weights_json for row in conn.execute(sa.select(fc_options.c.id, fc_options.c.weights_json))}
    t = type_prototypes
    prototypes = [
        (row.type_code, row.func, row.block)
        for row in conn.execute(sa.select(t.c.type_code, t.c.func, t.c.block).order_by(t.c.type_code, t.c.func))
    ]
    c = calibration_model
    knots: dict[tuple[str, str], Sequence[Any]] = {}
    # Ascending trained_at, so the latest model of a stratum is the one left in the map (upstream: latest first).
    for row in conn.execute(
        sa.select(c.c.stratum, c.c.knots).where(c.c.version == scoring.ENGINE_VERSION).order_by(c.c.trained_at)
    ):
        stratum = row.stratum
        if (
            isinstance(stratum, Mapping)
            and "dim_band" in stratum
            and "overlay" in stratum
            and isinstance(row.knots, list)
        ):
            knots[(str(stratum["dim_band"]), str(stratum["overlay"]))] = row.knots
    return StaticReference(key_rows, options, prototypes, knots)


def load_scoring_config(conn: Connection) -> dict[str, object]:
    return {row.key: row.value for row in conn.execute(sa.select(scoring_config.c.key, scoring_config.c.value))}
