"""PRISM scoring, re-implemented exactly: the FC tally, the v1.2.1 engine, calibration and the profile row.

This is the system as it ran on 2025-09-17 (spec ``prism-scoring.md`` §7.1):

* ``score_fc_session`` (§2): the forced-choice tally that becomes an ``fc_scores`` row (v1.2, ``functions``).
* ``score_assessment`` (§3.2–3.4, §3.6): the ``@ceea71b`` engine, including the legacy ``fc_map`` branch that derives
  forced-choice strengths from the scoring key when a session has no ``fc_scores`` row.
* ``calibrate`` (§4.3): the confidence recalibration ``score_prism`` applies, with the Platt fallback.
* ``engine_config``, ``latest_answers``, ``build_profile_row`` (§4.1–4.4a): the ``@0e74987`` ``score_prism`` wrapper.
* ``score_session``: the one entry point every gatefill writer uses (tally first, then the profile, as upstream).
* ``score_jsonl``: JSON Lines in and out for ``gatefill score profile|fc|calibrate``.

Results equal the TypeScript ones as JSON values, bit for bit (§7.2). That rests on :mod:`gatefill.prism.jsmath`
(``toFixed``, fdlibm ``exp``/``log2``, ``Number()``, ``String()``), on keeping every summation in the original order,
and on reproducing V8's sort for the 16 types. Where the original relied on JavaScript coercions (a string FC score,
an ``fc_map`` value that is not a function name) the coercion is reproduced rather than rejected, so the same inputs
give the same numbers; inputs on which the original would have thrown raise :class:`ScoringInputError`.

Two upstream defects are deliberately *not* reproduced (§7.3, §7.4): the engine never mutates its input (upstream
flipped reverse-scored answers in place, so a second call gave different numbers), and ``score_session`` never
returns an empty ``fc_scores`` row to write (upstream wrote ``{}``, which halves every strength downstream).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any, Final, TypeAlias

from gatefill.errors import DataError, InputLineError, UsageError
from gatefill.prism.jsmath import (
    UNDEFINED,
    js_dumps,
    js_exp,
    js_key_order,
    js_log2,
    js_number,
    js_string,
    js_to_number,
    js_truthy,
    to_fixed,
)

__all__ = [
    "ENGINE_VERSION",
    "FC_KIND",
    "FC_VERSION",
    "FUNCS",
    "TYPES",
    "Calibration",
    "FcSeed",
    "FcTally",
    "KeyRow",
    "ReferenceData",
    "ScoringInputError",
    "SessionInputs",
    "SessionScore",
    "build_profile_row",
    "calibrate",
    "calibrate_detail",
    "engine_config",
    "latest_answers",
    "load_fc_seed",
    "load_scoring_key",
    "load_type_prototypes",
    "platt_fallback",
    "score_assessment",
    "score_fc_session",
    "score_jsonl",
    "score_session",
    "scoring_config_defaults",
]

FUNCS: Final = ("Ti", "Te", "Fi", "Fe", "Ni", "Ne", "Si", "Se")
# fmt: off
TYPES: Final = (
    "LIE", "ILI", "ESE", "SEI", "LII", "ILE", "ESI", "SEE", "LSE", "SLI", "EIE", "IEI", "LSI", "SLE", "EII", "IEE",
)
# fmt: on
SEATS: Final = ("base", "creative", "role", "vulnerable", "mobilizing", "suggestive", "ignoring", "demonstrative")
ENGINE_VERSION: Final = "v1.2.1"
FC_VERSION: Final = "v1.2"
FC_KIND: Final = "functions"

# The engine's FALLBACK_PROTOTYPES: the function in each seat (SEATS order) per type. Identical to the 128-row DB seed.
_FALLBACK_TABLE: Final = """
LIE Te Ni Se Fi Ti Ne Si Fe
ILI Ni Te Fi Se Ne Ti Fe Si
ESE Fe Si Ne Ti Fi Ni Te Se
SEI Si Fe Ti Ne Ni Fi Se Te
LII Ti Ne Ni Fe Te Si Fi Se
ILE Ne Ti Fe Ni Si Te Se Fi
ESI Fi Se Ni Te Fe Ne Ti Si
SEE Se Fi Te Ni Ne Fe Si Ti
LSE Te Si Se Fi Ti Ne Ni Fe
SLI Si Te Fi Se Ni Ti Fe Ne
EIE Fe Ni Ne Ti Fi Si Te Se
IEI Ni Fe Ti Ne Si Fi Se Te
LSI Ti Se Ni Fe Te Ne Fi Si
SLE Se Ti Fe Ni Ne Te Si Fi
EII Fi Ne Ni Te Fe Si Se Ti
IEE Ne Fi Te Ni Si Fe Se Ti
"""


_SEAT_FUNCS: Final = {line.split()[0]: tuple(line.split()[1:]) for line in _FALLBACK_TABLE.split("\n") if line}

#: type → function → seat, the engine's built-in prototypes (used unless the DB has exactly 128 rows).
FALLBACK_PROTOTYPES: Final = {
    code: {f: seat for f, seat in zip(funcs, SEATS, strict=True)} for code, funcs in _SEAT_FUNCS.items()
}
#: type → (base function, creative function): the engine's TYPE_MAP (never taken from the DB).
TYPE_MAP: Final = {code: (funcs[0], funcs[1]) for code, funcs in _SEAT_FUNCS.items()}

_FUNC_INDEX: Final = {f: i for i, f in enumerate(FUNCS)}
_MAX_SAFE: Final = 9007199254740992  # 2**53: integers up to here convert and print the same in Python and JavaScript

# Object.prototype's property names. A lookup `obj[name]` on a plain JavaScript object finds these even when the
# object does not own them, which the original code hit with answers such as "toString"; see _fc_map_value.
_OBJ_PROTO_NAMES: Final = frozenset(
    {
        "__defineGetter__",
        "__defineSetter__",
        "__lookupGetter__",
        "__lookupSetter__",
        "__proto__",
        "constructor",
        "hasOwnProperty",
        "isPrototypeOf",
        "propertyIsEnumerable",
        "toLocaleString",
        "toString",
        "valueOf",
    }
)

JSONObject: TypeAlias = Mapping[str, object]
Knot: TypeAlias = "tuple[float, float] | Mapping[str, object]"
KnotsLookup: TypeAlias = "Callable[[str, str], Sequence[Knot] | None] | Mapping[tuple[str, str], Sequence[Knot]]"


class ScoringInputError(DataError, ValueError):
    """Input the original code could not have scored (it would have thrown), or a malformed input shape."""


# ====================================================================================================================
# Reference data shipped in the package


@dataclass(frozen=True)
class KeyRow:
    """One ``assessment_scoring_key`` row (the engine reads only scale_type, tag, reverse_scored and fc_map)."""

    question_id: int
    scale_type: str
    tag: str | None
    reverse_scored: bool
    pair_group: str | None
    social_desirability: bool
    fc_map: dict[str, str] | None
    weight: float

    def as_json(self) -> dict[str, object]:
        """The row as ``select("*")`` returns it, i.e. as the engine receives it in ``scoringKey``."""
        return {
            "question_id": self.question_id,
            "scale_type": self.scale_type,
            "tag": self.tag,
            "reverse_scored": self.reverse_scored,
            "pair_group": self.pair_group,
            "social_desirability": self.social_desirability,
            "fc_map": dict(self.fc_map) if self.fc_map is not None else None,
            "weight": self.weight,
        }


@dataclass(frozen=True)
class FcSeed:
    """The v1.2 forced-choice seed: ``fc_blocks`` and ``fc_options`` rows as the JSON gives them."""

    blocks: tuple[dict[str, object], ...]
    options: tuple[dict[str, object], ...]

    def weights_by_option_id(self) -> dict[str, object]:
        """``fc_options.id → weights_json``, the map ``score_fc_session`` resolves responses against."""
        return {str(o["id"]): o.get("weights_json") for o in self.options}


def _data_text(name: str) -> str:
    return resources.files("gatefill.prism").joinpath("data", name).read_text(encoding="utf-8")


@cache
def _scoring_key_rows() -> tuple[KeyRow, ...]:
    rows: list[KeyRow] = []
    try:
        for rec in csv.DictReader(io.StringIO(_data_text("assessment_scoring_key.csv"))):
            fc_map = json.loads(rec["fc_map"]) if rec["fc_map"] else None
            rows.append(
                KeyRow(
                    question_id=int(rec["question_id"]),
                    scale_type=rec["scale_type"],
                    tag=rec["tag"] or None,
                    reverse_scored=rec["reverse_scored"] == "true",
                    pair_group=rec["pair_group"] or None,
                    social_desirability=rec["social_desirability"] == "true",
                    fc_map=fc_map,
                    weight=float(rec["weight"]),
                )
            )
    except (KeyError, ValueError) as exc:
        raise DataError(f"unreadable assessment_scoring_key.csv: {exc}") from exc
    return tuple(rows)


def load_scoring_key() -> dict[str, KeyRow]:
    """The shipped 09-03 scoring key, keyed by ``String(question_id)`` as ``score_prism`` keys it."""
    return {js_string(r.question_id): r for r in _scoring_key_rows()}


@cache
def _fc_seed() -> FcSeed:
    try:
        raw = json.loads(_data_text("fc_seed_v1.2.json"))
        return FcSeed(blocks=tuple(raw["fc_blocks"]), options=tuple(raw["fc_options"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"unreadable fc_seed_v1.2.json: {exc}") from exc


def load_fc_seed() -> FcSeed:
    """The shipped v1.2 FC seed (6 blocks, 24 options)."""
    return _fc_seed()


@cache
def _type_prototypes() -> dict[str, dict[str, str]]:
    try:
        raw = json.loads(_data_text("type_prototypes.json"))
        return {code: {seat: str(func) for seat, func in seats.items()} for code, seats in raw["prototypes"].items()}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"unreadable type_prototypes.json: {exc}") from exc


def load_type_prototypes() -> dict[str, dict[str, str]]:
    """The shipped 128-row ``type_prototypes`` seed as type → seat → function."""
    return {code: dict(seats) for code, seats in _type_prototypes().items()}


def scoring_config_defaults() -> dict[str, object]:
    """``scoring_config`` as seeded before 2025-09-28 (spec §4.2, left column; data model §1.5).

    The first six keys are the seeded values ``score_prism`` and ``calibration.ts`` read. The remaining keys exist in
    the table but no scoring code reads them; their values here are placeholders of the right shape, not seed data.
    """
    return {
        "results_version": ENGINE_VERSION,
        "softmax_temp": 1.0,
        "conf_raw_params": {"a": 0.25, "b": 0.35, "c": 0.2},
        "fit_band_thresholds": {"high_fit": 60, "moderate_fit": 45, "high_gap": 5, "moderate_gap": 2},
        "fc_expected_min": 24,
        "conf_band_cuts": {"high": 0.75, "moderate": 0.55},
        # Placeholders (unused by scoring):
        "dim_thresholds": {"one": 0, "two": 0, "three": 0},
        "neuro_norms": {"mean": 0, "sd": 1},
        "fc_block_map_default": {},
        "fit_bands": {"high": 60, "moderate": 45},
        "fit_calibration": {},
        "enforce_type_guard": False,
        "valid_type_combinations": list(TYPES),
    }


# ====================================================================================================================
# JavaScript property access helpers


def _prop(obj: object, name: str, what: str) -> object:
    """``obj[name]`` with JavaScript semantics; reading a property of null/undefined is the original's TypeError."""
    if isinstance(obj, Mapping):
        return obj.get(name, UNDEFINED)
    if obj is None or obj is UNDEFINED:
        raise ScoringInputError(f"{what} is missing (cannot read '{name}')")
    return UNDEFINED


