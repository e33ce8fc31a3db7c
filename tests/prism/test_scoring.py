"""Tests for gatefill.prism.scoring: goldens, worked examples, the legacy FC branch, calibration, the wrapper, JSONL."""

from __future__ import annotations

import copy
import json
import math
import random
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from functools import cmp_to_key
from pathlib import Path

import pytest

from gatefill.errors import InputLineError, UsageError
from gatefill.prism import scoring as S
from gatefill.prism.jsmath import js_dumps, to_fixed

GOLDENS = Path(__file__).parent / "goldens"
NOW = datetime(2025, 9, 17, 18, 5, 30, 123456, tzinfo=UTC)
SEED = S.load_fc_seed()
OPTIONS = SEED.weights_by_option_id()
KEY = S.load_scoring_key()


def golden(i: int) -> tuple[dict[str, object], dict[str, object]]:
    inp = json.loads((GOLDENS / f"g{i}.input.json").read_text())
    out = json.loads((GOLDENS / f"g{i}.output.json").read_text())
    return inp, out


def fc_responses(letter: str) -> list[dict[str, object]]:
    return [{"block_id": o["block_id"], "option_id": o["id"]} for o in SEED.options if o["option_code"] == letter]


def realistic_answers(
    rnd: random.Random, *, fc_letters: bool = False, start: datetime = NOW
) -> list[dict[str, object]]:
    """A full 248-answer session as assessment_responses rows (answers are text, as in the DB)."""
    rows: list[dict[str, object]] = []
    for q in range(1, 249):
        row = KEY.get(str(q))
        st = row.scale_type if row else "META"
        if st == "LIKERT_1_5":
            v = str(rnd.randint(1, 5))
        elif st in ("LIKERT_1_7", "STATE_1_7"):
            v = str(rnd.randint(1, 7))
        elif row is not None and row.fc_map:
            v = rnd.choice(list(row.fc_map)) if fc_letters else "Structured environment with clear goals"
        else:
            v = rnd.choice(["25-34", "Other", "A,B"])
        rows.append(
            {
                "id": str(uuid.UUID(int=rnd.getrandbits(128))),
                "question_id": q,
                "answer_value": v,
                "created_at": start - timedelta(minutes=30) + timedelta(seconds=q),
            }
        )
    return rows


def realistic_fc(rnd: random.Random) -> list[dict[str, object]]:
    return [
        {"block_id": b["id"], "option_id": rnd.choice([o["id"] for o in SEED.options if o["block_id"] == b["id"]])}
        for b in SEED.blocks
    ]


# ====================================================================================================================
# Goldens


@pytest.mark.parametrize("i", range(1, 7))
def test_golden_field_for_field(i: int) -> None:
    inp, expected = golden(i)
    out = S.score_assessment(inp)
    assert list(out) == list(expected)
    for k in expected:
        assert out[k] == expected[k], k
    assert out == expected


@pytest.mark.parametrize("i", range(1, 7))
def test_golden_bytes(i: int) -> None:
    inp, expected = golden(i)
    assert js_dumps(S.score_assessment(inp)) == js_dumps(expected)
    assert js_dumps(expected) == json.dumps(expected, separators=(",", ":"))  # the golden text, re-dumped compactly


@pytest.mark.parametrize("i", range(1, 7))
def test_golden_deterministic_and_input_untouched(i: int) -> None:
    inp, _ = golden(i)
    before = copy.deepcopy(inp)
    a = S.score_assessment(inp)
    b = S.score_assessment(inp)
    assert js_dumps(a) == js_dumps(b)
    assert inp == before


def test_goldens_through_jsonl() -> None:
    lines = [(GOLDENS / f"g{i}.input.json").read_text().replace("\n", " ") for i in range(1, 7)]
    out = list(S.score_jsonl("profile", lines))
    assert out == [js_dumps(golden(i)[1]) for i in range(1, 7)]


def test_golden_shares_need_fdlibm_exp() -> None:
    # g5/g6 fail with math.exp: the fdlibm transliteration is what makes the third share exact.
    _, g5 = golden(5)
    assert g5["top_types"][2]["share"] == 0.16089605915628677  # type: ignore[index]


# ====================================================================================================================
# FC tally (§2)


def test_fc_all_a_worked_example() -> None:
    tally = S.score_fc_session(fc_responses("A"), OPTIONS)
    assert tally.blocks_answered == 6 and tally.written and not tally.empty_scores
    assert tally.scores == {"Te": 90, "Ti": 90, "Fe": 50, "Fi": 60, "Ne": 80, "Ni": 100, "Se": 70, "Si": 50}
    assert list(tally.scores) == ["Te", "Ti", "Fe", "Fi", "Ne", "Ni", "Se", "Si"]  # the seed's key order


