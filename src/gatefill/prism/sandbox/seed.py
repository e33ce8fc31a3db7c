"""Deterministic, realistic PRISM data for the demo, the tests and the benchmarks, with its exact ground truth.

``seed_scenario(db, name)`` fills an initialised PRISM database with one of three scenarios and returns a
``SeedReport`` that lists, per category, exactly which sessions it built that way:

- ``staging-2025-09-17``: the staging project the original plan was written against. Completed sessions since
  2025-08-01, of which exactly 39 lack a v1.2 ``functions`` fc_scores row (13 of them lack a profile as well, 26 are
  "fc_only"), including the plan's two test sessions and its five "recent_september" ids; the rest are complete.
  Around them the traps a careless discovery falls into: completed sessions without FC answers, one whose FC answer
  points at an option that does not exist, one completed with fewer than 148 answers, in-progress and abandoned
  sessions, sessions from before the window (some lacking rows) and profiles stamped ``v1.2.0``.
- ``production-2025-09-18``: 157 completed sessions since 2025-08-01, all complete, plus a few unfinished and older
  ones.
- ``synthetic``: N completed sessions with a given fraction lacking rows, built for volume (COPY on Postgres).

Realism: every session belongs to a simulated respondent with a latent PRISM type (the type's base and creative
functions rated high), who answers all 248 questions on each item's own scale from the shipped scoring key (FC items
with the option's label text, as the frontend stores it), with response times, a few malformed or skipped answers,
and one v1.2 FC option per block chosen in line with the latent type. Derived rows that a session is said to have
(fc_scores, profiles) are never written by hand: they come from ``gatefill.prism.scoring.score_session``, the code
path the backfill itself uses, with the timestamps of the moment the platform would have written them.

Everything is a function of the scenario, ``seed`` and ``now``: ``random.Random`` drives every choice and every UUID,
so the same arguments give the same database, row for row, on SQLite and on Postgres alike.

Writing: one transaction per seeding, in which ``replace`` first deletes the PRISM data rows (never reference data).
Postgres gets COPY in text format (rows pre-formatted as text, sent in blocks of a few MB), SQLite ``executemany``.
The synthetic scenario is built for volume (100k sessions = 24.8M answers): sessions draw their answer sheets from a
pool of 512 simulated respondents whose rows are formatted once, fc_scores/profiles are computed once per respondent
(exact for every session sharing those answers), answer ids derive from the session id (see ``_question_tails``),
sessions are written in id order so every index grows at its right edge, and on Postgres the per-row foreign-key
triggers are skipped for that load (``session_replication_role``; the rows are consistent by construction and the
constraints stay) so that a second connection can load half of the answers in parallel (``_HelperCopy``).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gatefill.db import Database, JSONValue, TextArray, UTCTimestamp, dumps_json, format_utc
from gatefill.errors import DatabaseError, DataError, UsageError
from gatefill.prism.schema import (
    PROFILE_RESULT_COLUMNS,
    assessment_responses,
    assessment_sessions,
    fc_responses,
    fc_scores,
    fn_logs,
    load_reference_data,
    profiles,
    reference_rows,
    require_schema,
)
from gatefill.prism.scoring import ENGINE_VERSION, FC_VERSION, ReferenceData, SessionInputs, score_session

__all__ = [
    "SCENARIOS",
    "TEST_SESSION_A",
    "TEST_SESSION_B",
    "WINDOW_START",
    "SeedReport",
    "seed_scenario",
    "validate_seed_arguments",
]

SCENARIOS = ("staging-2025-09-17", "production-2025-09-18", "synthetic")
#: Start of the window every plan of 2025-09-17/18 used (``created_at >= '2025-08-01'``).
WINDOW_START = datetime(2025, 8, 1, tzinfo=UTC)
_DEFAULT_NOW = {
    "staging-2025-09-17": datetime(2025, 9, 17, 8, 0, tzinfo=UTC),
    "production-2025-09-18": datetime(2025, 9, 18, 0, 10, tzinfo=UTC),
    "synthetic": datetime(2025, 9, 17, 8, 0, tzinfo=UTC),
}
_MAX_SYNTHETIC = 2_000_000
_TOTAL_QUESTIONS = 248
_MIN_ANSWERS = 148
_FC_VERSION = FC_VERSION
_CURRENT = ENGINE_VERSION
_STALE = "v1.2.0"

#: The plan's test sessions (data model §1.3: mock fc_responses, option A resp. B in every v1.2 block).
TEST_SESSION_A = "618c5ea6-aeda-4084-9156-0aac9643afd3"
TEST_SESSION_B = "070d9bf2-516f-44ee-87fc-017c7db9d29c"
#: When migration 20250917041624 ("Create mock FC responses for smoke testing") wrote those fc_responses.
_MOCK_FC_AT = datetime(2025, 9, 17, 4, 16, 24, tzinfo=UTC)
#: The plan's "recent_september" batch; only these prefixes are public, the rest of each id is derived below.
_RECENT_SEPTEMBER_PREFIXES = ("d5da8412", "fd85871b", "8c1c68bd", "21762d3d", "97a75815")
#: The ones the 23:00Z audit still listed as missing profiles (data model §6.3), so they lack both rows here.
_RECENT_WITHOUT_PROFILE = ("21762d3d", "97a75815")

# What each category of the report means (the render prints these); the first group partitions the sessions.
_CATEGORY_MEANINGS: dict[str, str] = {
    "completed": "completed since the window start, with a v1.2 functions fc_scores row and a v1.2.1 profile",
    "missing_fc_only": "completed, scorable, has a profile but no v1.2 functions fc_scores row (fc_only)",
    "missing_both": "completed, scorable, lacks both the fc_scores row and the profile (profile+fc)",
    "missing_profile_only": "completed, scorable, has the fc_scores row but no profile (profile_only)",
    "stale_profile": "completed, has the fc_scores row, profile stamped results_version v1.2.0",
    "no_fc_responses": "completed with 248 answers but no FC answers: nothing to tally, no rows",
    "unresolvable_fc_options": "completed, its one FC answer points at an option id with no fc_options row",
    "insufficient_answers": "completed with fewer than 148 answers, no rows",
    "in_progress": "status in_progress (some with partial answers or FC answers), no derived rows",
    "abandoned": "status abandoned with partial answers, no derived rows",
    "before_window": "completed sessions created before the window start (healthy or not)",
    # Subsets of the categories above.
    "before_window_missing": "subset of before_window lacking fc_scores and/or a profile (never candidates)",
    "priority": "the plan's two test sessions (FC option A resp. B in all six v1.2 blocks)",
    "recent_september": "the plan's five recent_september sessions",
}
_PARTITION = tuple(list(_CATEGORY_MEANINGS)[:11])
_TABLE_ORDER = ("assessment_sessions", "assessment_responses", "fc_responses", "fc_scores", "profiles", "fn_logs")


@dataclass(frozen=True)
class SeedReport:
    """What one seeding built: rows written per table and, per category, the sorted ids of the sessions in it."""

    scenario: str
    database: str
    seed: int
    now: datetime
    since: datetime
    counts: dict[str, int]
    reference_added: dict[str, int]
    replaced: dict[str, int]
    elapsed_s: float
    completed: list[str]
    missing_fc_only: list[str]
    missing_both: list[str]
    missing_profile_only: list[str]
    stale_profile: list[str]
    no_fc_responses: list[str]
    unresolvable_fc_options: list[str]
    insufficient_answers: list[str]
    in_progress: list[str]
    abandoned: list[str]
    before_window: list[str]
    before_window_missing: list[str]
    priority: list[str]
    recent_september: list[str]
    notes: list[str] = field(default_factory=list)
    #: Wall seconds per step (prepare = simulate and score; then each table; commit), for benchmarks.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def categories(self) -> dict[str, list[str]]:
        """Every category by name, in the order of the report."""
        return {name: list(getattr(self, name)) for name in _CATEGORY_MEANINGS}

    @property
    def candidates(self) -> list[str]:
        """The sessions a backfill since the window start must process: the three ``missing_*`` categories."""
        return sorted(self.missing_fc_only + self.missing_both + self.missing_profile_only)

    @property
    def sessions(self) -> int:
        return sum(len(getattr(self, name)) for name in _PARTITION)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything in the report."""
        return {
            "scenario": self.scenario,
            "database": self.database,
            "seed": self.seed,
            "now": format_utc(self.now),
            "since": format_utc(self.since),
            "sessions": self.sessions,
            "counts": dict(self.counts),
            "reference_added": dict(self.reference_added),
            "replaced": dict(self.replaced),
            "elapsed_s": round(self.elapsed_s, 3),
            "categories": self.categories,
            "candidates": self.candidates,
            "notes": list(self.notes),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def summary(self) -> str:
        """One line: sessions, answers, what a backfill finds to do, and how long seeding took."""
        todo = {"profile+fc": len(self.missing_both), "fc_only": len(self.missing_fc_only)}
        todo["profile_only"] = len(self.missing_profile_only)
        detail = ", ".join(f"{n} {name}" for name, n in todo.items() if n)
        return (
            f"{self.sessions} sessions, {self.counts.get('assessment_responses', 0):,} answers, "
            f"{len(self.candidates)} to backfill" + (f" ({detail})" if detail else "") + f"; {self.elapsed_s:.1f} s"
        )

    def render(self) -> str:
        """A plain-text account: rows per table, sessions per category (with ids where few), notes."""
        lines = [
            f"scenario {self.scenario} (seed {self.seed}) -> {self.database}",
            f"now {format_utc(self.now)}, window since {format_utc(self.since)}, {self.sessions} sessions, "
            f"{self.elapsed_s:.1f} s",
            "",
            f"{'table':<24}{'rows written':>14}",
        ]
        lines += [f"{name:<24}{self.counts.get(name, 0):>14,}" for name in _TABLE_ORDER]
        if self.replaced:
            gone = ", ".join(f"{k} {v:,}" for k, v in self.replaced.items() if v)
            lines.append(f"deleted first (replace): {gone or 'nothing'}")
        lines += ["", f"{'category':<26}{'sessions':>9}  meaning"]
        for name, meaning in _CATEGORY_MEANINGS.items():
            lines.append(f"{name:<26}{len(getattr(self, name)):>9}  {meaning}")
        lines.append(f"{'= candidates':<26}{len(self.candidates):>9}  missing_fc_only + missing_both + ...profile_only")
        shown = [n for n in _CATEGORY_MEANINGS if n != "completed" and 0 < len(getattr(self, n)) <= 40]
        if shown:
            lines += ["", "session ids:"]
            for name in shown:
                lines.append(f"  {name}:")
                ids: list[str] = getattr(self, name)
                for start in range(0, len(ids), 3):
                    lines.append("    " + "  ".join(ids[start : start + 3]))
        if self.notes:
            lines += ["", "notes:"] + [f"  - {note}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The questionnaire: 248 questions, each with its text, type, section and answer scale.

_FUNCS = ("Ti", "Te", "Fi", "Fe", "Ni", "Ne", "Si", "Se")
_STRENGTH_STEMS = {
    "Ti": "I test ideas for internal consistency",
    "Te": "I organise work around measurable results",
    "Fi": "I decide by what feels right to me",
    "Fe": "I pick up on the mood of a group",
    "Ni": "I sense where events are heading",
    "Ne": "I see possibilities others miss",
    "Si": "I notice how my body and routines feel",
    "Se": "I act on what is in front of me",
}
_DIMENSION_STEMS = {
    "Ti": "I can build a precise framework from scratch",
    "Te": "I can turn a messy project into a working plan",
    "Fi": "I can judge the ethics of a situation quickly",
    "Fe": "I can lift the energy of a room",
    "Ni": "I can foresee consequences years ahead",
    "Ne": "I can come up with many options in minutes",
    "Si": "I can keep myself comfortable and well",
    "Se": "I can take charge when pressure mounts",
}
_CONTEXTS = ("at work", "with friends", "under stress", "when learning", "at home", "in new situations")
#: The label text the frontend stores for an FC option that stands for a function (spec §3.6: never a bare letter).
_FUNCTION_LABELS = {
    "Ti": "Work out the underlying logic",
    "Te": "Set targets and track progress",
    "Fi": "Stay true to my own values",
    "Fe": "Keep everyone on board",
    "Ni": "Follow my sense of where it leads",
    "Ne": "Explore new angles",
    "Si": "Stick with what has worked",
    "Se": "Jump in and handle it",
}
_FC_PROMPTS = (
    "A deadline is looming. You mostly...",
    "A plan falls apart at the last minute. You...",
    "You join a new team. Your first move is to...",
    "Choosing a holiday, you...",
    "A friend asks for advice. You...",
    "Learning a new tool, you...",
    "In a heated meeting, you...",
    "Starting a personal project, you...",
    "When a rule seems pointless, you...",
    "On a free Saturday, you...",
)
_BLOCK_STEMS = {
    "Core": "This comes to me naturally and I enjoy it",
    "Critic": "I feel judged or drained in this area",
    "Hidden": "I would love to get better at this",
    "Instinct": "I can do this when needed but rarely choose to",
}
_NEURO_STEMS = (
    "I worry about things going wrong",
    "I stay calm when plans change",
    "Small setbacks spoil my mood",
    "I bounce back quickly from criticism",
    "I feel tense before social events",
    "I rarely feel overwhelmed",
)
_STATE_TEXTS = {
    "STATE_STRESS": "Right now, how stressed do you feel?",
    "STATE_MOOD": "Right now, how good is your mood?",
    "STATE_SLEEP": "How well did you sleep last night?",
    "STATE_TIME": "How much time pressure are you under today?",
    "STATE_FOCUS": "How focused do you feel right now?",
}
_SD_TEXTS = (
    "I have never told a lie",
    "I always keep my promises",
    "I am never irritated by others",
    "I always admit my mistakes",
    "I never waste time",
    "I am always polite, even to rude people",
)
_META: dict[int, tuple[str, tuple[str, ...]]] = {
    1: ("Age range", ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")),
    2: ("Gender", ("Woman", "Man", "Non-binary", "Prefer not to say")),
    3: ("Country or region", ("United States", "United Kingdom", "Canada", "Germany", "India", "Brazil", "Other")),
    4: ("Highest education", ("High school", "Some college", "Bachelor's", "Master's", "Doctorate")),
    5: ("Employment status", ("Full-time", "Part-time", "Student", "Self-employed", "Not working")),
    6: ("Field of work", ("Technology", "Education", "Healthcare", "Business", "Arts", "Trades", "Other")),
    7: ("Taken a typology test before?", ("Never", "Once", "Several times")),
    8: ("Previous result, if any", ("Not sure", "INTJ", "ENFP", "LII", "EIE", "Prefer not to say")),
    11: ("How did you hear about PRISM?", ("Friend", "Social media", "Search", "Podcast", "Work")),
    12: ("Main reason for taking PRISM", ("Self-understanding", "Career", "Relationships", "Curiosity", "Team")),
    13: ("Preferred language", ("English", "Spanish", "German", "French", "Portuguese")),
    14: ("Answering on a phone?", ("Yes", "No")),
    15: ("Relationship status", ("Single", "In a relationship", "Married", "Prefer not to say")),
    16: ("Handedness", ("Right", "Left", "Both")),
    189: ("Usual bedtime", ("Before 22:00", "22:00-24:00", "After midnight")),
    190: ("Cups of coffee per day", ("0", "1", "2", "3", "4")),
    191: ("Work alone or in a team?", ("Alone", "Team", "Depends")),
    192: ("Hours of exercise per week", ("0", "1", "2", "3", "5", "8")),
    193: ("Preferred season", ("Spring", "Summer", "Autumn", "Winter")),
    194: ("Morning or evening person?", ("Morning", "Evening", "Neither")),
    195: ("Siblings", ("0", "1", "2", "3", "4")),
    196: ("Birth order", ("Only child", "Oldest", "Middle", "Youngest")),
    197: ("Primary hobby", ("Reading", "Sports", "Music", "Gaming", "Crafts", "Travel")),
    198: ("Attention check: choose 'Often'", ("Never", "Sometimes", "Often")),
    199: ("Favourite kind of book", ("Fiction", "Non-fiction", "Poetry", "None")),
    200: ("Typical weekend", ("Out with people", "At home", "Outdoors", "Working")),
    201: ("Pets at home", ("None", "Dog", "Cat", "Other")),
    202: ("Commute", ("Remote", "Walk/bike", "Transit", "Car")),
    203: ("Social media use", ("Rarely", "Daily", "Hourly")),
    204: ("Planning style", ("Plan ahead", "Go with the flow", "Mix")),
    205: ("Meditation practice", ("Never", "Sometimes", "Daily")),
    206: ("Team size at work", ("1", "2", "5", "10", "25", "100")),
    207: ("Preferred learning format", ("Video", "Text", "Hands-on", "Discussion")),
    208: ("How honest were your answers so far?", ("Completely", "Mostly", "Somewhat")),
    209: ("Attention check: choose 'Blue'", ("Red", "Blue", "Green")),
    210: ("Ready for the next section?", ("Yes", "Need a break")),
}
_SELECT_ALL = (
    "Which activities recharge you? (select all)",
    ("Reading", "Outdoors", "Friends", "Sport", "Making", "Quiet"),
)
_RANKING = ("Rank these by importance", ("Career", "Family", "Health", "Learning"))
_CLOSING = {
    247: ("Anything you'd like to add about your answers?", ("No", "Fun test!", "Some questions were hard", "n/a")),
    248: ("May we email you your results?", ("Yes", "No")),
}
_SEAT_LEVELS = {
    "base": (4.2, 4.8),
    "creative": (3.8, 4.5),
    "role": (2.4, 3.2),
    "vulnerable": (1.6, 2.4),
    "mobilizing": (2.6, 3.4),
    "suggestive": (2.2, 3.0),
    "ignoring": (2.6, 3.4),
    "demonstrative": (2.8, 3.6),
}
_BLOCK_SEATS = {
    "Core": ("base", "creative"),
    "Critic": ("role", "vulnerable"),
    "Hidden": ("mobilizing", "suggestive"),
    "Instinct": ("ignoring", "demonstrative"),
}


@dataclass(frozen=True)
class _Question:
    """One of the 248 questions: what the frontend shows and stores, and how a respondent answers it."""

    qid: int
    text: str
    qtype: str
    section: str
    kind: str  # how answers are generated: likert, block, sd, neuro, state, likert7, fc_map, fc_block, meta, ...
    tag: str | None = None
    reverse: bool = False
    fc_map: tuple[tuple[str, str], ...] = ()
    choices: tuple[str, ...] = ()
    pair_group: str | None = None
    block: int = 0


def _section(qid: int) -> str:
    bounds = (
        (16, "about_you"),
        (64, "function_strengths"),
        (104, "function_dimensions"),
        (128, "emotional_style"),
        (140, "forced_choice"),
        (188, "function_blocks"),
        (210, "context"),
        (216, "fc_blocks"),
        (221, "current_state"),
        (237, "pairs"),
        (243, "candour"),
        (246, "function_strengths"),
    )
    return next((name for bound, name in bounds if qid <= bound), "closing")


@cache
def _questions() -> tuple[_Question, ...]:
    """The questionnaire built from the shipped scoring key (questions 247-248 have no key row, as upstream)."""
    ref = reference_rows()
    blocks = sorted(ref.fc_blocks, key=lambda b: b["order_index"])
    counters: dict[str, int] = {}
    fc_prompt = iter(_FC_PROMPTS)
    out: list[_Question] = []
    for row in sorted(ref.scoring_key, key=lambda r: r["question_id"]):
        qid, scale, tag = row["question_id"], row["scale_type"], row["tag"]
        section = _section(qid)
        common: dict[str, Any] = {"qid": qid, "section": section, "tag": tag, "pair_group": row["pair_group"]}
        common["reverse"] = bool(row["reverse_scored"])
        n = counters[f"{scale}:{tag}"] = counters.get(f"{scale}:{tag}", 0) + 1
        if scale == "LIKERT_1_5" and tag and tag[:2] in _FUNCS:
            stems = _DIMENSION_STEMS if tag.endswith("_D") else _STRENGTH_STEMS
            text = f"{stems[tag[:2]]} {_CONTEXTS[(n - 1) % len(_CONTEXTS)]}"
            if common["reverse"]:
                text = f"It is hard for me to say: {stems[tag[:2]].lower()}"
            out.append(_Question(text=text, qtype="likert_1_5", kind="likert", **common))
        elif scale == "LIKERT_1_5" and tag in _BLOCK_STEMS:
            out.append(_Question(text=f"{_BLOCK_STEMS[tag]} ({n}/12)", qtype="likert_1_5", kind="block", **common))
        elif scale == "LIKERT_1_5":
            text = _SD_TEXTS[(n - 1) % len(_SD_TEXTS)]
            out.append(_Question(text=text, qtype="likert_1_5", kind="sd", **common))
        elif scale == "LIKERT_1_7" and tag in ("N", "N_R"):
            stem = _NEURO_STEMS[(qid - 105) % len(_NEURO_STEMS)]
            out.append(_Question(text=f"{stem} ({qid - 104}/24)", qtype="likert_1_7", kind="neuro", **common))
        elif scale == "LIKERT_1_7":
            text = "How rested do you feel right now?" if qid == 9 else "How energetic do you feel today?"
            out.append(_Question(text=text, qtype="likert_1_7", kind="likert7", **common))
        elif scale == "STATE_1_7":
            out.append(_Question(text=_STATE_TEXTS[tag], qtype="state_1_7", kind="state", **common))
        elif row["fc_map"]:
            fmap = tuple(sorted((str(k), str(v)) for k, v in row["fc_map"].items()))
            if scale == "FORCED_CHOICE_2":
                text = f"Which fits you better? ({n}/8)"
            else:
                text = next(fc_prompt, f"Pick the option closest to you ({qid})")
            out.append(_Question(text=text, qtype=scale.lower(), kind="fc_map", fc_map=fmap, **common))
        elif scale.startswith("FORCED_CHOICE"):
            # Questions 211-216 are the six v1.2 FC blocks as the frontend shows them (one per block, in order).
            block = blocks[(qid - 211) % len(blocks)]
            out.append(
                _Question(text=str(block["title"]), qtype=scale.lower(), kind="fc_block", block=qid - 210, **common)
            )
        elif scale == "select-all":
            out.append(
                _Question(text=_SELECT_ALL[0], qtype="select_all", kind="select", choices=_SELECT_ALL[1], **common)
            )
        elif scale == "ranking":
            out.append(_Question(text=_RANKING[0], qtype="ranking", kind="ranking", choices=_RANKING[1], **common))
        else:
            text, choices = _META.get(qid, (f"About you ({qid})", ("Yes", "No")))
            out.append(_Question(text=text, qtype="single_select", kind="meta", choices=choices, **common))
    for qid, (text, choices) in _CLOSING.items():
        qtype = "text" if qid == 247 else "single_select"
        out.append(_Question(qid=qid, text=text, qtype=qtype, section="closing", kind="meta", choices=choices))
    if [q.qid for q in out] != list(range(1, _TOTAL_QUESTIONS + 1)):
        raise DataError("the shipped scoring key does not describe questions 1-246 in order")
    return tuple(out)


@cache
def _fc_options() -> tuple[tuple[dict[str, Any], ...], ...]:
    """The v1.2 options grouped per block (block order, then A-D)."""
    ref = reference_rows()
    blocks = sorted(ref.fc_blocks, key=lambda b: b["order_index"])
    return tuple(
        tuple(sorted((o for o in ref.fc_options if o["block_id"] == b["id"]), key=lambda o: o["option_code"]))
        for b in blocks
    )


@cache
def _prototypes() -> dict[str, dict[str, str]]:
    """Type code -> seat -> function, from the shipped 128-row prototype table."""
    out: dict[str, dict[str, str]] = {}
    for row in reference_rows().type_prototypes:
        out.setdefault(row["type_code"], {})[row["block"]] = row["func"]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Respondents and their answer sheets.


@dataclass(frozen=True)
class _Answer:
    """One stored answer, as the frontend writes it."""

    qid: int
    value: str | None
    numeric: int | None
    array: tuple[str, ...] | None
    obj: dict[str, Any] | None
    rt_ms: int
    offset_ms: int  # since the session started


@dataclass(frozen=True)
class _Sheet:
    """A respondent's full set of answers plus their six v1.2 FC choices (option dicts, block order)."""

    type_code: str
    answers: tuple[_Answer, ...]
    fc_choice: tuple[dict[str, Any], ...]
    duration_ms: int


_V4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_V4_SET = (0x8000 << 48) | (4 << 76)


def _uuid(rng: random.Random) -> str:
    """``str(uuid.UUID(int=rng.getrandbits(128), version=4))``, at a third of the cost (half a million per load)."""
    h = f"{(rng.getrandbits(128) & _V4_CLEAR) | _V4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _clamp(value: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, math.floor(value + 0.5)))


def _numeric(value: str | None) -> int | None:
    """``answer_numeric`` as the frontend fills it: the integer a numeric answer holds, else null."""
    if value is None:
        return None
    text = value.strip()
    return int(text) if text.isdigit() else None


def _pick_fc(rng: random.Random, levels: Mapping[str, float], options: Sequence[dict[str, Any]]) -> dict[str, Any]:
    # Gumbel noise on a preference score: mostly the option that fits the latent type, sometimes another one.
    def utility(opt: dict[str, Any]) -> float:
        pref = sum(float(w) * (levels[f] - 3.0) for f, w in opt["weights_json"].items())
        return pref - 0.9 * math.log(-math.log(rng.random() or 1e-12))

    return max(options, key=utility)


@dataclass(frozen=True)
class _Latent:
    """A simulated respondent's hidden traits: function and seat levels, answering bias and noise, neuroticism."""

    levels: dict[str, float]
    seat_level: dict[str, float]
    bias: float
    noise: float
    neuro: float


def _latent(rng: random.Random, type_code: str) -> _Latent:
    """Draws the hidden traits of a respondent of ``type_code``: its seats' functions strong, the others neutral."""
    levels = {f: 3.0 for f in _FUNCS}
    seat_level: dict[str, float] = {}
    for seat, func in _prototypes()[type_code].items():
        lo, hi = _SEAT_LEVELS[seat]
        levels[func] = seat_level[seat] = rng.uniform(lo, hi)
    bias, noise, neuro = rng.gauss(0.0, 0.2), rng.uniform(0.5, 0.9), rng.uniform(2.0, 6.0)
    return _Latent(levels, seat_level, bias, noise, neuro)


def _sheet(rng: random.Random, *, malformed: bool, fc_override: str | None = None) -> _Sheet:
    """Simulates one respondent answering all 248 questions; ``malformed`` adds 1-2 odd Likert values."""
    type_code = rng.choice(sorted(_prototypes()))
    latent = _latent(rng, type_code)
    options = _fc_options()
    if fc_override is not None:
        fc_choice = tuple(next(o for o in block if o["option_code"] == fc_override) for block in options)
    else:
        fc_choice = tuple(_pick_fc(rng, latent.levels, block) for block in options)
    answers: list[_Answer] = []
    offset = rng.randint(4_000, 20_000)
    for q in _questions():
        value, array, obj = _answer_value(rng, q, latent, fc_choice)
        rt = max(600, min(60_000, int(rng.lognormvariate(8.0, 0.5))))
        offset += rt + rng.randint(150, 900)
        answers.append(_Answer(q.qid, value, _numeric(value), array, obj, rt, offset))
    if malformed:
        _malform(rng, answers)
    return _Sheet(type_code, tuple(answers), fc_choice, offset + rng.randint(2_000, 20_000))


def _answer_value(
    rng: random.Random, q: _Question, latent: _Latent, fc_choice: Sequence[Mapping[str, Any]]
) -> tuple[str | None, tuple[str, ...] | None, dict[str, Any] | None]:
    """One answer as the respondent gives it: the stored value, and the array and object columns it fills."""
    value: str | None
    array: tuple[str, ...] | None = None
    obj: dict[str, Any] | None = None
    levels, noise = latent.levels, latent.noise
    if q.kind == "likert" and q.tag:
        raw = _clamp(levels[q.tag[:2]] + latent.bias + rng.gauss(0.0, noise), 1, 5)
        value = str(6 - raw if q.reverse else raw)
    elif q.kind == "block" and q.tag:
        level = sum(latent.seat_level[s] for s in _BLOCK_SEATS[q.tag]) / 2
        value = str(_clamp(level + rng.gauss(0.0, noise), 1, 5))
    elif q.kind == "sd":
        value = str(_clamp(3.4 + latent.bias + rng.gauss(0.0, 0.9), 1, 5))
    elif q.kind == "neuro":
        raw = _clamp(latent.neuro + rng.gauss(0.0, 1.0), 1, 7)
        value = str(8 - raw if q.reverse else raw)
    elif q.kind in ("state", "likert7"):
        value = str(_clamp(4.0 + rng.gauss(0.0, 1.4), 1, 7))
    elif q.kind == "fc_map":
        funcs = [f for _, f in q.fc_map]
        weights = [math.exp(1.6 * (levels[f] - 3.0)) for f in funcs]
        value = _FUNCTION_LABELS[rng.choices(funcs, weights)[0]]
    elif q.kind == "fc_block":
        value = str(fc_choice[q.block - 1]["prompt"])
    elif q.kind == "select":
        picked = tuple(c for c in q.choices if rng.random() < 0.4) or (rng.choice(q.choices),)
        value, array = "; ".join(picked), picked
    elif q.kind == "ranking":
        order = list(q.choices)
        rng.shuffle(order)
        value, array, obj = " > ".join(order), tuple(order), {"ranking": order}
    elif q.qid == 198:  # attention checks: nearly everyone passes
        value = "Often" if rng.random() < 0.95 else rng.choice(q.choices)
    elif q.qid == 209:
        value = "Blue" if rng.random() < 0.95 else rng.choice(q.choices)
    else:
        value = rng.choice(q.choices)
    return value, array, obj


def _malform(rng: random.Random, answers: list[_Answer]) -> None:
    """Replaces one or two Likert answers with the odd values really stored upstream."""
    # "" (JS Number("") is 0), padded digits, and "n/a" (skipped).
    likert = [i for i, q in enumerate(_questions()) if q.kind == "likert"]
    for i in rng.sample(likert, rng.randint(1, 2)):
        old = answers[i]
        odd = rng.choice(("", f" {old.value} ", "n/a"))
        answers[i] = _Answer(old.qid, odd, _numeric(odd), None, None, old.rt_ms, old.offset_ms)


# --------------------------------------------------------------------------------------------------------------------
# Scoring through the library the backfill uses.


class _Scorer:
    """Calls ``score_session`` with the shipped reference data and returns the rows it says to write."""

    def __init__(self) -> None:
        self.ref = ReferenceData.from_package()

    def score(
        self, sid: str, answers: Sequence[Mapping[str, Any]], fc: Sequence[Mapping[str, Any]], at: datetime
    ) -> tuple[dict[str, Any] | None, dict[str, Any], list[tuple[str, dict[str, Any]]]]:
        """(fc_scores row or None, profiles row, log events) for a session first scored at ``at``."""
        result = score_session(SessionInputs(session_id=sid, answers=answers, fc_responses=fc), self.ref, at, None)
        if result.profile_row is None:
            raise DataError(f"session {sid}: the scorer withheld the profile ({', '.join(result.findings)})")
        fc_row = dict(result.fc_scores_row) if result.fc_scores_row is not None else None
        return fc_row, dict(result.profile_row), [(evt, dict(payload)) for evt, payload in result.events]


# --------------------------------------------------------------------------------------------------------------------
# Wire encoding: every value becomes text (or NULL) that both COPY on Postgres and SQLite's affinities accept.

_Wire = str | None
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _array_literal(values: Sequence[str], pg: bool) -> str:
    if not pg:
        return json.dumps(list(values), ensure_ascii=False)
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"


def _encoder(column: sa.Column[Any], pg: bool) -> Callable[[Any], _Wire]:
    ctype = column.type

    def enc(value: Any) -> _Wire:
        if value is None:
            return None
        if isinstance(ctype, UTCTimestamp):
            return format_utc(value) if isinstance(value, datetime) else str(value)
        if isinstance(ctype, JSONValue):
            return dumps_json(value)
        if isinstance(ctype, TextArray):
            return _array_literal(value, pg)
        if isinstance(value, bool):
            # "1"/"0": Postgres's boolean input accepts them and SQLite's NUMERIC affinity stores them as 1/0.
            return "1" if value else "0"
        if isinstance(value, float):
            return repr(value)
        return str(value)

    return enc


@dataclass
class _Batch:
    """Rows bound for one table, already in wire form, in a fixed column order."""

    table: sa.Table
    columns: tuple[str, ...]
    rows: list[tuple[_Wire, ...]] = field(default_factory=list)

    def add(self, values: Mapping[str, Any], pg: bool) -> None:
        encs = _encoders(self.table.name, self.columns, pg)
        unknown = set(values) - set(self.columns)
        if unknown:
            raise DataError(f"{self.table.name}: no such column(s) {sorted(unknown)}")
        self.rows.append(tuple(e(values.get(c)) for c, e in zip(self.columns, encs, strict=True)))


@cache
def _encoders(table: str, columns: tuple[str, ...], pg: bool) -> tuple[Callable[[Any], _Wire], ...]:
    return tuple(_encoder(_TABLES[table].c[c], pg) for c in columns)


_TABLES = {t.name: t for t in (assessment_sessions, assessment_responses, fc_responses, fc_scores, profiles, fn_logs)}
_SESSION_COLS = (
    "id",
    "user_id",
    "session_type",
    "started_at",
    "created_at",
    "updated_at",
    "completed_at",
    "finalized_at",
    "total_questions",
    "completed_questions",
    "status",
    "email",
    "share_token",
    "share_token_expires_at",
    "country_iso2",
)
_RESPONSE_COLS = (
    "id",
    "session_id",
    "question_id",
    "question_text",
    "question_type",
    "question_section",
    "answer_value",
    "answer_numeric",
    "answer_array",
    "answer_object",
    "response_time_ms",
    "pair_group",
    "created_at",
    "updated_at",
)
_FC_RESPONSE_COLS = ("session_id", "block_id", "option_id", "answered_at")
_FC_SCORE_COLS = ("session_id", "version", "fc_kind", "scores_json", "blocks_answered", "created_at")
_PROFILE_HEAD = (
    "id",
    "session_id",
    "user_id",
    "share_token",
    "created_at",
    "updated_at",
    "submitted_at",
    "recomputed_at",
)
_PROFILE_COLS = (*_PROFILE_HEAD, *PROFILE_RESULT_COLUMNS, "version", "results_version")
_FN_LOG_COLS = ("evt", "payload", "at")


class _Sink:
    """Writes wire rows inside the caller's transaction: COPY (text format) on Postgres, executemany on SQLite."""

    def __init__(self, conn: Connection, copy: bool) -> None:
        self.conn = conn
        self.copy = copy
        self.raw: Any = conn.connection.dbapi_connection
        self.written: dict[str, int] = {}
        self.timings: dict[str, float] = {}

    def _count(self, table: str, n: int) -> None:
        self.written[table] = self.written.get(table, 0) + n

    @contextmanager
    def _timed(self, table: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[table] = self.timings.get(table, 0.0) + time.perf_counter() - started

    def rows(self, table: str, columns: Sequence[str], rows: Iterable[tuple[_Wire, ...]], chunk: int = 20_000) -> None:
        """Writes wire tuples (COPY lines built here on Postgres)."""
        with self._timed(table):
            if self.copy:
                lines = ("\t".join(_copy_field(v) for v in row) + "\n" for row in rows)
                self._count(table, self._copy(table, columns, lines))
                return
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            cur = self.raw.cursor()
            try:
                buf: list[tuple[_Wire, ...]] = []
                for row in rows:
                    buf.append(row)
                    if len(buf) >= chunk:
                        cur.executemany(sql, buf)
                        self._count(table, len(buf))
                        buf = []
                if buf:
                    cur.executemany(sql, buf)
                    self._count(table, len(buf))
            finally:
                cur.close()

    def lines(self, table: str, columns: Sequence[str], lines: Iterable[str]) -> None:
        """COPY pre-formatted text lines (Postgres only)."""
        with self._timed(table):
            self._count(table, self._copy(table, columns, lines))

    def chunks(self, table: str, columns: Sequence[str], texts: Iterable[str], rows: int | None) -> None:
        """COPY texts of whole lines each (Postgres only); ``rows`` is how many lines they hold, if known here."""
        with self._timed(table):
            self._copy(table, columns, texts)
            if rows is not None:
                self._count(table, rows)

    def _copy(self, table: str, columns: Sequence[str], texts: Iterable[str]) -> int:
        """Sends ``texts`` in blocks of a few MB through one COPY; returns how many texts there were."""
        n = 0

        def counted() -> Iterator[str]:
            nonlocal n
            for text in texts:
                n += 1
                yield text

        cur = self.raw.cursor()
        try:
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for block in _blocks(counted(), 4 << 20):
                    copy.write(block)
        finally:
            cur.close()
        return n


def _blocks(texts: Iterable[str], size: int) -> Iterator[str]:
    """Joins texts into blocks of about ``size`` characters: few large writes are what makes COPY fast."""
    buf: list[str] = []
    n = 0
    for text in texts:
        buf.append(text)
        n += len(text)
        if n >= size:
            yield "".join(buf)
            buf, n = [], 0
    if buf:
        yield "".join(buf)


def _copy_field(value: _Wire) -> str:
    return "\\N" if value is None else value.translate(_COPY_ESCAPES)


# --------------------------------------------------------------------------------------------------------------------
# The two story scenarios: one plan per session, turned into rows (derived rows through the scorer).

_COUNTRIES = ("US", "US", "US", "GB", "GB", "CA", "DE", "AU", "IN", "BR", "NL", "SE", "FR", "ES", None)


@dataclass
class _Plan:
    """How one session of a story scenario is built: who, when, how far it got, and which derived rows it has."""

    sid: str
    category: str
    status: str
    started: datetime
    sheet: _Sheet
    keep: int | None = None  # only the first ``keep`` answers (an unfinished session)
    drop: frozenset[int] = frozenset()  # questions skipped
    fc: str = "normal"  # "normal", "none" (FC answers never stored) or "unresolvable"
    fc_at: datetime | None = None  # when the FC answers were written, if not while answering
    fc_scores: bool = False
    profile: str | None = None  # results_version of the profile, None for no profile
    finalized: bool = False
    tags: tuple[str, ...] = ()


class _StoryBuilder:
    """Turns plans into wire rows for every table and keeps the ground truth per category."""

    def __init__(self, rng: random.Random, pg: bool, scorer: _Scorer) -> None:
        self.rng = rng
        self.pg = pg
        self.scorer = scorer
        self.qtail = _question_tails(rng)
        self.prefixes: set[str] = set()
        self.users: list[tuple[str, str]] = []
        self.emails = 0
        self.batches = {
            "assessment_sessions": _Batch(assessment_sessions, _SESSION_COLS),
            "assessment_responses": _Batch(assessment_responses, _RESPONSE_COLS),
            "fc_responses": _Batch(fc_responses, _FC_RESPONSE_COLS),
            "fc_scores": _Batch(fc_scores, _FC_SCORE_COLS),
            "profiles": _Batch(profiles, _PROFILE_COLS),
            "fn_logs": _Batch(fn_logs, _FN_LOG_COLS),
        }
        # Rows the foreign keys forbid, written separately with enforcement off (see ``_write_unchecked``).
        self.unchecked = _Batch(fc_responses, _FC_RESPONSE_COLS)
        self.categories: dict[str, list[str]] = {name: [] for name in _CATEGORY_MEANINGS}

    def new_sid(self, fixed: str | None = None) -> str:
        # Answer ids are derived from their session's id prefix (see ``_question_tails``): keep prefixes unique.
        while True:
            sid = fixed or _uuid(self.rng)
            if sid[:24] not in self.prefixes:
                self.prefixes.add(sid[:24])
                return sid
            if fixed:
                raise DataError(f"session id prefix of {fixed} is already taken")

    def identity(self, fresh: bool) -> tuple[str | None, str | None]:
        """(user_id, email): signed-in users (a few returning), anonymous with or without an email."""
        r = self.rng.random()
        if r < 0.1 and self.users and not fresh:
            return self.rng.choice(self.users)
        if r < 0.55:
            self.emails += 1
            user = (_uuid(self.rng), f"user{self.emails:05d}@example.org")
            self.users.append(user)
            return user
        if r < 0.75:
            self.emails += 1
            return None, f"guest{self.emails:05d}@example.org"
        return None, None

    def when(self, lo: datetime, hi: datetime) -> datetime:
        span = int((hi - lo).total_seconds() * 1000)
        return lo + timedelta(milliseconds=self.rng.randint(0, max(span, 0)))

    def completed(
        self,
        category: str,
        lo: datetime,
        hi: datetime,
        *,
        fc_scores: bool,
        profile: str | None,
        finalized: bool,
        sid: str | None = None,
        fc: str = "normal",
        fc_override: str | None = None,
        fc_at: datetime | None = None,
        tags: tuple[str, ...] = (),
        drop: frozenset[int] | None = None,
    ) -> None:
        """Adds a completed session; by default some skip 1-3 questions (never an FC block question)."""
        sheet = _sheet(self.rng, malformed=self.rng.random() < 0.15, fc_override=fc_override)
        if drop is None:
            skippable = [q.qid for q in _questions() if q.kind != "fc_block"]
            drop = (
                frozenset(self.rng.sample(skippable, self.rng.randint(1, 3)))
                if self.rng.random() < 0.1
                else frozenset()
            )
        self.add(
            _Plan(
                sid=self.new_sid(sid),
                category=category,
                status="completed",
                started=self.when(lo, hi),
                sheet=sheet,
                drop=drop,
                fc=fc,
                fc_at=fc_at,
                fc_scores=fc_scores,
                profile=profile,
                finalized=finalized,
                tags=tags,
            )
        )

    def unfinished(self, category: str, lo: datetime, hi: datetime, keep: int) -> None:
        """Adds an in-progress or abandoned session that answered the first ``keep`` questions."""
        self.add(
            _Plan(
                sid=self.new_sid(),
                category=category,
                status=category,
                started=self.when(lo, hi),
                sheet=_sheet(self.rng, malformed=False),
                keep=keep,
            )
        )

    def add(self, plan: _Plan) -> None:
        rng, sid = self.rng, plan.sid
        user_id, email = self.identity(fresh=plan.status != "completed")
        answers = [a for a in plan.sheet.answers[: plan.keep] if a.qid not in plan.drop]
        at = {a.qid: plan.started + timedelta(milliseconds=a.offset_ms) for a in answers}
        for a in answers:
            self.batches["assessment_responses"].add(self._response_row(sid, a, at[a.qid]), self.pg)
        last = max(at.values(), default=plan.started)
        completed_at = finalized_at = None
        if plan.status == "completed":
            completed_at = last + timedelta(milliseconds=rng.randint(2_000, 20_000))
            if plan.finalized:
                finalized_at = completed_at + timedelta(milliseconds=rng.randint(400, 3_000))
        fc_rows = []
        if plan.fc == "normal":
            for k, option in enumerate(plan.sheet.fc_choice, start=1):
                if 210 + k in at:
                    when = plan.fc_at or at[210 + k]
                    fc_rows.append({"session_id": sid, "block_id": option["block_id"], "option_id": option["id"]})
                    self.batches["fc_responses"].add({**fc_rows[-1], "answered_at": when}, self.pg)
        elif plan.fc == "unresolvable":
            # An option id no fc_options row has (written before the constraint was enforced, see the notes).
            block = _fc_options()[0][0]["block_id"]
            row = {"session_id": sid, "block_id": block, "option_id": _uuid(rng), "answered_at": at.get(211, last)}
            self.unchecked.add(row, self.pg)
        if plan.fc_scores or plan.profile:
            scored_at = finalized_at or completed_at or last
            self._derived(plan, user_id, answers, at, fc_rows if plan.fc_scores else [], scored_at)
        self.batches["assessment_sessions"].add(
            {
                "id": sid,
                "user_id": user_id,
                "session_type": "prism",
                "started_at": plan.started,
                "created_at": plan.started,
                "updated_at": finalized_at or completed_at or last,
                "completed_at": completed_at,
                "finalized_at": finalized_at,
                "total_questions": _TOTAL_QUESTIONS,
                "completed_questions": len(answers),
                "status": plan.status,
                "email": email,
                "share_token": _uuid(rng),
                "share_token_expires_at": completed_at + timedelta(days=30) if completed_at else None,
                "country_iso2": rng.choice(_COUNTRIES),
            },
            self.pg,
        )
        self.categories[plan.category].append(sid)
        for tag in plan.tags:
            self.categories[tag].append(sid)

    def _response_row(self, sid: str, a: _Answer, when: datetime) -> dict[str, Any]:
        q = _questions()[a.qid - 1]
        return {
            "id": sid[:24] + self.qtail[a.qid],
            "session_id": sid,
            "question_id": a.qid,
            "question_text": q.text,
            "question_type": q.qtype,
            "question_section": q.section,
            "answer_value": a.value,
            "answer_numeric": a.numeric,
            "answer_array": a.array,
            "answer_object": a.obj,
            "response_time_ms": a.rt_ms,
            "pair_group": q.pair_group,
            "created_at": when,
            "updated_at": when,
        }

    def _derived(
        self,
        plan: _Plan,
        user_id: str | None,
        answers: Sequence[_Answer],
        at: Mapping[int, datetime],
        fc_rows: Sequence[Mapping[str, Any]],
        scored_at: datetime,
    ) -> None:
        sid = plan.sid
        inputs = [
            {"id": sid[:24] + self.qtail[a.qid], "question_id": a.qid, "answer_value": a.value, "created_at": at[a.qid]}
            for a in answers
        ]
        fc_at = scored_at + timedelta(milliseconds=180)
        profile_at = scored_at + timedelta(milliseconds=650)
        fc_row, profile, events = self.scorer.score(sid, inputs, fc_rows, profile_at)
        if plan.fc_scores:
            if fc_row is None:
                raise DataError(f"session {sid}: the scorer wrote no fc_scores row for resolvable FC answers")
            self.batches["fc_scores"].add(_fc_score_row(sid, fc_row, fc_at), self.pg)
        if plan.profile:
            row = _profile_row(profile, plan.profile)
            row.update(
                id=_uuid(self.rng),
                session_id=sid,
                user_id=user_id,
                share_token=_uuid(self.rng),
                created_at=profile_at,
                updated_at=profile_at,
                submitted_at=profile_at,
                recomputed_at=None,
            )
            self.batches["profiles"].add(row, self.pg)
        # The scorer's log events as ``log_fn`` stored them; the tally's own events only where the tally ran.
        for evt, payload in events:
            if evt in ("fc_option_not_found", "fc_no_responses") and not plan.fc_scores:
                continue
            self.batches["fn_logs"].add({"evt": evt, "payload": payload, "at": profile_at}, self.pg)


def _question_tails(rng: random.Random) -> list[str]:
    """The last UUID group of each question's answer id (index = question id).

    An answer's id is its session id's first 24 characters plus this group: a valid v4 UUID, unique as long as
    session prefixes are (the builders ensure it), and cheap enough to build 25 million of in a few seconds.
    Sessions are written in id order, so the answer ids also arrive in index order.
    """
    return [""] + [f"{rng.getrandbits(48):012x}" for _ in range(_TOTAL_QUESTIONS)]


def _fc_score_row(sid: str, fc_row: Mapping[str, Any], at: datetime) -> dict[str, Any]:
    return {
        "session_id": sid,
        "version": fc_row.get("version", _FC_VERSION),
        "fc_kind": fc_row.get("fc_kind", "functions"),
        "scores_json": fc_row["scores_json"],
        "blocks_answered": fc_row["blocks_answered"],
        "created_at": at,
    }


def _profile_row(profile: Mapping[str, Any], results_version: str) -> dict[str, Any]:
    """The scorer's result columns; a stale profile keeps them but carries the old stamp (as the 131 of 09-17 did)."""
    unknown = set(profile) - set(profiles.c.keys())
    if unknown:
        raise DataError(f"the scorer returned profile fields the profiles table lacks: {sorted(unknown)}")
    row = {c: profile.get(c) for c in (*PROFILE_RESULT_COLUMNS, "version", "results_version")}
    if results_version != _CURRENT:
        row["version"] = row["results_version"] = results_version
    return row


def _recent_september_id(prefix: str) -> str:
    # The same full id whatever the seed: only the prefix is known from the plan, the rest is a fixed derivation.
    h = hashlib.sha256(f"gatefill/recent_september/{prefix}".encode()).hexdigest()
    return f"{prefix}-{h[0:4]}-4{h[4:7]}-{'89ab'[int(h[7], 16) % 4]}{h[8:11]}-{h[11:23]}"


def _utc(month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2025, month, day, hour, minute, second, tzinfo=UTC)


#: When the staging story's August and September sessions were created (start, end).
_AUGUST = (WINDOW_START, _utc(8, 31, 23, 59, 59))
_SEPTEMBER = (_utc(9, 1), _utc(9, 16, 20))


def _build_staging(b: _StoryBuilder, now: datetime) -> None:
    """The staging project as the 2025-09-17 plan saw it (counts in the module docstring and ``SeedReport``)."""
    # One builder draws every session from one seeded generator: the parts run in this order, always.
    _staging_complete(b, now)
    _staging_the_39(b)
    _staging_traps(b, now)
    _staging_before_window(b)


def _staging_complete(b: _StoryBuilder, now: datetime) -> None:
    """The window's fully scored sessions: 70 current, and 10 whose profile carries the stale results_version."""
    for _ in range(70):
        b.completed(
            "completed", WINDOW_START, now - timedelta(hours=2), fc_scores=True, profile=_CURRENT, finalized=True
        )
    for _ in range(10):
        b.completed("stale_profile", WINDOW_START, _utc(9, 13), fc_scores=True, profile=_STALE, finalized=True)


def _staging_the_39(b: _StoryBuilder) -> None:
    """The 39 sessions the backfill is for: the two priority test sessions, the recent September ones, the rest."""
    # The 39: the priority test sessions got their FC answers from the 04:16 mock migration, after completion,
    # so A (scored at finalize, before FC existed) has a profile and B (never finalized) has neither row.
    test_window = (_utc(9, 15, 12), _utc(9, 16, 18))
    b.completed(
        "missing_fc_only",
        *test_window,
        sid=TEST_SESSION_A,
        fc_scores=False,
        profile=_CURRENT,
        finalized=True,
        fc_override="A",
        fc_at=_MOCK_FC_AT,
        tags=("priority",),
        drop=frozenset(),
    )
    b.completed(
        "missing_both",
        *test_window,
        sid=TEST_SESSION_B,
        fc_scores=False,
        profile=None,
        finalized=False,
        fc_override="B",
        fc_at=_MOCK_FC_AT,
        tags=("priority",),
        drop=frozenset(),
    )
    recent = (_utc(9, 10), _utc(9, 16, 20))
    for prefix in _RECENT_SEPTEMBER_PREFIXES:
        has_profile = prefix not in _RECENT_WITHOUT_PROFILE
        b.completed(
            "missing_fc_only" if has_profile else "missing_both",
            *recent,
            sid=_recent_september_id(prefix),
            fc_scores=False,
            profile=_CURRENT if has_profile else None,
            finalized=has_profile,
            tags=("recent_september",),
        )
    for window, n_fc_only, n_both in ((_SEPTEMBER, 3, 3), (_AUGUST, 19, 7)):
        for _ in range(n_fc_only):
            b.completed("missing_fc_only", *window, fc_scores=False, profile=_CURRENT, finalized=True)
        for _ in range(n_both):
            b.completed("missing_both", *window, fc_scores=False, profile=None, finalized=False)


def _staging_traps(b: _StoryBuilder, now: datetime) -> None:
    """Sessions a backfill must not pick: completed but not scorable, in progress, abandoned."""
    # Traps: completed but not scorable, so never among the 39.
    for _ in range(3):
        b.completed(
            "no_fc_responses", WINDOW_START, _utc(9, 16), fc="none", fc_scores=False, profile=None, finalized=False
        )
    b.completed(
        "unresolvable_fc_options", *_SEPTEMBER, fc="unresolvable", fc_scores=False, profile=None, finalized=False
    )
    not_block = [q.qid for q in _questions() if q.kind != "fc_block"]
    b.completed(
        "insufficient_answers",
        *_AUGUST,
        fc_scores=False,
        profile=None,
        finalized=False,
        drop=frozenset(b.rng.sample(not_block, _TOTAL_QUESTIONS - 138)),
    )
    for keep in (0, 8, 35, 80, 120, 140):
        b.unfinished("in_progress", now - timedelta(hours=40), now - timedelta(minutes=10), keep)
    # Answered everything before the 09-08 autocomplete trigger existed and was never finalized: has FC answers.
    b.unfinished("in_progress", _utc(8, 4), _utc(8, 6), _TOTAL_QUESTIONS)
    for keep in (20, 60, 100, 130, 220):
        b.unfinished("abandoned", WINDOW_START, _utc(9, 5), keep)


def _staging_before_window(b: _StoryBuilder) -> None:
    """Sessions created before the window, scored or not: outside the backfill whatever they lack."""
    early = (_utc(6, 10), _utc(7, 31, 20))
    for i in range(26):
        b.completed("before_window", *early, fc_scores=True, profile=_STALE if i < 6 else _CURRENT, finalized=True)
    for _ in range(6):
        b.completed(
            "before_window", *early, fc_scores=False, profile=_STALE, finalized=True, tags=("before_window_missing",)
        )
    for _ in range(3):
        b.completed(
            "before_window", *early, fc_scores=False, profile=None, finalized=False, tags=("before_window_missing",)
        )
    # Created 19 minutes before the window and completed inside it: the window is about created_at.
    b.completed(
        "before_window",
        _utc(7, 31, 23, 41, 7),
        _utc(7, 31, 23, 41, 7),
        fc_scores=False,
        profile=None,
        finalized=False,
        tags=("before_window_missing",),
    )


def _build_production(b: _StoryBuilder, now: datetime) -> None:
    """Production on 2025-09-18: 157 completed sessions since 08-01, every one complete, and a few others."""
    since = WINDOW_START
    for _ in range(157):
        b.completed("completed", since, now - timedelta(hours=1), fc_scores=True, profile=_CURRENT, finalized=True)
    for keep in (0, 30, 90, 140):
        b.unfinished("in_progress", now - timedelta(hours=30), now - timedelta(minutes=5), keep)
    for keep in (15, 70, 110):
        b.unfinished("abandoned", since, now - timedelta(days=3), keep)
    for _ in range(30):
        b.completed("before_window", _utc(6, 1), _utc(7, 31, 20), fc_scores=True, profile=_CURRENT, finalized=True)


# --------------------------------------------------------------------------------------------------------------------
# The synthetic scenario: volume first.

_POOL = 512
_HMS = [f"{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60) for s in range(60)]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _day_prefixes(first_s: int, last_s: int) -> dict[int, str]:
    return {d: (_EPOCH + timedelta(days=d)).strftime("%Y-%m-%dT") for d in range(first_s // 86400, last_s // 86400 + 2)}


@dataclass
class _Pattern:
    """One simulated respondent's answers, pre-formatted once and reused by every session drawn from it."""

    sheet: _Sheet
    # Per answer: (id tail + tab, wire middle columns, COPY text of them + tab, whole seconds, ".mmm000Z").
    answers: list[tuple[str, tuple[_Wire, ...], str, int, str]]
    fc: list[tuple[str, int, str]]  # ("\tblock_id\toption_id\t", whole seconds, fraction) per block
    finalize_ms: int
    scored: dict[bool, tuple[dict[str, Any] | None, tuple[_Wire, ...], str]] = field(default_factory=dict)


@cache
def _question_wire(pg: bool) -> tuple[tuple[tuple[_Wire, ...], str, tuple[_Wire, ...], str], ...]:
    """Per question (index = id - 1): the constant columns before and after the answer, as wire and COPY text."""
    out = []
    for q in _questions():
        head: tuple[_Wire, ...] = (str(q.qid), q.text, q.qtype, q.section)
        tail: tuple[_Wire, ...] = (q.pair_group,)
        out.append((head, "\t".join(_copy_field(v) for v in head), tail, _copy_field(q.pair_group)))
    return tuple(out)


def _pattern(sheet: _Sheet, qtail: Sequence[str], pg: bool, rng: random.Random) -> _Pattern:
    constant = _question_wire(pg)
    rows = []
    fc_at: dict[int, tuple[int, str]] = {}
    for a in sheet.answers:
        head, head_text, tail, tail_text = constant[a.qid - 1]
        array = None if a.array is None else _array_literal(a.array, pg)
        obj = None if a.obj is None else dumps_json(a.obj)
        numeric = None if a.numeric is None else str(a.numeric)
        answer: tuple[_Wire, ...] = (a.value, numeric, array, obj, str(a.rt_ms))
        wire = (*head, *answer, *tail)
        copy_text = "\t".join((head_text, *(_copy_field(v) for v in answer), tail_text, ""))
        secs, frac = a.offset_ms // 1000, f".{a.offset_ms % 1000:03d}000Z"
        rows.append((qtail[a.qid] + "\t", wire, copy_text, secs, frac))
        fc_at[a.qid] = (secs, frac)
    fc = [(f"\t{o['block_id']}\t{o['id']}\t", *fc_at[210 + k]) for k, o in enumerate(sheet.fc_choice, start=1)]
    return _Pattern(sheet, rows, fc, sheet.duration_ms + rng.randint(400, 3_000))


def _stamp(start_s: int, offset_ms: int, days: Mapping[int, str]) -> str:
    secs, ms = divmod(start_s * 1000 + offset_ms, 1000)
    d, sod = divmod(secs, 86400)
    return f"{days[d]}{_HMS[sod]}.{ms:03d}000Z"


#: Sessions per range taken from the queue: 62,000 answers, a few seconds of COPY.
_QUEUE_STEP = 250


class _SessionQueue:
    """Hands out consecutive ranges of session indexes, in order, to the connections that COPY answers."""

    def __init__(self, n: int) -> None:
        self.n, self.step, self.next = n, _QUEUE_STEP, 0
        self.lock = threading.Lock()

    def take(self) -> tuple[int, int] | None:
        with self.lock:
            if self.next >= self.n:
                return None
            lo = self.next
            self.next = min(self.n, lo + self.step)
            return lo, self.next


class _Synthetic:
    """Generates N completed sessions from a pool of respondents and streams their rows into a ``_Sink``.

    Scoring is per pattern, not per session: a pattern's answers and FC choices are what the scorer reads, so its
    fc_scores and profile results are exactly right for every session that uses it, and 100k sessions cost at most
    2 x 512 scorer calls. Session ids, tokens, users and timestamps stay per session.
    """

    def __init__(self, rng: random.Random, pg: bool, scorer: _Scorer, n: int, fraction: float, now: datetime) -> None:
        self.rng, self.pg, self.scorer = rng, pg, scorer
        self.qtail = _question_tails(rng)
        self.pool = [
            _pattern(_sheet(rng, malformed=rng.random() < 0.15), self.qtail, pg, rng) for _ in range(min(_POOL, n))
        ]
        ids: set[str] = set()
        prefixes: set[str] = set()
        while len(ids) < n:
            sid = _uuid(rng)
            if sid[:24] not in prefixes:
                prefixes.add(sid[:24])
                ids.add(sid)
        ordered = sorted(ids)  # id order: every index (pkey, unique, answer ids) grows at its right edge
        missing = int(n * fraction + 0.5)
        chosen = rng.sample(range(n), missing)
        kind = [0] * n  # 0 complete, 1 fc_only, 2 missing both
        for i in chosen[: missing // 2]:
            kind[i] = 2
        for i in chosen[missing // 2 :]:
            kind[i] = 1
        lo = int(WINDOW_START.timestamp())
        hi = int((now - timedelta(hours=1)).timestamp()) - 3_600
        self.days = _day_prefixes(lo, hi + 32 * 86400)  # share tokens expire 30 days on
        self.sessions = []
        for i, sid in enumerate(ordered):
            signed_in = rng.random() < 0.5
            self.sessions.append(
                (
                    sid,
                    rng.randrange(len(self.pool)),
                    rng.randint(lo, hi),
                    kind[i],
                    _uuid(rng) if signed_in else None,
                    f"s{i:07d}@example.org" if signed_in or rng.random() < 0.4 else None,
                    _uuid(rng),
                    _uuid(rng),
                    _uuid(rng),
                    rng.choice(_COUNTRIES),
                )
            )
        self.categories = {
            "completed": [s[0] for s in self.sessions if s[3] == 0],
            "missing_fc_only": [s[0] for s in self.sessions if s[3] == 1],
            "missing_both": [s[0] for s in self.sessions if s[3] == 2],
        }

    def score_patterns(self) -> None:
        """Scores every pattern that some session needs (with FC for complete ones, without for fc_only)."""
        prof_encs = _encoders("profiles", _PROFILE_COLS[len(_PROFILE_HEAD) :], self.pg)
        needed = {(s[1], s[3] == 0) for s in self.sessions if s[3] != 2}
        for p, with_fc in sorted(needed):
            pat = self.pool[p]
            answers = [
                {"id": f"{p}-{a.qid}", "question_id": a.qid, "answer_value": a.value, "created_at": WINDOW_START}
                for a in pat.sheet.answers
            ]
            chosen = pat.sheet.fc_choice
            fc = [{"block_id": o["block_id"], "option_id": o["id"]} for o in chosen] if with_fc else []
            fc_row, profile, _ = self.scorer.score(f"pattern-{p}", answers, fc, WINDOW_START)
            if with_fc and fc_row is None:
                raise DataError(f"pattern {p}: the scorer wrote no fc_scores row for resolvable FC answers")
            row = _profile_row(profile, _CURRENT)
            wire = tuple(e(row[c]) for e, c in zip(prof_encs, _PROFILE_COLS[len(_PROFILE_HEAD) :], strict=True))
            pat.scored[with_fc] = (fc_row, wire, "\t".join(_copy_field(v) for v in wire))

    def write(self, sink: _Sink, queue: _SessionQueue | None = None) -> None:
        """Writes every table, the answers last: those of the sessions it takes from ``queue`` (default: all).

        A helper connection may take sessions from the same queue meanwhile; the answers come last so that the
        main connection joins the shared work once its own tables are written and both finish together.
        """
        if not any(p.scored for p in self.pool):
            self.score_patterns()
        stamp, days, pool = _stamp, self.days, self.pool
        sessions = []
        for sid, p, start, kind, user, email, token, _, _, country in self.sessions:
            pat = pool[p]
            done_ms = pat.sheet.duration_ms
            started = stamp(start, 0, days)
            completed = stamp(start, done_ms, days)
            finalized = stamp(start, pat.finalize_ms, days) if kind != 2 else None
            expires = stamp(start + 30 * 86400, done_ms, days)
            updated = finalized or completed
            row = (sid, user, "prism", started, started, updated, completed, finalized, "248", "248", "completed")
            sessions.append((*row, email, token, expires, country))
        sink.rows("assessment_sessions", _SESSION_COLS, sessions)
        del sessions
        self._write_fc_responses(sink)
        scores = []
        for sid, p, start, kind, *_ in self.sessions:
            if kind == 0:
                fc_row = pool[p].scored[True][0]
                assert fc_row is not None
                at = stamp(start, pool[p].finalize_ms + 180, days)
                scores.append(
                    (
                        sid,
                        _FC_VERSION,
                        "functions",
                        dumps_json(fc_row["scores_json"]),
                        str(fc_row["blocks_answered"]),
                        at,
                    )
                )
        sink.rows("fc_scores", _FC_SCORE_COLS, scores)
        self._write_profiles(sink)
        self._write_answers(sink, queue or _SessionQueue(len(self.sessions)))

    def _write_fc_responses(self, sink: _Sink) -> None:
        days, hms, pool = self.days, _HMS, self.pool
        if sink.copy:
            texts = (
                f"{sid}{mid}{days[(start + s) // 86400]}{hms[(start + s) % 86400]}{frac}\n"
                for sid, p, start, *_ in self.sessions
                for mid, s, frac in pool[p].fc
            )
            sink.chunks("fc_responses", _FC_RESPONSE_COLS, texts, rows=6 * len(self.sessions))
            return
        rows = (
            (sid, *mid.strip("\t").split("\t"), f"{days[(start + s) // 86400]}{hms[(start + s) % 86400]}{frac}")
            for sid, p, start, *_ in self.sessions
            for mid, s, frac in pool[p].fc
        )
        sink.rows("fc_responses", _FC_RESPONSE_COLS, rows)

    def answer_count(self, lo: int, hi: int) -> int:
        return sum(len(self.pool[s[1]].answers) for s in self.sessions[lo:hi])

    def answer_texts(self, lo: int, hi: int) -> Iterator[str]:
        """COPY text of the answers of sessions ``[lo, hi)``, one string per session."""
        days, hms, pool = self.days, _HMS, self.pool
        for sid, p, start, *_ in self.sessions[lo:hi]:
            pre, sidt = sid[:24], sid + "\t"
            day, sod = divmod(start, 86400)
            answers = pool[p].answers
            if sod + answers[-1][3] < 86400:  # the usual case: the whole session within one UTC day
                dp = days[day]
                out = [
                    f"{pre}{tail}{sidt}{mid}{dp}{hms[sod + secs]}{frac}\t{dp}{hms[sod + secs]}{frac}\n"
                    for tail, _, mid, secs, frac in answers
                ]
            else:
                out = []
                for tail, _, mid, secs, frac in answers:
                    t = start + secs
                    ts = days[t // 86400] + hms[t % 86400] + frac
                    out.append(f"{pre}{tail}{sidt}{mid}{ts}\t{ts}\n")
            yield "".join(out)

    def queued_texts(self, queue: _SessionQueue, counted: list[int]) -> Iterator[str]:
        """COPY text of the answers of every range taken from ``queue`` until it is empty; rows added to ``counted``."""
        while (taken := queue.take()) is not None:
            counted[0] += self.answer_count(*taken)
            yield from self.answer_texts(*taken)

    def _write_answers(self, sink: _Sink, queue: _SessionQueue) -> None:
        if sink.copy:
            counted = [0]
            sink.chunks("assessment_responses", _RESPONSE_COLS, self.queued_texts(queue, counted), rows=None)
            sink._count("assessment_responses", counted[0])
            return
        days, hms, pool = self.days, _HMS, self.pool

        def tuples() -> Iterator[tuple[_Wire, ...]]:
            while (taken := queue.take()) is not None:
                for sid, p, start, *_ in self.sessions[taken[0] : taken[1]]:
                    pre = sid[:24]
                    for tail, wire, _, secs, frac in pool[p].answers:
                        t = start + secs
                        ts = days[t // 86400] + hms[t % 86400] + frac
                        yield (pre + tail[:-1], sid, *wire, ts, ts)

        sink.rows("assessment_responses", _RESPONSE_COLS, tuples())

    def _write_profiles(self, sink: _Sink) -> None:
        days, pool = self.days, self.pool
        heads = []
        for sid, p, start, kind, user, _, _, pid, ptoken, _ in self.sessions:
            if kind == 2:
                continue
            at = _stamp(start, pool[p].finalize_ms + 650, days)
            heads.append(((pid, sid, user, ptoken, at, at, at, None), pool[p].scored[kind == 0]))
        if sink.copy:
            lines = ("\t".join(_copy_field(v) for v in head) + "\t" + scored[2] + "\n" for head, scored in heads)
            sink.lines("profiles", _PROFILE_COLS, lines)
        else:
            sink.rows("profiles", _PROFILE_COLS, (head + scored[1] for head, scored in heads))


class _HelperCopy:
    """A second Postgres connection that COPYs answers in parallel with the main one, in its own transaction.

    Postgres runs one COPY per backend on one core, so on the answers table (99% of the rows) a second backend
    nearly halves the wall time. Both take ranges of sessions from one ``_SessionQueue``, so neither waits for the
    other at the end. Its rows reference sessions the main transaction has not committed yet, so it runs
    only when the foreign-key triggers are skipped (``session_replication_role``). It commits right after the main
    transaction; should that commit fail, the seeded rows are deleted again, so no half-built database remains.
    """

    def __init__(self, db: Database, synthetic: _Synthetic, queue: _SessionQueue) -> None:
        self.db = db
        self.counted = [0]
        self.proxy = db.engine.raw_connection()
        self.error: BaseException | None = None
        self.seconds = 0.0
        texts = synthetic.queued_texts(queue, self.counted)
        self.thread = threading.Thread(target=self._run, args=(texts,), daemon=True)

    @property
    def rows(self) -> int:
        return self.counted[0]

    def _run(self, texts: Iterable[str]) -> None:
        started = time.perf_counter()
        try:
            cur = self.proxy.dbapi_connection.cursor()  # type: ignore[union-attr]
            cur.execute("SET LOCAL synchronous_commit = off")
            cur.execute("SET LOCAL session_replication_role = replica")
            with cur.copy(f"COPY assessment_responses ({', '.join(_RESPONSE_COLS)}) FROM STDIN") as copy:
                for block in _blocks(texts, 4 << 20):
                    copy.write(block)
            cur.close()
        except BaseException as exc:  # re-raised in the main thread by join()
            self.error = exc
        self.seconds = time.perf_counter() - started

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise DatabaseError(f"{self.db.display_url}: parallel answer load failed: {self.error}") from self.error

    def commit(self) -> None:
        try:
            self.proxy.commit()
        except Exception as exc:
            with self.db.begin() as conn:
                _clear(conn, truncate=True)
            raise DatabaseError(f"{self.db.display_url}: parallel answer load did not commit; rows removed") from exc

    def close(self) -> None:
        if self.thread.is_alive():  # the main transaction failed first: stop the helper's COPY too
            self.proxy.dbapi_connection.cancel()  # type: ignore[union-attr]
        self.thread.join()
        self.proxy.close()  # back to the pool; an open transaction is rolled back there


# --------------------------------------------------------------------------------------------------------------------
# Seeding: validate, refuse or clear, write in one transaction, report.

_DATA_TABLES = (
    "assessment_responses",
    "fc_responses",
    "fc_scores",
    "profiles",
    "fn_logs",
    "results_token_access_logs",
    "assessment_sessions",
)


def _validate(
    scenario: str, sessions: int | None, missing_fraction: float | None, seed: int, now: datetime | None
) -> datetime:
    if scenario not in SCENARIOS:
        raise UsageError(f"unknown scenario '{scenario}' (known: {', '.join(SCENARIOS)})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, not {seed!r}")
    if scenario != "synthetic" and (sessions is not None or missing_fraction is not None):
        raise UsageError(
            f"scenario '{scenario}' has a fixed size; sessions and missing_fraction apply to synthetic only"
        )
    if sessions is not None and (
        isinstance(sessions, bool) or not isinstance(sessions, int) or not 1 <= sessions <= _MAX_SYNTHETIC
    ):
        raise UsageError(f"sessions must be an integer from 1 to {_MAX_SYNTHETIC:,}, not {sessions!r}")
    if missing_fraction is not None and (
        isinstance(missing_fraction, bool)
        or not isinstance(missing_fraction, int | float)
        or not 0.0 <= missing_fraction <= 1.0
    ):
        raise UsageError(f"missing_fraction must be a number from 0 to 1, not {missing_fraction!r}")
    default = _DEFAULT_NOW[scenario]
    if now is None:
        return default
    if now.tzinfo is None:
        raise UsageError("now must carry a time zone (e.g. 2025-09-17T08:00:00+00:00)")
    now = now.astimezone(UTC)
    if scenario != "synthetic" and now < default:
        raise UsageError(f"scenario '{scenario}' happened up to {format_utc(default)}; now cannot be earlier")
    if scenario == "synthetic" and now < WINDOW_START + timedelta(days=1):
        raise UsageError(f"synthetic sessions are created since {format_utc(WINDOW_START)}; now must be a day later")
    return now


def validate_seed_arguments(
    scenario: str,
    *,
    sessions: int | None = None,
    missing_fraction: float | None = None,
    seed: int = 0,
    now: datetime | None = None,
) -> datetime:
    """Checks the arguments of ``seed_scenario`` without touching a database; returns the effective ``now``.

    Raises ``UsageError`` (exit 2, one line) exactly where ``seed_scenario`` would refuse them.
    """
    return _validate(scenario, sessions, missing_fraction, seed, now)


def _existing(conn: Connection) -> dict[str, int]:
    """Which PRISM data tables already hold rows (1 = some), without counting big tables."""
    found = {}
    for table in _DATA_TABLES:
        if conn.exec_driver_sql(f"SELECT 1 FROM {table} LIMIT 1").first() is not None:
            found[table] = 1
    return found


def _clear(conn: Connection, truncate: bool) -> dict[str, int]:
    """Deletes every PRISM data row (reference tables untouched) inside the caller's transaction."""
    counts = {t: int(conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar_one()) for t in _DATA_TABLES}
    if truncate:
        # Transactional on Postgres, and far cheaper than DELETE on millions of rows.
        conn.exec_driver_sql(f"TRUNCATE {', '.join(_DATA_TABLES)} RESTART IDENTITY")
    else:
        for table in _DATA_TABLES:
            conn.exec_driver_sql(f"DELETE FROM {table}")
    return counts


def _write_unchecked(conn: Connection, sink: _Sink, batch: _Batch, notes: list[str]) -> int:
    """Writes rows that break a foreign key, as rows written before the constraint was enforced would.

    Postgres: ``session_replication_role = replica`` skips the RI triggers for these rows only, inside a savepoint,
    and needs a role that may set it (a superuser); without one the rows are left out and a note says so. SQLite: the
    whole seeding runs on a connection with ``foreign_keys=OFF`` and ``_check_sqlite_keys`` proves afterwards that
    these rows are the only violations.
    """
    if not batch.rows:
        return 0
    if not sink.copy:
        sink.rows(batch.table.name, batch.columns, batch.rows)
        return len(batch.rows)
    try:
        with conn.begin_nested():
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
            sink.rows(batch.table.name, batch.columns, batch.rows)
            conn.exec_driver_sql("SET LOCAL session_replication_role = origin")
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        notes.append(f"left out {len(batch.rows)} fc_responses row(s) with unknown option ids: {reason}")
        return 0
    return len(batch.rows)


def _check_sqlite_keys(raw: Any, allowed: int) -> None:
    violations = raw.execute("PRAGMA foreign_key_check").fetchall()
    unexpected = [v for v in violations if v[0] != "fc_responses" or v[2] != "fc_options"]
    if unexpected or len(violations) != allowed:
        raise DataError(f"seeding would break foreign keys beyond the intended trap rows: {violations[:5]}")


def seed_scenario(
    db: Database,
    scenario: str,
    *,
    sessions: int | None = None,
    missing_fraction: float | None = None,
    seed: int = 0,
    now: datetime | None = None,
    replace: bool = False,
    fk_checks: bool = False,
) -> SeedReport:
    """Fills ``db`` with ``scenario`` and returns exactly what was built.

    Refuses (``UsageError``, nothing written) an unknown scenario, bad sizes, a ``now`` before the story, and a
    database that already holds PRISM data unless ``replace`` is true (then those rows, never the reference data, are
    deleted first, in the same transaction as the new ones). ``fk_checks`` keeps the per-row foreign-key triggers on
    during the synthetic bulk load on Postgres (slower; by default they are skipped there, see the notes).
    """
    started = time.perf_counter()
    now = _validate(scenario, sessions, missing_fraction, seed, now)
    require_schema(db)
    existing = _refuse_existing(db, replace)
    reference_added = load_reference_data(db, now=now)
    notes: list[str] = []
    story, synthetic = _draw(db, scenario, seed, sessions, missing_fraction, now, notes)
    timings = {"prepare": time.perf_counter() - started}
    clear = replace and bool(existing)  # nothing to delete: no TRUNCATE lock either
    if db.caps.copy_from:
        counts, replaced = _seed_postgres(db, clear, story, synthetic, fk_checks, notes, timings)
    else:
        counts, replaced = _seed_sqlite(db, clear, story, synthetic, notes, timings)
    return SeedReport(
        scenario=scenario,
        database=db.display_url,
        seed=seed,
        now=now,
        since=WINDOW_START,
        counts={t: counts.get(t, 0) for t in _TABLE_ORDER},
        reference_added=reference_added,
        replaced=replaced,
        elapsed_s=time.perf_counter() - started,
        notes=notes,
        timings=timings,
        **_report_categories(story, synthetic, notes),
    )


def _refuse_existing(db: Database, replace: bool) -> dict[str, int]:
    """The PRISM data tables that already hold rows; refuses (``UsageError``) to seed over them unless ``replace``."""
    with db.connect() as conn:
        existing = _existing(conn)
    if existing and not replace:
        raise UsageError(
            f"{db.display_url} already holds PRISM data ({', '.join(existing)}); "
            "pass replace=True (--replace) to delete it first"
        )
    return existing


def _draw(
    db: Database,
    scenario: str,
    seed: int,
    sessions: int | None,
    missing_fraction: float | None,
    now: datetime,
    notes: list[str],
) -> tuple[_StoryBuilder | None, _Synthetic | None]:
    """Draws the scenario's sessions in memory (a story, or the synthetic bulk) and notes what the report must say."""
    rng = random.Random(f"gatefill.seed/{scenario}/{seed}")
    pg = db.caps.copy_from
    scorer = _Scorer()
    if scenario == "synthetic":
        n = 1000 if sessions is None else sessions
        fraction = 0.1 if missing_fraction is None else float(missing_fraction)
        synthetic = _Synthetic(rng, pg, scorer, n, fraction, now)
        notes.append(
            f"{n} sessions drawn from {len(synthetic.pool)} simulated respondents; fc_scores/profiles computed once "
            "per respondent by score_session (exact for every session that shares those answers)"
        )
        return None, synthetic
    story = _StoryBuilder(rng, pg, scorer)
    (_build_staging if scenario.startswith("staging") else _build_production)(story, now)
    if story.unchecked.rows:
        notes.append(
            "the unresolvable_fc_options session's FC answer names an option id with no fc_options row, written "
            "with foreign-key enforcement off: it models rows stored before the constraint was enforced"
        )
    return story, None


def _report_categories(
    story: _StoryBuilder | None, synthetic: _Synthetic | None, notes: Sequence[str]
) -> dict[str, list[str]]:
    """The report's sorted session ids per category, as written (a trap left out is reported as what it became)."""
    categories = synthetic.categories if synthetic is not None else story.categories if story is not None else {}
    report_fields = {name: sorted(categories.get(name, [])) for name in _CATEGORY_MEANINGS}
    if story is not None and story.unchecked.rows and "left out" in " ".join(notes):
        # The trap was not written: its session is then an ordinary no-FC session.
        moved = report_fields.pop("unresolvable_fc_options")
        report_fields["unresolvable_fc_options"] = []
        report_fields["no_fc_responses"] = sorted(report_fields["no_fc_responses"] + moved)
    return report_fields


def _seed_postgres(
    db: Database,
    replace: bool,
    story: _StoryBuilder | None,
    synthetic: _Synthetic | None,
    fk_checks: bool,
    notes: list[str],
    timings: dict[str, float],
) -> tuple[dict[str, int], dict[str, int]]:
    """Postgres: one transaction of COPYs (plus, for a synthetic bulk load, one helper transaction in parallel)."""
    replaced: dict[str, int] = {}
    helper: _HelperCopy | None = None
    n = len(synthetic.sessions) if synthetic is not None else 0
    # The helper starts before the main transaction (scoring then overlaps its COPY). It needs the FK triggers off
    # and must not meet a TRUNCATE, whose lock lasts until the main commit: a replace of real data loads serially.
    queue = _SessionQueue(n)
    if n >= _PARALLEL_MIN and synthetic is not None and not fk_checks and not replace and _may_skip_fk(db):
        helper = _HelperCopy(db, synthetic, queue)
        helper.start()
    try:
        with db.begin() as conn:
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            if replace:
                replaced = _clear(conn, truncate=True)
            sink = _Sink(conn, copy=True)
            if story is not None:
                _write_story(story, sink)
                _write_unchecked(conn, sink, story.unchecked, notes)
            elif synthetic is not None:
                if not fk_checks:
                    _skip_fk_triggers(conn, notes)
                synthetic.write(sink, queue)
                if helper is not None:
                    helper.join()
                    sink._count("assessment_responses", helper.rows)
                    timings["assessment_responses (helper)"] = helper.seconds
                    notes.append(f"{helper.rows:,} answers loaded by a second connection in parallel")
            counts = dict(sink.written)
            timings.update(sink.timings)
            committing = time.perf_counter()
        if helper is not None:
            helper.commit()
        timings["commit"] = time.perf_counter() - committing
    finally:
        if helper is not None:
            helper.close()
    return counts, replaced


#: Synthetic loads at least this big use the helper connection.
_PARALLEL_MIN = 2_000


def _may_skip_fk(db: Database) -> bool:
    """Whether this role may set ``session_replication_role`` (tried in a transaction that writes nothing)."""
    try:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
    except sa.exc.DBAPIError:
        return False
    return True


def _skip_fk_triggers(conn: Connection, notes: list[str]) -> bool:
    """Skips the per-row RI triggers for this transaction when the role may (synthetic bulk load only).

    Every referenced row (session, FC block, FC option) is written earlier in the same transaction or is reference
    data, so the triggers would only re-prove what the generator guarantees, at more than twice the cost of the load.
    The constraints stay in the schema and apply to every later write. Without the privilege, the checks run.
    """
    try:
        with conn.begin_nested():
            conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
    except sa.exc.DBAPIError:
        notes.append("foreign keys checked row by row (this role may not set session_replication_role)")
        return False
    notes.append(
        "bulk load with session_replication_role=replica: per-row foreign-key triggers skipped for rows that "
        "reference rows the load writes itself or reference data; constraints unchanged"
    )
    return True


def _write_story(story: _StoryBuilder, sink: _Sink) -> None:
    for name in _TABLE_ORDER:
        batch = story.batches[name]
        sink.rows(name, batch.columns, batch.rows)


def _seed_sqlite(
    db: Database,
    replace: bool,
    story: _StoryBuilder | None,
    synthetic: _Synthetic | None,
    notes: list[str],
    timings: dict[str, float],
) -> tuple[dict[str, int], dict[str, int]]:
    """SQLite: one transaction on a dedicated connection; foreign keys are off for it only if a trap needs that."""
    unchecked = len(story.unchecked.rows) if story is not None else 0
    replaced: dict[str, int] = {}
    with db.translate_errors(), db.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        if unchecked:
            # PRAGMA foreign_keys is a no-op inside a transaction, so it is set before BEGIN, on this connection only.
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                if replace:
                    replaced = _clear(conn, truncate=False)
                sink = _Sink(conn, copy=False)
                if synthetic is not None:
                    synthetic.write(sink)
                elif story is not None:
                    _write_story(story, sink)
                    _write_unchecked(conn, sink, story.unchecked, notes)
                if unchecked:
                    _check_sqlite_keys(raw, unchecked)
                timings.update(sink.timings)
                committing = time.perf_counter()
            timings["commit"] = time.perf_counter() - committing
        finally:
            if unchecked:
                raw.execute("PRAGMA foreign_keys=ON")
    return dict(sink.written), replaced