def _prop_num(obj: object, name: str, what: str) -> float:
    """``obj[name]`` used in arithmetic or a comparison (ToNumber: undefined → NaN, null → 0)."""
    return js_to_number(_prop(obj, name, what))


def _nullish(v: object) -> bool:
    return v is None or v is UNDEFINED


def _js_max(values: Iterable[float]) -> float:
    """``Math.max(...values)``: NaN if any value is NaN (Python's max() depends on the position of a NaN)."""
    best = -math.inf
    for v in values:
        if v != v:
            return v
        if v > best or (v == 0.0 and best == 0.0 and math.copysign(1.0, best) < 0):
            best = v
    return best


def _clamp01(x: float) -> float:
    """``Math.max(0, Math.min(1, x))``: NaN stays NaN, -0 becomes +0."""
    if x != x:
        return x
    if x >= 1.0:
        return 1.0
    if x > 0.0:
        return x
    return 0.0


def _or_zero(x: float) -> float:
    """``x || 0`` for a number."""
    return x if x == x and x != 0.0 else 0.0


# ====================================================================================================================
# score_fc_session (§2)


@dataclass(frozen=True)
class FcTally:
    """What ``score_fc_session`` computed for one session, and whether the original would have written it."""

    blocks_answered: int
    scores: dict[str, float]
    written: bool
    unresolved_option_ids: list[object] = field(default_factory=list)
    basis: str = FC_KIND

    @property
    def empty_scores(self) -> bool:
        """Responses existed but the scores are ``{}``: the original wrote that row; gatefill never does (§7.3)."""
        return self.written and not self.scores

    @property
    def finite(self) -> bool:
        """Every score is a finite number (non-finite ones would be written as JSON null)."""
        return all(v - v == 0.0 for v in self.scores.values())

    @property
    def writable(self) -> bool:
        """The row gatefill may write: the original wrote one, it is not ``{}``, and every score is finite."""
        return self.written and bool(self.scores) and self.finite

    def to_row(self, session_id: str, version: str = FC_VERSION) -> dict[str, object]:
        """The ``fc_scores`` row (UPSERT on session_id, version, fc_kind)."""
        return {
            "session_id": session_id,
            "version": version,
            "fc_kind": self.basis,
            "scores_json": dict(self.scores),
            "blocks_answered": self.blocks_answered,
        }


def _js_own_entries(v: object) -> list[tuple[str, object]]:
    """``Object.keys(v || {})`` with values, for the JSON values a ``weights_json`` column can hold."""
    if type(v) is dict:
        return [(k if type(k) is str else js_string(k), x) for k, x in v.items()]
    if not js_truthy(v):
        return []
    if isinstance(v, Mapping):
        return [(js_string(k), val) for k, val in v.items()]
    if isinstance(v, list | tuple):
        return [(str(i), e) for i, e in enumerate(v)]
    if isinstance(v, str):
        return [(str(i), ch) for i, ch in enumerate(v)]
    return []  # numbers and true have no own enumerable keys