def test_fc_all_b_worked_example() -> None:
    tally = S.score_fc_session(fc_responses("B"), OPTIONS)
    assert tally.blocks_answered == 6
    assert tally.scores == {
        "Te": 45.45,
        "Ti": 45.45,
        "Fe": 100,
        "Fi": 100,
        "Ne": 63.64,
        "Ni": 54.55,
        "Se": 72.73,
        "Si": 72.73,
    }


def test_fc_no_responses_writes_nothing() -> None:
    tally = S.score_fc_session([], OPTIONS)
    assert tally == S.FcTally(blocks_answered=0, scores={}, written=False)
    assert not tally.empty_scores and not tally.writable


def test_fc_unresolvable_options_is_the_empty_row() -> None:
    tally = S.score_fc_session([{"block_id": "b", "option_id": "nope"}, {"block_id": "c", "option_id": 7}], OPTIONS)
    assert tally.written  # the original wrote scores_json = {} with blocks_answered 0
    assert tally.empty_scores and not tally.writable
    assert tally.blocks_answered == 0 and tally.scores == {}
    assert tally.unresolved_option_ids == ["nope", 7]


def test_fc_partial_resolution_counts_only_known_options() -> None:
    responses = [*fc_responses("A")[:3], {"block_id": "x", "option_id": "missing"}]
    tally = S.score_fc_session(responses, OPTIONS)
    assert tally.blocks_answered == 3 and tally.unresolved_option_ids == ["missing"]
    assert max(tally.scores.values()) == 100


def test_fc_types_basis_and_coercions() -> None:
    opts = {"o1": {"Ti": "3", "Fe": None, "Ne": True, "x": "abc"}, "o2": {"Ti": 1, "1": 2, "0": 1}, "o3": None}
    resp = [{"block_id": "b", "option_id": o} for o in ("o1", "o2", "o3")]
    tally = S.score_fc_session(resp, opts)
    assert tally.blocks_answered == 3
    assert list(tally.scores) == ["0", "1", "Ti", "Fe", "Ne", "x"]  # JS objects list integer keys first
    assert tally.scores == {"0": 25, "1": 50, "Ti": 100, "Fe": 0, "Ne": 25, "x": 0}
    types = S.score_fc_session(resp, opts, basis="types")
    assert types.scores == {"0": 0.125, "1": 0.25, "Ti": 0.5, "Fe": 0, "Ne": 0.125, "x": 0}


def test_fc_prototype_named_weight_keys() -> None:
    resp = [{"block_id": "b", "option_id": "o"}]
    # "__proto__" is silently dropped by a JS object; "constructor" turns the tally into a string and all scores NaN.
    assert S.score_fc_session(resp, {"o": {"__proto__": 5, "Ti": 2}}).scores == {"Ti": 100}
    poisoned = S.score_fc_session(resp, {"o": {"constructor": 1, "Ti": 2}})
    assert list(poisoned.scores) == ["constructor", "Ti"]
    assert all(math.isnan(v) for v in poisoned.scores.values())
    assert not poisoned.finite and not poisoned.writable


def test_fc_tally_row() -> None:
    row = S.score_fc_session(fc_responses("A"), OPTIONS).to_row("s1")
    assert row == {
        "session_id": "s1",
        "version": "v1.2",
        "fc_kind": "functions",
        "scores_json": {"Te": 90, "Ti": 90, "Fe": 50, "Fi": 60, "Ne": 80, "Ni": 100, "Se": 70, "Si": 50},
        "blocks_answered": 6,
    }


# ====================================================================================================================
# Engine details (§3)


def test_present_but_empty_fc_scores_halve_strengths() -> None:
    inp, no_fc = golden(3)
    with_empty = S.score_assessment({**inp, "fcFunctionScores": {}})
    halves = {f: to_fixed(v / 2, 3) for f, v in no_fc["strengths"].items()}  # type: ignore[attr-defined]
    assert with_empty["strengths"] == halves
    assert with_empty["fc_answered_ct"] == 0
    assert S.score_assessment({**inp, "fcFunctionScores": None}) == no_fc


