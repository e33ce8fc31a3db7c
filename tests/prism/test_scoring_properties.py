"""Property tests for the PRISM scoring: garbage never crashes, inputs never change, fast paths equal slow ones."""

from __future__ import annotations

import copy
import json
import math
import random
from datetime import timedelta
from decimal import ROUND_HALF_UP, Context, Decimal
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatefill.prism import jsmath
from gatefill.prism import scoring as S
from gatefill.prism.jsmath import js_dumps, js_number, js_number_to_string, js_string, to_fixed, to_fixed_decimal
from tests.prism.test_scoring import NOW, OPTIONS, REF, realistic_answers, realistic_fc

KEY_JSON = {k: r.as_json() for k, r in S.load_scoring_key().items()}
CONFIG = S.engine_config(S.scoring_config_defaults(), S.load_type_prototypes())
OUTPUT_KEYS = list(json.loads((Path(__file__).parent / "goldens" / "g1.output.json").read_text()))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numeric_text = st.sampled_from(
    ["", " ", "3", " 4 ", "4.5", "+2", "-1", ".5", "5.", "1e0", "0x3", "0b11", "0o7", "1_0", "Infinity", "-Infinity",
     "NaN", "1e999", "\u00a05\u3000", "٣", "A", "B", "C", "D", "E", "toString", "__proto__", "constructor", "label"]
)  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    numeric_text,
)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
question_ids = st.one_of(
    st.integers(min_value=0, max_value=250), st.sampled_from(["17", "017", "231", "129", "-0", "true"]), json_like
)


def _responses(draw_answers: list[tuple[object, object]]) -> list[dict[str, object]]:
    return [{"question_id": q, "answer_value": a} for q, a in draw_answers]


@SETTINGS
@given(
    answers=st.lists(st.tuples(question_ids, st.one_of(json_like, numeric_text)), max_size=60),
    fc=st.one_of(
        st.none(),
        st.just({}),
        st.dictionaries(st.sampled_from([*S.FUNCS, "x", "__proto__", "0"]), json_like, max_size=9),
    ),
)
def test_arbitrary_answers_never_crash_nor_mutate(answers: list[tuple[object, object]], fc: object) -> None:
    inp: dict[str, object] = {
        "sessionId": "s",
        "responses": _responses(answers),
        "scoringKey": KEY_JSON,
        "config": CONFIG,
    }
    if fc is not None:
        inp["fcFunctionScores"] = fc
    before = repr(inp)
    out = S.score_assessment(inp)
    assert repr(inp) == before
    assert list(out) == OUTPUT_KEYS
    assert js_dumps(out) == js_dumps(S.score_assessment(inp))
    cal = S.calibrate(out, None, None)
    assert set(cal) == {"conf_raw", "conf_calibrated", "confidence"}


@SETTINGS
@given(seed=st.integers(min_value=0, max_value=2**32), letters=st.booleans(), with_fc=st.booleans())
def test_session_path_equals_generic_path(seed: int, letters: bool, with_fc: bool) -> None:
    rnd = random.Random(seed)
    answers = realistic_answers(rnd, fc_letters=letters)
    fc = realistic_fc(rnd) if with_fc else []
    score = S.score_session(S.SessionInputs("s", answers, fc), REF, NOW, None)
    fc_scores = score.fc_tally.scores if score.fc_tally is not None and score.fc_tally.writable else None
    generic = S.score_assessment(REF.profile_input("s", S.latest_answers(answers), fc_scores))
    assert score.engine_output == generic
    cfg = S.scoring_config_defaults()
    cal = S.calibrate(generic, cfg["conf_raw_params"], cfg["conf_band_cuts"])  # type: ignore[arg-type]
    assert score.profile_row == S.build_profile_row("s", generic, cal, None, NOW)


@SETTINGS
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_int_and_string_question_ids_score_identically(seed: int) -> None:
    rnd = random.Random(seed)
    responses = S.latest_answers(realistic_answers(rnd))
    as_str = [{**r, "question_id": str(r["question_id"])} for r in responses]
    a = S.score_assessment(REF.profile_input("s", responses))
    b = S.score_assessment(REF.profile_input("s", as_str))
    assert a == b