def score_fc_session(
    responses: Sequence[Mapping[str, object]],
    options: Mapping[Any, object],
    basis: object = FC_KIND,
) -> FcTally:
    """Tally one session's forced-choice responses (``fc_responses`` rows, DB order) against ``options``.

    ``options`` maps ``fc_options.id`` to ``weights_json`` for every option of every version, as upstream loads them.
    """
    if not responses:
        return FcTally(blocks_answered=0, scores={}, written=False, basis=js_string(basis))
    tally: dict[str, float] = {}
    # A weight key naming an Object.prototype member makes JavaScript's `tally[k] ?? 0` start from a function, so
    # the sum turns into a string and every score becomes NaN; "__proto__" is silently dropped.
    poisoned: set[str] = set()
    answered = 0
    unresolved: list[object] = []
    for r in responses:
        oid = r.get("option_id", UNDEFINED)
        try:
            found = oid in options
        except TypeError:  # an unhashable id can't match any option id
            found = False
        if not found:
            unresolved.append(oid)
            continue
        answered += 1
        for k, v in _js_own_entries(options[oid]):
            if k in _OBJ_PROTO_NAMES and k not in tally:
                if k != "__proto__":
                    poisoned.add(k)
                    tally[k] = math.nan
                continue
            if k in poisoned:
                continue
            # `Number(w[k]) || 0`; the seed's integer weights take the short way (exact, never NaN or -0).
            x = float(v) if type(v) is int and -_MAX_SAFE <= v <= _MAX_SAFE else _or_zero(js_to_number(v))
            tally[k] = tally.get(k, 0.0) + x
    keys = js_key_order(tally)
    scores: dict[str, float] = {}
    if poisoned:
        scores = dict.fromkeys(keys, math.nan)
    elif basis == "functions":
        top = max([_or_zero(tally[k]) for k in keys] + [1e-9])
        for k in keys:
            scores[k] = to_fixed((tally[k] / top) * 100, 2)
    else:
        total = 0.0
        for k in keys:
            total = total + _or_zero(tally[k])
        total = total if total == total and total != 0.0 else 1e-9
        for k in keys:
            scores[k] = to_fixed(tally[k] / total, 4)
    return FcTally(
        blocks_answered=answered, scores=scores, written=True, unresolved_option_ids=unresolved, basis=js_string(basis)
    )


# ====================================================================================================================
# The engine (§3.2–3.4 and the @ceea71b legacy FC branch of §3.6)

# A compiled key entry: (fc_map or None, reverse_scored, FUNC index | _NO_FUNC | _BAD_TAG).
_KeyInfo: TypeAlias = tuple[Mapping[str, object] | None, bool, int]
_NO_FUNC: Final = -1
_BAD_TAG: Final = -2

_CANONICAL_INT_RE: Final = re.compile(r"-?(?:0|[1-9][0-9]*)")


@dataclass(frozen=True, slots=True)
class _CompiledKey:
    """``scoringKey`` digested for the item pass, looked up by ``String(question_id)`` or directly by an int id."""

    by_str: dict[str, _KeyInfo]
    by_int: dict[int, _KeyInfo]


def _compile_key(scoring_key: Mapping[Any, object]) -> _CompiledKey:
    """Pre-digest ``scoringKey`` into what the item pass needs; entries that can't affect any score are dropped."""
    compiled: dict[str, _KeyInfo] = {}
    for qk, row in scoring_key.items():
        qs = js_string(qk)
        if isinstance(row, KeyRow):
            row = row.as_json()
        if not isinstance(row, Mapping):
            continue  # null is skipped; a truthy primitive has no fc_map or tag, so it has no effect either
        fc_map = row.get("fc_map")
        if not js_truthy(fc_map):
            fc_map = None
        elif not isinstance(fc_map, Mapping):
            raise ScoringInputError(f"scoringKey[{qs}].fc_map must be an object or null")
        func = _NO_FUNC
        tag = row.get("tag", UNDEFINED)
        if js_truthy(tag):
            scale_type = row.get("scale_type", UNDEFINED)
            if not isinstance(tag, str) or not isinstance(scale_type, str):
                func = _BAD_TAG  # `key.tag.substring` / `key.scale_type.startsWith` would throw when reached
            elif scale_type.startswith("LIKERT"):
                func = _FUNC_INDEX.get(tag[:2], _NO_FUNC)  # buckets of non-function tags are never read
        if fc_map is None and func == _NO_FUNC:
            continue
        compiled[qs] = (fc_map, js_truthy(row.get("reverse_scored", UNDEFINED)), func)
    # An int question id i looks up String(i), which is the canonical decimal form of i.
    by_int = {
        int(k): v
        for k, v in compiled.items()
        if _CANONICAL_INT_RE.fullmatch(k) and k != "-0" and abs(int(k)) <= _MAX_SAFE
    }
    return _CompiledKey(compiled, by_int)


def _weights(protos: object) -> tuple[tuple[float, ...], ...]:
    """Per type (TYPE order) the seat weight of each function (FUNC order): base 1, creative 0.7, other seats 0.2."""
    if not isinstance(protos, Mapping):
        raise ScoringInputError("config.typePrototypes must be an object")
    out = []
    for code in TYPES:
        proto = protos.get(code)
        if not isinstance(proto, Mapping):
            raise ScoringInputError(f"config.typePrototypes lacks type {code}")
        row = []
        for f in FUNCS:
            seat = proto.get(f)
            row.append(1.0 if seat == "base" else 0.7 if seat == "creative" else 0.2)
        out.append(tuple(row))
    return tuple(out)


_FALLBACK_WEIGHTS: Final = _weights(FALLBACK_PROTOTYPES)


def _proto_weights(config: Mapping[str, object]) -> tuple[tuple[float, ...], ...]:
    protos = config.get("typePrototypes")
    if not js_truthy(protos) or protos is FALLBACK_PROTOTYPES:
        return _FALLBACK_WEIGHTS
    return _weights(protos)


def _fc_map_value(fc_map: Mapping[str, object], answer: str) -> object:
    """``fc_map[answer]`` on a JSON-parsed object: own keys first, then Object.prototype's members (all truthy)."""
    if answer in fc_map:
        return fc_map[answer]
    if answer in _OBJ_PROTO_NAMES:
        # String() of what JavaScript finds there; any non-function string keeps the counts identical.
        return "[object Object]" if answer == "__proto__" else f"function {answer}() {{ [native code] }}"
    return UNDEFINED


def _v8_sort16(n: int, cmp: Callable[[int, int], float]) -> list[int]:
    """V8's Array.prototype.sort (TimSort) on ``[0..n)`` for n < 64: one natural run, then binary insertion.

    Written out rather than using ``sorted()`` so that even a non-transitive comparator (the 1e-9 share tolerance)
    orders exactly as V8 does. ``cmp`` must already map NaN to 0, as V8's SortCompare does.
    """
    a = list(range(n))
    if n < 2:
        return a
    # CountAndMakeRun(0, n)
    run = 2
    desc = cmp(a[1], a[0]) < 0
    prev = a[1]
    for idx in range(2, n):
        cur = a[idx]
        order = cmp(cur, prev)
        if (order >= 0) if desc else (order < 0):
            break
        prev = cur
        run += 1
    if desc:
        a[:run] = a[run - 1 :: -1]
    # BinaryInsertionSort(0, run, n): the minimum run length is n itself below 64.
    for start in range(run, n):
        pivot = a[start]
        left, right = 0, start
        while left < right:
            mid = left + ((right - left) >> 1)
            if cmp(pivot, a[mid]) < 0:
                right = mid
            else:
                left = mid + 1
        a[left + 1 : start + 1] = a[left:start]
        a[left] = pivot
    return a