def _legacy_input(answer: object, fc: object = None) -> dict[str, object]:
    key = {k: r.as_json() for k, r in KEY.items()}
    likert = [{"question_id": q, "answer_value": "4"} for q in range(17, 65)]
    fc_q = [q for q in range(129, 141) if KEY[str(q)].fc_map] + list(range(222, 230))
    inp: dict[str, object] = {
        "sessionId": "s",
        "responses": likert + [{"question_id": q, "answer_value": answer} for q in fc_q],
        "scoringKey": key,
        "config": S.engine_config(S.scoring_config_defaults(), None),
    }
    if fc is not None:
        inp["fcFunctionScores"] = fc
    return inp


def test_legacy_fc_map_branch_all_a() -> None:
    out = S.score_assessment(_legacy_input("A"))
    # A on q129–140 (10 mapped items) and q222–229: Te 9, Ni 3, Ti 2, Fe 1, Fi 1, Si 1, Ne 1 (18 answers).
    counts = {"Ti": 2, "Te": 9, "Fi": 1, "Fe": 1, "Ni": 3, "Ne": 1, "Si": 1, "Se": 0}
    expected = {f: to_fixed(0.5 * 4.0 + 0.5 * ((c / 18) * 5), 3) for f, c in counts.items()}
    assert out["strengths"] == expected
    assert out["fc_answered_ct"] == 18
    assert out["fc_coverage_bucket"] == "low"  # 18 < fc_expected_min 24


def test_legacy_fc_map_branch_b_to_e() -> None:
    for letter in "BCDE":
        out = S.score_assessment(_legacy_input(letter))
        assert out["fc_answered_ct"] == {"B": 18, "C": 10, "D": 10, "E": 1}[letter]


def test_legacy_branch_needs_a_bare_key() -> None:
    plain = S.score_assessment(_legacy_input("Structured environment"))
    lowercase = S.score_assessment(_legacy_input("a"))
    assert plain["fc_answered_ct"] == lowercase["fc_answered_ct"] == 0
    assert plain["strengths"] == dict.fromkeys(S.FUNCS, 4)


def test_legacy_branch_ignored_when_fc_scores_present() -> None:
    out = S.score_assessment(_legacy_input("A", fc={"Ti": 100}))
    assert out["fc_answered_ct"] == 1
    assert out["strengths"]["Ti"] == 4.5  # type: ignore[index]
    assert out["strengths"]["Te"] == 2  # type: ignore[index]


def test_reverse_scored_items_do_not_mutate_and_are_stable() -> None:
    rnd = random.Random(3)
    rows = realistic_answers(rnd)
    inp = S.ReferenceData.from_package().profile_input("s", S.latest_answers(rows))
    assert any(KEY[str(r["question_id"])].reverse_scored for r in inp["responses"])  # type: ignore[attr-defined,index]
    before = copy.deepcopy(inp)
    first = S.score_assessment(inp)
    second = S.score_assessment(inp)
    assert inp == before
    assert js_dumps(first) == js_dumps(second)


def test_reverse_scoring_value_and_likert_1_7_quirk() -> None:
    key = {"1": {"tag": "Ti_S", "scale_type": "LIKERT_1_5", "reverse_scored": True}}
    cfg = json.loads((GOLDENS / "g1.input.json").read_text())["config"]
    out = S.score_assessment({"responses": [{"question_id": 1, "answer_value": "5"}], "scoringKey": key, "config": cfg})
    assert out["strengths"]["Ti"] == 1  # type: ignore[index]
    key7 = {"1": {"tag": "Ti_S", "scale_type": "LIKERT_1_7", "reverse_scored": True}}
    out7 = S.score_assessment({"responses": [{"question_id": 1, "answer_value": 7}], "scoringKey": key7, "config": cfg})
    assert out7["strengths"]["Ti"] == -1  # type: ignore[index]  # 5 + 1 - 7 whatever the scale


def test_answer_parsing_in_the_item_pass() -> None:
    key = {"1": {"tag": "Ti_S", "scale_type": "LIKERT_1_5"}}
    cfg = json.loads((GOLDENS / "g1.input.json").read_text())["config"]

    def ti(*answers: object) -> object:
        responses = [{"question_id": 1, "answer_value": a} for a in answers]
        return S.score_assessment({"responses": responses, "scoringKey": key, "config": cfg})["strengths"]["Ti"]  # type: ignore[index]

    assert ti("", 4) == 2  # "" is 0, not skipped
    assert ti(None, 4) == 4  # null is skipped
    assert ti("Infinity", "abc", 4) == 4
    assert ti(" 0x3 ", [5]) == 4
    assert ti(True, "3") == 2