@settings(max_examples=2000, deadline=None)
@given(x=st.floats(allow_nan=True, allow_infinity=True), n=st.integers(min_value=0, max_value=10))
def test_to_fixed_equals_the_decimal_reference(x: float, n: int) -> None:
    fast, ref = to_fixed(x, n), to_fixed_decimal(x, n)
    assert (math.isnan(fast) and math.isnan(ref)) or (fast == ref and math.copysign(1, fast) == math.copysign(1, ref))
    if math.isfinite(x) and abs(x) < 1e21 and x != 0:
        # The spec's formula, with enough precision for |x| < 1e21 and 10 decimals (the default 28 digits are not).
        q = float(Decimal(x).quantize(Decimal(1).scaleb(-n), ROUND_HALF_UP, context=Context(prec=60)))
        assert fast == q


@settings(max_examples=2000, deadline=None)
@given(
    x=st.floats(min_value=-1e6, max_value=1e6).map(lambda v: math.floor(v * 16) / 16),
    n=st.integers(min_value=0, max_value=3),
)
def test_to_fixed_on_binary_ties(x: float, n: int) -> None:
    assert to_fixed(x, n) == to_fixed_decimal(x, n)


@settings(max_examples=1000, deadline=None)
@given(digits=st.text(alphabet="0123456789", min_size=1, max_size=40), i=st.integers())
def test_js_number_fast_paths_equal_general_path(digits: str, i: int) -> None:
    fast = js_number(digits)
    slow = jsmath._string_to_number("\t" + digits)  # whitespace forces the general grammar
    assert fast == slow or (fast is None and not math.isfinite(slow))
    ref = jsmath._string_to_number(" " + str(i))
    assert js_number(i) == (ref if math.isfinite(ref) else None)


@settings(max_examples=1000, deadline=None)
@given(i=st.integers(min_value=1, max_value=2**53 - 1))
def test_js_number_to_string_fast_path_equals_general_path(i: int) -> None:
    assert js_number_to_string(float(i)) == jsmath._format_shortest(float(i))


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.sampled_from(sorted(OPTIONS)), max_size=8), unknown=st.integers(min_value=0, max_value=3))
def test_fc_tally_invariants(picks: list[str], unknown: int) -> None:
    responses = [{"block_id": "b", "option_id": p} for p in picks] + [{"block_id": "b", "option_id": "?"}] * unknown
    before = copy.deepcopy(responses)
    tally = S.score_fc_session(responses, OPTIONS)
    assert responses == before
    assert tally.written == bool(responses)
    assert tally.blocks_answered == len(picks)
    assert tally.empty_scores == (bool(responses) and not picks)
    if picks:
        assert max(tally.scores.values()) == 100 and all(0 <= v <= 100 for v in tally.scores.values())
        assert set(tally.scores) == set(S.FUNCS)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(min_value=1, max_value=4), st.integers(min_value=0, max_value=5), st.integers(0, 3)),
        min_size=1,
        max_size=12,
    )
)
def test_latest_answers_picks_the_latest_row(rows: list[tuple[int, int, int]]) -> None:
    base = NOW.replace(microsecond=0)
    db_rows = [
        {"id": f"r{i}", "question_id": q, "answer_value": str(i), "created_at": base + timedelta(seconds=t)}
        for i, (q, t, _) in enumerate(rows)
    ]
    latest = {r["question_id"]: r["answer_value"] for r in S.latest_answers(db_rows)}
    for q in {q for q, _, _ in rows}:
        candidates = [(t, i) for i, (qq, t, _) in enumerate(rows) if qq == q]
        assert latest[q] == str(max(candidates)[1])  # latest time, then the later row


@settings(max_examples=200, deadline=None)
@given(qids=st.lists(st.integers(min_value=-(2**60), max_value=2**60), min_size=1, max_size=30))
def test_latest_rows_fast_path_equals_the_map_walk(qids: list[int]) -> None:
    rows = [{"id": str(i), "question_id": q, "answer_value": str(i), "created_at": NOW} for i, q in enumerate(qids)]
    as_text = [{**r, "question_id": js_string(r["question_id"])} for r in rows]  # strings take the general walk
    picked = [r["id"] for r in S._latest_rows(rows)]
    assert picked == [r["id"] for r in S._latest_rows(as_text)]