# Longer than a screen on purpose: it mirrors scoreAssessment (scoreEngine.ts @ceea71b, spec prism-scoring.md §3) line
# by line, in the original's order of summation, so it can be read and diffed beside the TypeScript. Do not split it.
def _engine(
    responses: Iterable[object],
    key: _CompiledKey,
    config: Mapping[str, object],
    fc_scores: Mapping[str, object] | None,
    fc_expected: object,
    weights: tuple[tuple[float, ...], ...],
) -> dict[str, object]:
    """The ``@ceea71b`` ``scoreAssessment`` on pre-digested inputs; reads but never writes its arguments."""
    lik_sum = [0.0] * 8
    lik_cnt = [0] * 8
    fc_absent = fc_scores is None
    derived: dict[str, int] = {}
    derived_poisoned = False
    fc_answered = 0

    by_int = key.by_int
    by_str = key.by_str
    # Item pass (§3.2), one loop in response order.
    for r in responses:
        if type(r) is not dict and not isinstance(r, Mapping):
            raise ScoringInputError("each response must be an object")
        qid = r.get("question_id", UNDEFINED)
        if type(qid) is int and -_MAX_SAFE <= qid <= _MAX_SAFE:
            info = by_int.get(qid)
        else:
            info = by_str.get(qid if type(qid) is str else js_string(qid))
        if info is None:
            continue
        fc_map, reverse, fi = info
        ans = r.get("answer_value", UNDEFINED)
        if fc_absent and fc_map is not None:
            # Legacy FC (§3.6): checked on the answer as given, before the numeric parse.
            x = _fc_map_value(fc_map, ans if type(ans) is str else js_string(ans))
            if js_truthy(x):
                fc_answered += 1
                xs = x if type(x) is str else js_string(x)
                if xs in _OBJ_PROTO_NAMES:
                    # `fcDerived[xs] || 0` starts from an inherited function: the key appears, the total becomes a
                    # string and every derived strength NaN → 0. "__proto__" assignments are ignored.
                    if xs != "__proto__":
                        derived_poisoned = True
                        derived.setdefault(xs, 0)
                else:
                    derived[xs] = derived.get(xs, 0) + 1
        # parseNumber: null/undefined and non-finite values are skipped.
        if type(ans) is str and ans.isdigit() and ans.isascii():
            val = float(ans)
            if val - val != 0.0:
                continue
        elif type(ans) is int and -_MAX_SAFE <= ans <= _MAX_SAFE:
            val = float(ans)
        else:
            if _nullish(ans):
                continue
            parsed = js_number(ans)
            if parsed is None:
                continue
            val = parsed
        if fi < 0:
            if fi == _BAD_TAG:
                raise ScoringInputError(f"scoringKey[{js_string(qid)}] has a non-string tag or scale_type")
            continue
        if reverse:
            val = 6.0 - val  # 5 + 1 - val whatever the scale (upstream wrote this back into the response)
        lik_sum[fi] += val
        lik_cnt[fi] += 1

    # Strengths (§3.3).
    if fc_scores is not None:
        blend = True
        fcn = []
        for f in FUNCS:
            s = fc_scores.get(f, UNDEFINED)
            fcn.append(_or_zero((js_to_number(0 if _nullish(s) else s) / 100) * 5))
    elif derived:
        blend = True
        if derived_poisoned:
            fcn = [0.0] * 8
        else:
            total = float(sum(derived.values()) or 1)
            fcn = [_or_zero((derived.get(f, 0) / total) * 5) for f in FUNCS]
    else:
        blend = False
        fcn = [0.0] * 8
    strengths = []
    for i in range(8):
        lik = lik_sum[i] / lik_cnt[i] if lik_cnt[i] else 0.0
        strengths.append(0.5 * lik + 0.5 * fcn[i] if blend else lik)
    s0, s1, s2, s3, s4, s5, s6, s7 = strengths

    # Type fit, softmax, ranking.
    fits = [
        to_fixed(0.0 + w[0] * s0 + w[1] * s1 + w[2] * s2 + w[3] * s3 + w[4] * s4 + w[5] * s5 + w[6] * s6 + w[7] * s7, 4)
        for w in weights
    ]
    top = _js_max(fits)
    temp_raw = config.get("softmax_temp", UNDEFINED)
    temp = js_to_number(temp_raw) if js_truthy(temp_raw) else 1.0
    exps = [js_exp((v - top) / temp) for v in fits]
    total_e = 0.0
    for e in exps:
        total_e += e
    shares = [e / total_e for e in exps]

    def cmp(a: int, b: int) -> float:
        d = shares[b] - shares[a]
        if abs(d) < 1e-9:
            d = fits[b] - fits[a]
        return d if d == d else 0.0

    order = _v8_sort16(16, cmp)
    i0, i1, i2 = order[0], order[1], order[2]
    share_gap = shares[i0] - shares[i1]
    score_gap = fits[i0] - fits[i1]

    params = _prop(config, "conf_raw_params", "config")
    pa = _prop_num(params, "a", "config.conf_raw_params")
    pb = _prop_num(params, "b", "config.conf_raw_params")
    pc = _prop_num(params, "c", "config.conf_raw_params")
    h = 0.0
    for p in shares:
        h = h + (p * js_log2(p) if p > 0 else 0.0)
    entropy = -h
    raw = 1 / (1 + js_exp(-(pa * score_gap + pb * share_gap - pc * entropy)))
    conf_raw = to_fixed(raw, 4)
    confidence = "High" if conf_raw >= 0.75 else "Moderate" if conf_raw >= 0.55 else "Low"

    thresholds = _prop(config, "fit_band_thresholds", "config")
    fit1 = fits[i0]
    if fit1 >= _prop_num(thresholds, "high_fit", "config.fit_band_thresholds"):
        fit_band = "high_fit"
    elif fit1 >= _prop_num(thresholds, "moderate_fit", "config.fit_band_thresholds"):
        fit_band = "moderate_fit"
    else:
        fit_band = "low_fit"
    fc_answered_ct = len(fc_scores) if fc_scores is not None else fc_answered
    expected = config.get("fc_expected_min", UNDEFINED) if _nullish(fc_expected) else fc_expected
    coverage = "full" if fc_answered_ct >= js_to_number(expected) else "low"

    top3 = [(TYPES[i], shares[i], fits[i]) for i in (i0, i1, i2)]
    code1 = TYPES[i0]
    out: dict[str, object] = {
        "type_code": code1,
        "base_func": TYPE_MAP[code1][0],
        "creative_func": TYPE_MAP[code1][1],
        "top_types": [{"code": c, "share": s} for c, s, _ in top3],
        "top_3_fits": [{"code": c, "fit": f, "share": s} for c, s, f in top3],
        "score_fit_raw": fit1,
        "score_fit_calibrated": fit1,
        "fit_band": fit_band,
        "top_gap": to_fixed(share_gap, 3),
        "close_call": share_gap < 0.05,
        "strengths": {f: to_fixed(strengths[i], 3) for i, f in enumerate(FUNCS)},
        "dimensions": dict.fromkeys(FUNCS, 0),
        "dims_highlights": {"coherent": [], "unique": []},
        "blocks_norm": {"Core": 0, "Critic": 0, "Hidden": 0, "Instinct": 0},
        "neuro_mean": 0,
        "neuro_z": 0,
        "overlay_neuro": "none",
        "overlay_state": "none",
        "state_index": 0,
        "overlay": "0",
        "validity_status": "valid",
        "validity": {"attention": 0, "inconsistency": 0, "sd_index": 0},
        "confidence": confidence,
        "conf_raw": conf_raw,
        "conf_calibrated": conf_raw,
        "fc_answered_ct": fc_answered_ct,
        "fc_coverage_bucket": coverage,
    }
    version = config.get("results_version", UNDEFINED)
    if version is not UNDEFINED:  # JSON.stringify drops undefined-valued keys, so they are omitted here
        out["version"] = version
        out["results_version"] = version
    return out