def test_question_ids_are_looked_up_as_strings() -> None:
    cfg = json.loads((GOLDENS / "g1.input.json").read_text())["config"]
    key = {"17": {"tag": "Ti_S", "scale_type": "LIKERT_1_5"}, "true": {"tag": "Te_S", "scale_type": "LIKERT_1_5"}}
    base = {"scoringKey": key, "config": cfg}
    for qid in (17, "17", 17.0):
        out = S.score_assessment({**base, "responses": [{"question_id": qid, "answer_value": 5}]})
        assert out["strengths"]["Ti"] == 5  # type: ignore[index]
    for qid in ("017", 17.5, True):
        out = S.score_assessment({**base, "responses": [{"question_id": qid, "answer_value": 5}]})
        assert out["strengths"]["Ti"] == 0  # type: ignore[index]
    out = S.score_assessment({**base, "responses": [{"question_id": True, "answer_value": 5}]})
    assert out["strengths"]["Te"] == 5  # type: ignore[index]  # String(true) is "true"


def test_v8_sort_equals_python_sort_for_consistent_comparators() -> None:
    rnd = random.Random(4)
    for _ in range(2000):
        fits = [rnd.choice([3.65, 5.7, 5.325, 6.7]) if rnd.random() < 0.5 else rnd.uniform(0, 14.5) for _ in range(16)]

        def cmp(a: int, b: int, fits: list[float] = fits) -> float:
            return fits[b] - fits[a]

        assert S._v8_sort16(16, cmp) == sorted(range(16), key=cmp_to_key(cmp))


def test_missing_results_version_omits_the_version_keys() -> None:
    inp, expected = golden(1)
    cfg = dict(inp["config"])  # type: ignore[call-overload]
    del cfg["results_version"]
    out = S.score_assessment({**inp, "config": cfg})
    assert "version" not in out and "results_version" not in out
    assert js_dumps(out) == js_dumps({k: v for k, v in expected.items() if k not in ("version", "results_version")})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda inp: inp.pop("responses"),
        lambda inp: inp.update(scoringKey=[]),
        lambda inp: inp.update(config=None),
        lambda inp: inp["config"].pop("conf_raw_params"),
        lambda inp: inp["config"].update(fit_band_thresholds=None),
        lambda inp: inp.update(fcFunctionScores=[1, 2]),
        lambda inp: inp["config"].update(typePrototypes={"LIE": {}}),
        lambda inp: inp["scoringKey"]["1"].update(tag=5),
        lambda inp: inp["scoringKey"]["1"].update(fc_map=[1]),
        lambda inp: inp.update(responses=[None]),
    ],
)
def test_inputs_the_original_could_not_score(mutate: object) -> None:
    inp, _ = golden(1)
    mutate(inp)  # type: ignore[operator]
    with pytest.raises(S.ScoringInputError):
        S.score_assessment(inp)


# ====================================================================================================================
# Calibration (§4.3)


def _profile(fit1: float, fit2: float, shares: tuple[float, float, float]) -> dict[str, object]:
    codes = ("LII", "ILE", "LSI")
    return {
        "top_types": [{"code": c, "share": s} for c, s in zip(codes, shares, strict=True)],
        "top_3_fits": [
            {"code": c, "fit": f, "share": s} for c, f, s in zip(codes, (fit1, fit2, 0), shares, strict=True)
        ],
        "fit_band": "low_fit",
        "overlay": "0",
    }


def test_platt_fallback_range() -> None:
    assert to_fixed(S.platt_fallback(0.0), 4) == 0.3775
    assert to_fixed(S.platt_fallback(1.0), 4) == 0.6682
    for i in range(1001):
        cal = S.platt_fallback(i / 1000)
        assert 0.3775 <= to_fixed(cal, 4) <= 0.6682
        assert cal < 0.75  # never High


def test_platt_fallback_moderate_threshold() -> None:
    lo, hi = 0.5, 0.7
    for _ in range(200):  # bisection to the exact double where cal reaches 0.55
        mid = (lo + hi) / 2
        if S.platt_fallback(mid) >= 0.55:
            hi = mid
        else:
            lo = mid
    assert to_fixed(hi, 5) == 0.58389
    assert S.platt_fallback(hi) >= 0.55 > S.platt_fallback(math.nextafter(hi, 0))
    assert S.platt_fallback(0.5838) < 0.55 <= S.platt_fallback(0.5840)