def _fc_scores_arg(v: object) -> Mapping[str, object] | None:
    """``fcFunctionScores``: absent when falsy (``{}`` is truthy, so it counts as present)."""
    if not js_truthy(v):
        return None
    if not isinstance(v, Mapping):
        raise ScoringInputError("fcFunctionScores must be an object or null")
    return v


def score_assessment(inp: Mapping[str, object]) -> dict[str, object]:
    """The v1.2.1 engine on a ProfileInput (``sessionId``, ``responses``, ``scoringKey``, ``config``,
    ``fcFunctionScores``?, ``fc_expected``?), returning exactly the golden output shape. Never mutates ``inp``."""
    if not isinstance(inp, Mapping):
        raise ScoringInputError("a ProfileInput must be an object")
    responses = inp.get("responses")
    if not isinstance(responses, list | tuple):
        raise ScoringInputError("responses must be an array")
    scoring_key = inp.get("scoringKey")
    if not isinstance(scoring_key, Mapping):
        raise ScoringInputError("scoringKey must be an object")
    config = inp.get("config")
    if not isinstance(config, Mapping):
        raise ScoringInputError("config must be an object")
    return _engine(
        responses,
        _compile_key(scoring_key),
        config,
        _fc_scores_arg(inp.get("fcFunctionScores")),
        inp.get("fc_expected", UNDEFINED),
        _proto_weights(config),
    )


# ====================================================================================================================
# Calibration (§4.3, calibration.ts)

_DEFAULT_CONF_PARAMS: Final = {"a": 0.25, "b": 0.35, "c": 0.2}
_DEFAULT_CUTS: Final = {"high": 0.75, "moderate": 0.55}


@dataclass(frozen=True)
class Calibration:
    """Calibrated confidence for one profile; ``as_dict()`` is the part written to the profile."""

    conf_raw: float
    conf_calibrated: float
    confidence: str
    method: str
    raw: float
    calibrated: float

    def as_dict(self) -> dict[str, object]:
        """``{"conf_raw", "conf_calibrated", "confidence"}``: the CLI contract and the profile fields."""
        return {"conf_raw": self.conf_raw, "conf_calibrated": self.conf_calibrated, "confidence": self.confidence}


def _knot_xy(k: object) -> tuple[float, float]:
    if isinstance(k, Mapping):
        x, y = k.get("x"), k.get("y")
    elif isinstance(k, list | tuple) and len(k) == 2:
        x, y = k[0], k[1]
    else:
        raise ScoringInputError("a calibration knot must be {x, y} or an (x, y) pair")
    if type(x) not in (int, float) or type(y) not in (int, float):
        raise ScoringInputError("calibration knot coordinates must be numbers")
    xf, yf = float(x), float(y)  # type: ignore[arg-type]
    if xf != xf:
        raise ScoringInputError("calibration knot x must not be NaN")
    return xf, yf


def _interpolate(raw: float, knots: Sequence[object]) -> float:
    """``interpolateCalibration``: piecewise linear through the knots sorted by x, clamped to the end values."""
    if len(knots) == 0:
        return raw
    pts = [_knot_xy(k) for k in knots]
    if len(pts) == 1:
        return pts[0][1]
    pts.sort(key=lambda p: p[0])  # stable, like V8's sort with (a, b) => a.x - b.x on non-NaN x
    if raw <= pts[0][0]:
        return pts[0][1]
    if raw >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= raw <= x1:
            if x0 == x1:
                return y0
            t = (raw - x0) / (x1 - x0)
            return _clamp01(y0 + t * (y1 - y0))
    return raw


def platt_fallback(raw: float) -> float:
    """The calibration used when no ``calibration_model`` row matches: ``clamp01(sigmoid(-0.5 + 1.2·raw))``."""
    return _clamp01(1 / (1 + js_exp(-(-0.5 + 1.2 * raw))))


def calibrate_detail(
    profile: Mapping[str, object],
    conf_raw_params: Mapping[str, object] | None,
    cuts: Mapping[str, object] | None,
    knots: Sequence[object] | None = None,
) -> Calibration:
    """§4.3 with the method used: ``"knots"`` when a calibration model's knots are given, else ``"platt_fallback"``."""
    top_types = profile.get("top_types")
    fits = profile.get("top_3_fits")
    if not isinstance(top_types, list | tuple) or not top_types or not isinstance(top_types[0], Mapping):
        raise ScoringInputError("profile.top_types must be a non-empty array of objects")
    if not isinstance(fits, list | tuple) or not fits or not isinstance(fits[0], Mapping):
        raise ScoringInputError("profile.top_3_fits must be a non-empty array of objects")
    shares_map: dict[str, object] = {}
    for t in top_types:
        if not isinstance(t, Mapping):
            raise ScoringInputError("profile.top_types entries must be objects")
        shares_map[js_string(t.get("code", UNDEFINED))] = t.get("share", UNDEFINED)
    h = 0.0
    for pv in shares_map.values():
        p = js_to_number(pv)
        h = h + (p * js_log2(p) if p > 0 else 0.0)
    entropy = -h

    def second(rows: Sequence[object], name: str) -> float:
        # `rows[1]?.name || 0`
        if len(rows) < 2 or not isinstance(rows[1], Mapping):
            return 0.0
        v = rows[1].get(name, UNDEFINED)
        return js_to_number(v) if js_truthy(v) else 0.0

    top_gap = js_to_number(fits[0].get("fit", UNDEFINED)) - second(fits, "fit")
    share_margin = (js_to_number(top_types[0].get("share", UNDEFINED)) - second(top_types, "share")) * 100
    params: object = conf_raw_params if js_truthy(conf_raw_params) else _DEFAULT_CONF_PARAMS
    pa = _prop_num(params, "a", "conf_raw_params")
    pb = _prop_num(params, "b", "conf_raw_params")
    pc = _prop_num(params, "c", "conf_raw_params")
    raw = _clamp01(1 / (1 + js_exp(-(pa * top_gap + pb * share_margin / 100 - pc * entropy))))
    if knots is None:
        method = "platt_fallback"
        cal = platt_fallback(raw)
    else:
        method = "knots"
        cal = _interpolate(raw, knots)
    band_cuts: object = cuts if js_truthy(cuts) else _DEFAULT_CUTS
    if cal >= _prop_num(band_cuts, "high", "cuts"):
        band = "High"
    elif cal >= _prop_num(band_cuts, "moderate", "cuts"):
        band = "Moderate"
    else:
        band = "Low"
    return Calibration(
        conf_raw=to_fixed(raw, 4),
        conf_calibrated=to_fixed(cal, 4),
        confidence=band,
        method=method,
        raw=raw,
        calibrated=cal,
    )