def test_calibrate_fallback_on_goldens() -> None:
    for i in range(1, 7):
        out = golden(i)[1]
        cal = S.calibrate(out, None, None)
        assert list(cal) == ["conf_raw", "conf_calibrated", "confidence"]
        assert 0.3775 <= cal["conf_calibrated"] <= 0.6682  # type: ignore[operator]
        assert cal["confidence"] in ("Low", "Moderate")
        assert S.calibrate_detail(out, None, None).method == "platt_fallback"


def test_calibrate_raw_uses_top3_entropy() -> None:
    p = _profile(6.7, 6.4, (0.5, 0.3, 0.2))
    h3 = -sum(s * math.log2(s) for s in (0.5, 0.3, 0.2))
    raw = 1 / (1 + math.exp(-(0.25 * (6.7 - 6.4) + 0.35 * 20.0 / 100 - 0.2 * h3)))
    detail = S.calibrate_detail(p, None, None)
    assert abs(detail.raw - raw) < 1e-12
    assert detail.conf_raw == to_fixed(detail.raw, 4)
    assert S.calibrate(p, {"a": 2.5, "b": 8.0, "c": 1.2}, None)["conf_raw"] != detail.conf_raw


def test_calibrate_knots() -> None:
    p = _profile(6.7, 6.4, (0.5, 0.3, 0.2))
    raw = S.calibrate_detail(p, None, None).raw
    knots = [(0.9, 0.95), (0.1, 0.2), (0.5, 0.6)]  # unsorted on purpose
    cal = S.calibrate_detail(p, None, None, knots)
    lo, hi = ((0.1, 0.2), (0.5, 0.6)) if raw <= 0.5 else ((0.5, 0.6), (0.9, 0.95))
    expected = lo[1] + (raw - lo[0]) / (hi[0] - lo[0]) * (hi[1] - lo[1])
    assert cal.method == "knots" and abs(cal.calibrated - expected) < 1e-12
    assert S.calibrate(p, None, None, [{"x": 0.9, "y": 0.8}, {"x": 0.95, "y": 0.9}])["conf_calibrated"] == 0.8
    assert S.calibrate(p, None, None, [(0.0, -0.5), (0.01, -0.4)])["conf_calibrated"] == -0.4  # ends not clamped
    assert S.calibrate(p, None, None, [(0.0, 0.5), (1.0, 3.0)])["conf_calibrated"] == 1  # interior clamped
    assert S.calibrate(p, None, None, [(0.3, 0.9)]) == {
        "conf_raw": to_fixed(raw, 4),
        "conf_calibrated": 0.9,
        "confidence": "High",
    }
    zero = S.calibrate(p, None, None, [])
    assert zero["conf_calibrated"] == zero["conf_raw"]
    assert S.calibrate(p, None, {"high": 0.3, "moderate": 0.2}, [])["confidence"] == "High"
    assert S.calibrate(p, None, None, [(raw, 0.7), (raw, 0.1), (1.0, 0.9)])["conf_calibrated"] == 0.7  # x0 == x1


# ====================================================================================================================
# Reference data and the score_prism wrapper (§4)


def test_shipped_reference_data() -> None:
    assert len(KEY) == 246
    assert KEY["231"].reverse_scored and KEY["231"].tag == "Ti_S" and KEY["231"].pair_group == "P1"
    assert KEY["129"].fc_map == {"A": "Te", "B": "Si", "C": "Se", "D": "Ne"}
    per_func = {f: 0 for f in S.FUNCS}
    for r in KEY.values():
        if r.tag and r.tag[:2] in per_func and r.scale_type.startswith("LIKERT"):
            per_func[r.tag[:2]] += 1
    assert per_func == {"Ti": 14, "Te": 12, "Fi": 11, "Fe": 13, "Ni": 11, "Ne": 12, "Si": 13, "Se": 13}
    assert len(SEED.blocks) == 6 and len(SEED.options) == 24
    protos = S.load_type_prototypes()
    assert {c: {f: seat for seat, f in seats.items()} for c, seats in protos.items()} == S.FALLBACK_PROTOTYPES
    cfg = S.scoring_config_defaults()
    assert cfg["fit_band_thresholds"] == {"high_fit": 60, "moderate_fit": 45, "high_gap": 5, "moderate_gap": 2}
    assert cfg["fc_expected_min"] == 24 and cfg["results_version"] == "v1.2.1"


def test_engine_config() -> None:
    cfg = S.engine_config(S.scoring_config_defaults(), S.load_type_prototypes())
    assert list(cfg) == [
        "results_version",
        "dim_thresholds",
        "neuro_norms",
        "overlay_neuro_cut",
        "overlay_state_weights",
        "softmax_temp",
        "conf_raw_params",
        "fit_band_thresholds",
        "fc_expected_min",
        "typePrototypes",
    ]
    assert cfg["typePrototypes"] == S.FALLBACK_PROTOTYPES
    empty = S.engine_config({}, None)
    assert empty["results_version"] == "v1.2.1" and empty["softmax_temp"] == 1 and empty["fc_expected_min"] == 0
    assert empty["conf_raw_params"] == {"a": 0.25, "b": 0.35, "c": 0.2}
    assert empty["fit_band_thresholds"] == {"high_fit": 10, "moderate_fit": 5, "high_gap": 0.2, "moderate_gap": 0.1}
    assert S.engine_config({"results_version": "v1.2.2"}, None)["results_version"] == "v1.2.2"  # as stored


def test_engine_config_uses_db_prototypes_only_with_128_rows() -> None:
    rows = [(c, f, seat) for c, seats in S.FALLBACK_PROTOTYPES.items() for f, seat in seats.items()]
    swapped = [(c, f, "creative" if (c, f) == ("LIE", "Te") else seat) for c, f, seat in rows]
    assert S.engine_config({}, swapped)["typePrototypes"]["LIE"]["Te"] == "creative"  # type: ignore[index]
    assert S.engine_config({}, swapped[:-1])["typePrototypes"]["LIE"]["Te"] == "base"  # type: ignore[index]
    dict_rows = [{"type_code": c, "func": f, "block": s} for c, f, s in swapped]
    assert S.engine_config({}, dict_rows)["typePrototypes"]["LIE"]["Te"] == "creative"  # type: ignore[index]


def test_latest_answers() -> None:
    t = datetime(2025, 9, 17, 12, tzinfo=UTC)
    rows = [
        {"id": "a", "question_id": 1, "answer_value": "1", "created_at": t},
        {"id": "b", "question_id": 2, "answer_value": "2", "created_at": t},
        {"id": "c", "question_id": "1", "answer_value": "3", "created_at": t + timedelta(seconds=1)},
        {"id": "d", "question_id": 2, "answer_value": "4", "created_at": t - timedelta(seconds=1)},
        {"id": "e", "question_id": 3, "answer_value": "5", "created_at": "2025-09-17T12:00:00.123456+00:00"},
        {"id": "f", "question_id": 3, "answer_value": "6", "created_at": "2025-09-17T12:00:00.123999Z"},  # same ms
        {"id": "g", "question_id": 4, "answer_value": "7", "created_at": "garbage"},
        {"id": "a", "question_id": 4, "answer_value": "8", "created_at": t},  # invalid date → ids: "a" < "g"
    ]
    assert S.latest_answers(rows) == [
        {"question_id": "1", "answer_value": "3"},
        {"question_id": 2, "answer_value": "2"},
        {"question_id": 3, "answer_value": "6"},
        {"question_id": 4, "answer_value": "7"},
    ]


def test_build_profile_row() -> None:
    out = golden(1)[1]
    cal = {"conf_raw": 0.4, "conf_calibrated": 0.5, "confidence": "Low"}
    row = S.build_profile_row("sid", out, cal, None, NOW, fc_blocks_answered=6)
    assert list(row) == [*out, "session_id", "submitted_at", "recomputed_at", "created_at", "updated_at"]
    assert row["conf_raw"] == 0.4 and row["conf_calibrated"] == 0.5 and row["confidence"] == "Low"
    assert row["fc_answered_ct"] == 8  # not overwritten by blocks_answered before @afd676c
    assert row["submitted_at"] == row["created_at"] == row["updated_at"] == "2025-09-17T18:05:30.123Z"
    assert row["recomputed_at"] is None
    assert row["version"] == row["results_version"] == "v1.2.1"
    again = S.build_profile_row("sid", out, cal, {"submitted_at": "2025-08-01T00:00:00+00:00"}, NOW)
    assert again["created_at"] == again["submitted_at"] == "2025-08-01T00:00:00+00:00"
    assert again["recomputed_at"] == again["updated_at"] == "2025-09-17T18:05:30.123Z"
    no_submit = S.build_profile_row("sid", out, cal, {"submitted_at": None}, NOW)
    assert no_submit["created_at"] == no_submit["recomputed_at"] == "2025-09-17T18:05:30.123Z"
    other_zone = datetime(2025, 9, 17, 20, 5, 30, 999999, tzinfo=timezone(timedelta(hours=2)))
    assert S.build_profile_row("sid", out, cal, None, other_zone)["updated_at"] == "2025-09-17T18:05:30.999Z"
    relabelled = S.build_profile_row("sid", {**out, "version": "v9", "results_version": "v9"}, cal, None, NOW)
    assert relabelled["version"] == relabelled["results_version"] == "v1.2.1"