def calibrate(
    profile: Mapping[str, object],
    conf_raw_params: Mapping[str, object] | None,
    cuts: Mapping[str, object] | None,
    knots: Sequence[object] | None = None,
) -> dict[str, object]:
    """§4.3: ``{"conf_raw", "conf_calibrated", "confidence"}`` for an engine output.

    ``knots`` are the matching ``calibration_model`` row's knots (``(x, y)`` pairs or ``{x, y}`` objects); ``None``
    means no row matched and the Platt fallback applies (cal ∈ [0.3775, 0.6682]). ``conf_raw_params``/``cuts`` of
    ``None`` mean the ``scoring_config`` row is missing (defaults .25/.35/.20 and .75/.55). See
    :func:`calibrate_detail` for the method used.
    """
    return calibrate_detail(profile, conf_raw_params, cuts, knots).as_dict()


# ====================================================================================================================
# The score_prism wrapper (§4.1–4.4a, @0e74987)


def _prototype_rows(type_prototypes: object) -> list[tuple[object, object, object]]:
    """``type_prototypes`` rows (type_code, func, block) from rows, row mappings, or a nested mapping."""
    rows: list[tuple[object, object, object]] = []
    if not isinstance(type_prototypes, Iterable) or isinstance(type_prototypes, str):
        raise ScoringInputError("type_prototypes must be rows or a mapping")
    if isinstance(type_prototypes, Mapping):
        for code, inner in type_prototypes.items():
            if not isinstance(inner, Mapping):
                raise ScoringInputError(f"type_prototypes[{code!r}] must be a mapping")
            if all(k in SEATS for k in inner):  # type → seat → function (type_prototypes.json)
                rows.extend((code, func, seat) for seat, func in inner.items())
            else:  # type → function → seat (the engine's form)
                rows.extend((code, func, seat) for func, seat in inner.items())
        return rows
    for r in type_prototypes:
        if isinstance(r, Mapping):
            rows.append((r.get("type_code"), r.get("func"), r.get("block")))
        elif isinstance(r, list | tuple) and len(r) == 3:
            rows.append((r[0], r[1], r[2]))
        else:
            raise ScoringInputError("a type_prototypes row must be (type_code, func, block)")
    return rows