# ====================================================================================================================
# score_session


REF = S.ReferenceData.from_package()


def _generic(inputs: S.SessionInputs, fc_scores: object, existing: Mapping[str, object] | None) -> dict[str, object]:
    """The same profile row through the public pieces, one by one."""
    responses = S.latest_answers(inputs.answers)
    out = S.score_assessment(REF.profile_input(inputs.session_id, responses, fc_scores))
    cfg = S.scoring_config_defaults()
    cal = S.calibrate(out, cfg["conf_raw_params"], cfg["conf_band_cuts"])  # type: ignore[arg-type]
    return S.build_profile_row(inputs.session_id, out, cal, existing, NOW)


@pytest.mark.parametrize("seed", range(8))
def test_score_session_realistic(seed: int) -> None:
    rnd = random.Random(seed)
    inputs = S.SessionInputs(session_id=f"s{seed}", answers=realistic_answers(rnd), fc_responses=realistic_fc(rnd))
    before = copy.deepcopy(inputs)
    score = S.score_session(inputs, REF, NOW, None)
    assert inputs == before
    assert score.fc_tally is not None and score.fc_tally.blocks_answered == 6
    assert score.fc_scores_row == score.fc_tally.to_row(f"s{seed}")
    assert score.findings == []
    assert [e for e, _ in score.events] == ["fc_scores_loaded"]
    assert score.calibration_method == "platt_fallback"
    assert score.profile_row == _generic(inputs, score.fc_tally.scores, None)
    assert score.profile_row is not None and score.profile_row["fc_answered_ct"] == 8
    assert score.profile_row["fit_band"] == "low_fit" and score.profile_row["fc_coverage_bucket"] == "low"
    again = S.score_session(inputs, REF, NOW, None)
    assert js_dumps(again.profile_row) == js_dumps(score.profile_row)


def test_score_session_without_fc_uses_legacy_branch() -> None:
    rnd = random.Random(20)
    inputs = S.SessionInputs(session_id="s", answers=realistic_answers(rnd, fc_letters=True))
    score = S.score_session(inputs, REF, NOW, {"submitted_at": "2025-09-01T00:00:00Z"})
    assert score.fc_tally is not None and not score.fc_tally.written and score.fc_scores_row is None
    assert [e for e, _ in score.events] == ["fc_no_responses", "fc_fallback_legacy"]
    assert score.profile_row == _generic(inputs, None, {"submitted_at": "2025-09-01T00:00:00Z"})
    assert score.profile_row is not None and score.profile_row["fc_answered_ct"] == 18


def test_score_session_never_writes_an_empty_fc_row() -> None:
    rnd = random.Random(21)
    inputs = S.SessionInputs(
        session_id="s", answers=realistic_answers(rnd), fc_responses=[{"block_id": "b", "option_id": "x"}]
    )
    score = S.score_session(inputs, REF, NOW, None)
    assert score.fc_tally is not None and score.fc_tally.empty_scores
    assert score.fc_scores_row is None
    assert "fc_scores_empty" in score.findings
    assert [e for e, _ in score.events] == ["fc_option_not_found", "fc_fallback_legacy"]
    assert score.profile_row == _generic(inputs, None, None)  # scored as if no fc_scores row existed


def test_score_session_existing_fc_scores() -> None:
    rnd = random.Random(22)
    answers = realistic_answers(rnd)
    existing = S.score_fc_session(fc_responses("A"), OPTIONS).scores
    score = S.score_session(
        S.SessionInputs("s", answers, fc_responses("B"), existing_fc_scores=existing), REF, NOW, None
    )
    assert score.fc_tally is None and score.fc_scores_row is None
    assert score.profile_row == _generic(S.SessionInputs("s", answers), existing, None)
    empty = S.score_session(S.SessionInputs("s", answers, existing_fc_scores={}), REF, NOW, None)
    assert "existing_fc_scores_empty" in empty.findings and empty.profile_row is None
    assert empty.engine_output is not None and empty.engine_output["fc_answered_ct"] == 0