def engine_config(scoring_config: Mapping[str, object], type_prototypes: object = None) -> dict[str, object]:
    """The ``config`` ``score_prism`` (@0e74987) passes to the engine (§4.2).

    ``scoring_config`` maps ``scoring_config.key`` to its decoded ``value``; only results_version, softmax_temp,
    conf_raw_params, fit_band_thresholds and fc_expected_min are read, each with the wrapper's ``||`` default
    (results_version is used as stored). ``type_prototypes`` is the ``type_prototypes`` table: a sequence of
    ``(type_code, func, block)`` rows or mappings, or a nested mapping (type → seat → function as
    :func:`load_type_prototypes` returns, or type → function → seat). It is used only if it has exactly 128 rows,
    as upstream; otherwise (or when ``None``) the built-in prototypes are passed.
    """
    cfg = scoring_config

    def pick(name: str, default: object) -> object:
        v = cfg.get(name, UNDEFINED)
        return v if js_truthy(v) else default

    protos: dict[str, dict[str, str]] | dict[object, dict[object, object]]
    rows = _prototype_rows(type_prototypes) if type_prototypes is not None else []
    if len(rows) == 16 * 8:
        db: dict[object, dict[object, object]] = {}
        for code, func, block in rows:
            db.setdefault(code, {})[func] = block
        protos = db
    else:
        protos = {code: dict(seats) for code, seats in FALLBACK_PROTOTYPES.items()}
    return {
        "results_version": pick("results_version", ENGINE_VERSION),
        "dim_thresholds": {"one": 0, "two": 0, "three": 0},
        "neuro_norms": {"mean": 0, "sd": 1},
        "overlay_neuro_cut": 0,
        "overlay_state_weights": {"stress": 0, "time": 0, "sleep": 0, "focus": 0},
        "softmax_temp": pick("softmax_temp", 1),
        "conf_raw_params": pick("conf_raw_params", dict(_DEFAULT_CONF_PARAMS)),
        "fit_band_thresholds": pick(
            "fit_band_thresholds", {"high_fit": 10, "moderate_fit": 5, "high_gap": 0.2, "moderate_gap": 0.1}
        ),
        "fc_expected_min": pick("fc_expected_min", 0),
        "typePrototypes": protos,
    }


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def _js_date_ms(v: object) -> float:
    """``new Date(v || 0).getTime()``: epoch milliseconds (floored), NaN when the value is not a date.

    ``datetime`` values are what database drivers return; a naive one is taken as UTC (the edge runtime's zone).
    Strings are parsed as ISO 8601.
    """
    if not js_truthy(v):
        return 0.0
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v.strip())
        except ValueError:
            return math.nan
    if isinstance(v, datetime):
        dt = v if v.tzinfo is not None else v.replace(tzinfo=UTC)
        return float((dt - _EPOCH) // _MS)
    if isinstance(v, date):
        return float((datetime(v.year, v.month, v.day, tzinfo=UTC) - _EPOCH) // _MS)
    if isinstance(v, int | float) and not isinstance(v, bool):
        f = float(v)
        return float(math.trunc(f)) if math.isfinite(f) and abs(f) <= 8.64e15 else math.nan
    return math.nan


def _js_ge(a: object, b: object) -> bool:
    """JavaScript ``a >= b`` for ids: string comparison when both are strings, numeric otherwise."""
    if isinstance(a, str) and isinstance(b, str):
        return a >= b
    return js_to_number(a) >= js_to_number(b)


def _latest_rows(rows: Iterable[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """The latest row per ``String(question_id)``, in first-seen order (a JavaScript Map keeps the first position)."""
    rows = list(rows)
    qids = [r.get("question_id", UNDEFINED) for r in rows]
    # Fast path for the normal case (UNIQUE (session_id, question_id)): distinct safe ints have distinct String()
    # forms, so every row is its question's only row and the Map order is the row order.
    ints = [q for q in qids if type(q) is int]
    if ints and len(ints) == len(qids) == len(set(ints)) and min(ints) >= -_MAX_SAFE and max(ints) <= _MAX_SAFE:
        return rows
    last: dict[str, Mapping[str, object]] = {}
    for r in rows:
        qid = r.get("question_id", UNDEFINED)
        if type(qid) is int and -_MAX_SAFE <= qid <= _MAX_SAFE:
            k = str(qid)
        else:
            k = qid if type(qid) is str else js_string(qid)
        prev = last.get(k)
        if prev is None:
            last[k] = r  # the common case (question ids are unique per session): no date parsing needed
            continue
        t_prev = _js_date_ms(prev.get("created_at"))
        t_cur = _js_date_ms(r.get("created_at"))
        if t_cur == t_cur and t_prev == t_prev:
            newer = t_cur >= t_prev
        else:  # an invalid date: compare ids (`(r.id ?? 0) >= (prev?.id ?? 0)`)
            a, b = r.get("id"), prev.get("id")
            newer = _js_ge(0 if _nullish(a) else a, 0 if _nullish(b) else b)
        if newer:
            last[k] = r
    return list(last.values())


def latest_answers(rows: Iterable[Mapping[str, object]]) -> list[dict[str, object]]:
    """§4.1: the latest answer per question (``created_at`` ≥, so on equal times the later row in DB order wins).

    ``rows`` are ``assessment_responses`` rows (``id, question_id, answer_value, created_at``) in DB order; the result
    is the engine's ``responses``: ``{question_id, answer_value}`` in order of each question's first appearance.
    """
    return [
        {"question_id": r.get("question_id", UNDEFINED), "answer_value": r.get("answer_value", UNDEFINED)}
        for r in _latest_rows(rows)
    ]


def _iso_ms(now: datetime) -> str:
    """``Date.prototype.toISOString()``: UTC, milliseconds, ``Z`` (a naive datetime is taken as UTC)."""
    dt = now.astimezone(UTC) if now.tzinfo is not None else now
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


def build_profile_row(
    session_id: str,
    engine_output: Mapping[str, object],
    calibration: Mapping[str, object],
    existing: Mapping[str, object] | None,
    now: datetime,
    fc_blocks_answered: int | None = None,
) -> dict[str, object]:
    """§4.4a: the flat ``profiles`` row ``score_prism`` (@0e74987) upserts on ``session_id``.

    Engine fields in engine order with conf_raw/conf_calibrated/confidence from ``calibration``, then session_id,
    submitted_at (existing.submitted_at or now), recomputed_at (now if a row existed, else None), created_at
    (existing.submitted_at or now: upstream's quirk), updated_at (now); results_version and version are "v1.2.1"
    whatever the config said. Timestamps derived from ``now`` are ``toISOString()`` strings; an existing
    ``submitted_at`` is passed through as given. ``fc_blocks_answered`` is accepted for the later ``@afd676c``
    wrapper, which overwrote fc_answered_ct with it; this era ignores it.
    """
    del fc_blocks_answered  # not applied before @afd676c (2025-09-20)
    stamp = _iso_ms(now)
    row: dict[str, object] = dict(engine_output)
    for k in ("conf_raw", "conf_calibrated", "confidence"):
        row[k] = calibration[k]
    row["version"] = ENGINE_VERSION  # keeps the engine's position; appended last if the engine had none
    row["results_version"] = ENGINE_VERSION
    submitted = existing.get("submitted_at") if existing is not None else None
    row["session_id"] = session_id
    row["submitted_at"] = submitted if js_truthy(submitted) else stamp
    row["recomputed_at"] = stamp if existing is not None else None
    row["created_at"] = submitted if js_truthy(submitted) else stamp
    row["updated_at"] = stamp
    return row


# ====================================================================================================================
# score_session: the single code path of every gatefill writer


@dataclass(frozen=True)
class SessionInputs:
    """One session's stored inputs: answers, FC responses and the existing v1.2/functions ``fc_scores`` value.

    ``answers`` are ``assessment_responses`` rows (``id, question_id, answer_value, created_at``) and
    ``fc_responses`` are ``fc_responses`` rows (``block_id, option_id``), both in DB order. ``existing_fc_scores``
    is the ``scores_json`` of an existing ``fc_scores`` row (version v1.2, kind functions), ``None`` if there is none.
    """

    session_id: str
    answers: Sequence[Mapping[str, object]]
    fc_responses: Sequence[Mapping[str, object]] = ()
    existing_fc_scores: object = None


def _key_dict(scoring_key: Sequence[KeyRow] | Mapping[str, KeyRow]) -> dict[str, KeyRow]:
    if isinstance(scoring_key, Mapping):
        return {js_string(k): v for k, v in scoring_key.items()}
    return {js_string(r.question_id): r for r in scoring_key}


@dataclass(frozen=True)
class ReferenceData:
    """Everything scoring reads besides the session: key, FC options, scoring_config, prototypes, calibration models.

    ``calibration_knots`` finds the ``calibration_model`` knots for a stratum: a callable or a mapping keyed by
    ``(fit_band, overlay)`` with overlay ``"plus"``/``"minus"`` (upstream: version v1.2.1, latest trained_at); no
    match (or ``None``) means the Platt fallback. Derived structures are built once, here, not per session.
    """

    scoring_key: Sequence[KeyRow] | Mapping[str, KeyRow]
    fc_options: Mapping[Any, object]
    scoring_config: Mapping[str, object]
    type_prototypes: object = None
    calibration_knots: KnotsLookup | None = None
    key_rows: dict[str, KeyRow] = field(init=False, repr=False, compare=False)
    config: dict[str, object] = field(init=False, repr=False, compare=False)
    _compiled: _CompiledKey = field(init=False, repr=False, compare=False)
    _weights: tuple[tuple[float, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key_rows = _key_dict(self.scoring_key)
        config = engine_config(self.scoring_config, self.type_prototypes)
        object.__setattr__(self, "key_rows", key_rows)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "_compiled", _compile_key(key_rows))
        object.__setattr__(self, "_weights", _proto_weights(config))

    @classmethod
    def from_package(cls) -> ReferenceData:
        """The shipped key, v1.2 seed, prototypes and pre-09-28 scoring_config; no calibration models."""
        return cls(
            scoring_key=load_scoring_key(),
            fc_options=load_fc_seed().weights_by_option_id(),
            scoring_config=scoring_config_defaults(),
            type_prototypes=load_type_prototypes(),
        )

    def knots_for(self, fit_band: str, overlay: str) -> Sequence[object] | None:
        """The calibration knots for a stratum, or ``None`` (→ Platt fallback)."""
        lookup = self.calibration_knots
        if lookup is None:
            return None
        if isinstance(lookup, Mapping):
            return lookup.get((fit_band, overlay))
        return lookup(fit_band, overlay)

    def profile_input(
        self, session_id: str, responses: Sequence[Mapping[str, object]], fc_scores: object = None
    ) -> dict[str, object]:
        """The ProfileInput ``score_prism`` builds (for ``score_assessment`` or ``gatefill score profile``)."""
        inp: dict[str, object] = {
            "sessionId": session_id,
            "responses": [dict(r) for r in responses],
            "scoringKey": {k: r.as_json() for k, r in self.key_rows.items()},
            "config": self.config,
        }
        if fc_scores is not None:
            inp["fcFunctionScores"] = fc_scores
        return inp

    def score(self, responses: Iterable[Mapping[str, object]], fc_scores: object) -> dict[str, object]:
        """The engine on this reference data (same result as ``score_assessment(self.profile_input(...))``)."""
        return _engine(responses, self._compiled, self.config, _fc_scores_arg(fc_scores), UNDEFINED, self._weights)


@dataclass(frozen=True)
class SessionScore:
    """Everything scoring one session produced, and what may be written.

    ``fc_scores_row`` is the ``fc_scores`` row to upsert (``None``: nothing to write; never an empty row).
    ``profile_row`` is ``None`` when the session has no answers (upstream: 400 "no responses") or when a blocking
    finding makes the row wrong. ``events`` are the log events upstream emitted; ``findings`` are data-quality codes.
    """

    session_id: str
    fc_tally: FcTally | None
    fc_scores_row: dict[str, object] | None
    engine_output: dict[str, object] | None
    calibration: dict[str, object] | None
    calibration_method: str | None
    profile_row: dict[str, object] | None
    events: list[tuple[str, dict[str, object]]]
    findings: list[str]


#: Findings that stop the profile row from being written (the row would be wrong).
BLOCKING_FINDINGS: Final = frozenset({"existing_fc_scores_empty", "non_finite_profile"})


def _profile_finite(out: Mapping[str, object]) -> bool:
    """Every computed number of an engine output is finite (NaN/±Infinity would be stored as JSON null)."""
    nums: list[object] = [out["score_fit_raw"], out["top_gap"], out["conf_raw"], out["conf_calibrated"]]
    for group in ("top_types", "top_3_fits"):
        for t in out[group]:  # type: ignore[attr-defined]
            nums.extend(t.values())
    nums.extend(out["strengths"].values())  # type: ignore[attr-defined]
    return all(type(v) is not float or v - v == 0.0 for v in nums)


# Longer than a screen on purpose: it mirrors upstream's finalize sequence line by line (score_fc_session/index.ts,
# then score_prism/index.ts; spec prism-scoring.md §2, §4), events and findings in the original's order, so it can be
# read beside the TypeScript. Do not split it.
def score_session(
    inputs: SessionInputs,
    ref: ReferenceData,
    now: datetime,
    existing_profile: Mapping[str, object] | None = None,
) -> SessionScore:
    """Score one session the way finalize/admin-backfill did: ``score_fc_session`` first, then ``score_prism``.

    FC: an existing v1.2/functions ``fc_scores`` value is used as is (no re-tally, nothing to write). Otherwise the
    responses are tallied; the row is to be written only if upstream would have written it *and* it is not ``{}``
    (§7.3), so a session whose options don't resolve scores as if it had no row (legacy FC), with finding
    ``fc_scores_empty``. An existing ``{}`` row is used as upstream used it (it halves every strength), but the
    profile is then withheld (finding ``existing_fc_scores_empty``). ``existing_profile`` is the current ``profiles``
    row (``submitted_at``), ``None`` if there is none.
    """
    sid = inputs.session_id
    events: list[tuple[str, dict[str, object]]] = []
    findings: list[str] = []
    tally: FcTally | None = None
    fc_row: dict[str, object] | None = None
    fc_scores: object = None

    if inputs.existing_fc_scores is not None:
        fc_scores = inputs.existing_fc_scores
        if isinstance(fc_scores, Mapping) and not fc_scores:
            findings.append("existing_fc_scores_empty")
    else:
        tally = score_fc_session(inputs.fc_responses, ref.fc_options)
        for oid in tally.unresolved_option_ids:
            events.append(("fc_option_not_found", {"session_id": sid, "option_id": oid}))
        if not tally.written:
            events.append(("fc_no_responses", {"session_id": sid}))
        elif tally.empty_scores:
            findings.append("fc_scores_empty")
        elif not tally.finite:
            findings.append("fc_scores_non_finite")
        else:
            fc_row = tally.to_row(sid)
            fc_scores = fc_row["scores_json"]

    if not inputs.answers:
        events.append(("no_responses", {"session_id": sid}))
        findings.append("no_responses")
        return SessionScore(sid, tally, fc_row, None, None, None, None, events, findings)

    if js_truthy(fc_scores):
        events.append(("fc_scores_loaded", {"session_id": sid}))
    else:
        fc_scores = None
        events.append(("fc_fallback_legacy", {"session_id": sid}))

    output = ref.score(_latest_rows(inputs.answers), fc_scores)
    overlay = "plus" if output.get("overlay") == "+" else "minus"
    detail = calibrate_detail(
        output,
        _as_mapping(ref.scoring_config.get("conf_raw_params")),
        _as_mapping(ref.scoring_config.get("conf_band_cuts")),
        ref.knots_for(str(output["fit_band"]), overlay),
    )
    cal = detail.as_dict()
    db_version = ref.scoring_config.get("results_version")
    if js_truthy(db_version) and db_version != ENGINE_VERSION:
        events.append(
            ("engine_version_override", {"db_version": db_version, "engine_version": ENGINE_VERSION, "session_id": sid})
        )
    built = build_profile_row(sid, output, cal, existing_profile, now)
    if not _profile_finite(built):
        findings.append("non_finite_profile")
    row = None if any(f in BLOCKING_FINDINGS for f in findings) else built
    return SessionScore(sid, tally, fc_row, output, cal, detail.method, row, events, findings)


def _as_mapping(v: object) -> Mapping[str, object] | None:
    """A ``scoring_config`` value used as an object (a falsy value means "row missing" to upstream's ``||``)."""
    if not js_truthy(v):
        return None
    if not isinstance(v, Mapping):
        raise ScoringInputError("scoring_config conf_raw_params/conf_band_cuts must be objects")
    return v


# ====================================================================================================================
# JSON Lines (gatefill score profile|fc|calibrate)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _jsonl_profile(obj: Mapping[str, object]) -> object:
    return score_assessment(obj)


def _jsonl_fc(obj: Mapping[str, object]) -> object:
    if not js_truthy(obj.get("session_id")):
        raise ScoringInputError("session_id required")
    responses = obj.get("responses")
    if not isinstance(responses, list):
        raise ScoringInputError("responses must be an array")
    for r in responses:
        if not isinstance(r, Mapping) or "block_id" not in r or "option_id" not in r:
            raise ScoringInputError("each response must be an object with block_id and option_id")
    options = obj.get("options")
    if not isinstance(options, Mapping):
        raise ScoringInputError("options must be an object mapping option id to weights_json")
    # A destructuring default applies only to a missing key, so an explicit null basis is not "functions".
    basis = obj.get("basis", FC_KIND)
    tally = score_fc_session(responses, options, basis)
    return {
        "blocks_answered": tally.blocks_answered,
        "scores": tally.scores,
        "written": tally.written,
        "empty_scores": tally.empty_scores,
        "unresolved_option_ids": tally.unresolved_option_ids,
    }


def _jsonl_calibrate(obj: Mapping[str, object]) -> object:
    profile = obj.get("profile")
    if not isinstance(profile, Mapping):
        raise ScoringInputError("profile must be an object (an engine output)")
    knots = obj.get("knots")
    if knots is not None and not isinstance(knots, list):
        raise ScoringInputError("knots must be an array or null")
    params = obj.get("conf_raw_params")
    cuts = obj.get("cuts")
    if params is not None and not isinstance(params, Mapping):
        raise ScoringInputError("conf_raw_params must be an object or null")
    if cuts is not None and not isinstance(cuts, Mapping):
        raise ScoringInputError("cuts must be an object or null")
    return calibrate(profile, params, cuts, knots)


_JSONL_HANDLERS: Final[dict[str, Callable[[Mapping[str, object]], object]]] = {
    "profile": _jsonl_profile,
    "fc": _jsonl_fc,
    "calibrate": _jsonl_calibrate,
}


def _jsonl(handler: Callable[[Mapping[str, object]], object], lines: Iterable[str]) -> Iterator[str]:
    for line_no, line in enumerate(lines, 1):
        if not line.strip(" \t\r\n"):
            continue
        try:
            obj = json.loads(line, parse_constant=_reject_constant)
        except ValueError as exc:
            raise InputLineError(line_no, f"invalid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise InputLineError(line_no, "expected a JSON object")
        try:
            out = handler(obj)
        except ScoringInputError as exc:
            raise InputLineError(line_no, str(exc)) from exc
        yield js_dumps(out)


def score_jsonl(kind: str, lines: Iterable[str]) -> Iterator[str]:
    """``gatefill score profile|fc|calibrate``: one JSON output line per non-blank input line, in order.

    profile: a ProfileInput → the engine output. fc: ``{session_id, version?, basis?, responses, options}`` →
    ``{blocks_answered, scores, written, empty_scores, unresolved_option_ids}``. calibrate: ``{profile,
    conf_raw_params?, cuts?, knots?}`` → ``{conf_raw, conf_calibrated, confidence}``. A malformed line raises
    :class:`~gatefill.errors.InputLineError` with its 1-based number (blank lines are skipped but counted).
    """
    handler = _JSONL_HANDLERS.get(kind)
    if handler is None:
        raise UsageError(f"unknown scoring kind {kind!r} (expected profile, fc or calibrate)")
    return _jsonl(handler, lines)