def test_score_session_without_answers() -> None:
    score = S.score_session(S.SessionInputs("s", [], fc_responses("A")), REF, NOW, None)
    assert score.fc_scores_row is not None  # score_fc_session ran first and wrote its row
    assert score.engine_output is None and score.profile_row is None and "no_responses" in score.findings


def test_score_session_version_override_event() -> None:
    cfg = {**S.scoring_config_defaults(), "results_version": "v1.2.2"}
    ref = S.ReferenceData(REF.scoring_key, REF.fc_options, cfg, S.load_type_prototypes())
    score = S.score_session(S.SessionInputs("s", realistic_answers(random.Random(5))), ref, NOW, None)
    assert (
        "engine_version_override",
        {"db_version": "v1.2.2", "engine_version": "v1.2.1", "session_id": "s"},
    ) in score.events
    assert score.engine_output is not None and score.engine_output["results_version"] == "v1.2.2"
    assert score.profile_row is not None and score.profile_row["results_version"] == "v1.2.1"


def test_score_session_calibration_models() -> None:
    knots = {("low_fit", "minus"): [(0.0, 0.1), (1.0, 0.9)]}
    ref = S.ReferenceData(REF.scoring_key, REF.fc_options, S.scoring_config_defaults(), None, calibration_knots=knots)
    score = S.score_session(S.SessionInputs("s", realistic_answers(random.Random(6))), ref, NOW, None)
    assert score.calibration_method == "knots"
    ref2 = S.ReferenceData(REF.scoring_key, REF.fc_options, S.scoring_config_defaults(), None, lambda band, ov: None)
    assert (
        S.score_session(S.SessionInputs("s", realistic_answers(random.Random(6))), ref2, NOW, None).calibration_method
        == "platt_fallback"
    )


# ====================================================================================================================
# JSON Lines


def test_jsonl_fc_and_calibrate() -> None:
    fc_line = json.dumps(
        {"session_id": "s", "version": "v1.2", "basis": "functions", "responses": fc_responses("A"), "options": OPTIONS}
    )
    empty_line = json.dumps({"session_id": "s", "responses": [{"block_id": "b", "option_id": "x"}], "options": OPTIONS})
    none_line = json.dumps({"session_id": "s", "responses": [], "options": {}})
    out = [json.loads(x) for x in S.score_jsonl("fc", [fc_line, "", empty_line, none_line])]
    assert out[0]["scores"] == {"Te": 90, "Ti": 90, "Fe": 50, "Fi": 60, "Ne": 80, "Ni": 100, "Se": 70, "Si": 50}
    assert list(out[0])[:3] == ["blocks_answered", "scores", "written"]
    assert (out[1]["written"], out[1]["empty_scores"], out[1]["scores"]) == (True, True, {})
    assert (out[2]["written"], out[2]["blocks_answered"]) == (False, 0)
    cal_line = json.dumps({"profile": golden(1)[1], "conf_raw_params": {"a": 0.25, "b": 0.35, "c": 0.2}, "cuts": None})
    (cal,) = S.score_jsonl("calibrate", [cal_line])
    assert list(json.loads(cal)) == ["conf_raw", "conf_calibrated", "confidence"]
    assert json.loads(cal) == S.calibrate(golden(1)[1], None, None)


@pytest.mark.parametrize(
    ("kind", "lines", "line_no"),
    [
        ("profile", ["{", ""], 1),
        ("profile", ["", "   ", "[1]"], 3),
        ("profile", ['{"responses": NaN}'], 1),
        ("profile", [json.dumps(golden(1)[0]), '{"responses": []}'], 2),
        ("fc", ['{"session_id": "s", "responses": [{"option_id": "x"}], "options": {}}'], 1),
        ("fc", ['{"responses": [], "options": {}}'], 1),
        ("calibrate", ["", '{"profile": {"top_types": []}}'], 2),
        ("calibrate", ['{"profile": {}, "knots": 5}'], 1),
    ],
)
def test_jsonl_errors(kind: str, lines: list[str], line_no: int) -> None:
    with pytest.raises(InputLineError) as info:
        list(S.score_jsonl(kind, lines))
    assert info.value.line_no == line_no


def test_jsonl_outputs_before_an_error_and_unknown_kind() -> None:
    it = S.score_jsonl("profile", [json.dumps(golden(2)[0]), "oops"])
    assert next(it) == js_dumps(golden(2)[1])
    with pytest.raises(InputLineError):
        next(it)
    with pytest.raises(UsageError):
        S.score_jsonl("nope", [])
