"""Live PRISM traffic for a functions server: simulated respondents, faults injected on demand, and the ground truth.

Each respondent starts a session, writes answers the way the frontend does (``assessment_responses`` rows in a few
saves while answering, ``fc_responses`` for the six v1.2 blocks), and then either abandons or calls
``finalizeAssessment`` over HTTP and fetches the results with the share token it got back. Faults are drawn per
respondent with the given probabilities; the server-side ones travel as an ``X-Gatefill-Fault`` header, which a
server honours only when started with fault injection allowed and the service-role key is presented:

- ``engine_version_override``: scoring_config.results_version drifts for that call (event engine_version_override);
- ``legacy_fc``: finalize skips FC scoring, so the profile takes the legacy branch (event fc_fallback_legacy);
- ``profile_write_fail``: the profile write fails (5xx, event profile_write_failed, completed session, no profile);
- ``token_bypass``: the results endpoint serves without a token (a successful tokenless access row);
- ``slow``: the server adds latency (real time, on the server's clock) before answering;
- ``abandon``: the respondent leaves part-way, on top of the natural abandonment rate (client side only).

With ``SimulatedClock`` the whole timeline (arrivals, answering, finalize, results) runs as fast as the calls
return: rows written here carry the simulated instants, and the server stamps its own rows with the instant sent in
``X-Gatefill-Now``. The report lists every respondent and what was injected: the ground truth soak tests compare
their measurements against.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import json
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import httpx

from gatefill.clock import Clock, RealClock, SimulatedClock, parse_duration, utc
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.errors import ConfigError, GatefillError, UsageError
from gatefill.prism.schema import (
    assessment_responses,
    assessment_sessions,
    fc_responses,
    reference_rows,
    require_schema,
)
from gatefill.throttle import parse_rate

__all__ = [
    "INJECTABLE",
    "Respondent",
    "SessionOutcome",
    "SimulationReport",
    "new_respondent",
    "parse_inject",
    "run_simulation",
    "simulate",
    "write_answers",
    "write_session",
]

INJECTABLE = ("engine_version_override", "legacy_fc", "profile_write_fail", "token_bypass", "abandon", "slow")
_SERVER_FAULTS = ("engine_version_override", "legacy_fc", "profile_write_fail", "slow")
# The faults that travel in the X-Gatefill-Fault header, which needs the service-role key.
_KEYED_FAULTS = (*_SERVER_FAULTS, "token_bypass")
_TOTAL_QUESTIONS = 248
_MIN_COMPLETE = 148
_FUNCS = ("Ti", "Te", "Fi", "Fe", "Ni", "Ne", "Si", "Se")
_FC_BLOCK_QUESTIONS = range(211, 217)  # the six v1.2 blocks as the frontend shows them, in block order
_SAVES = 4  # the frontend saves answers in a few batches while the respondent goes on
_USER_AGENT = "gatefill-simulator/1 (+respondent)"
# Respondent addresses from the benchmarking range (RFC 2544): never a real client.
_ADDRESSES = ipaddress.IPv4Network("198.18.0.0/15")


# ====================================================================================================================
# Respondents


@dataclass(frozen=True)
class _Question:
    """One question as the frontend stores it: id, text, type, section and how its answer is drawn."""

    qid: int
    scale: str
    tag: str | None
    reverse: bool
    fc_map: Mapping[str, str] | None
    section: str


@cache
def _questions() -> tuple[_Question, ...]:
    rows = {r["question_id"]: r for r in reference_rows().scoring_key}
    out = []
    for qid in range(1, _TOTAL_QUESTIONS + 1):
        row = rows.get(qid)
        scale = row["scale_type"] if row else "META"
        section = "forced_choice" if scale.startswith("FORCED_CHOICE") else scale.lower().split("_")[0]
        out.append(
            _Question(
                qid=qid,
                scale=scale,
                tag=row["tag"] if row else None,
                reverse=bool(row["reverse_scored"]) if row else False,
                fc_map=row["fc_map"] if row else None,
                section=section,
            )
        )
    return tuple(out)


@cache
def _fc_blocks() -> tuple[tuple[dict[str, Any], ...], ...]:
    """The v1.2 options per block (block order, then option order)."""
    ref = reference_rows()
    blocks = sorted(ref.fc_blocks, key=lambda b: b["order_index"])
    return tuple(
        tuple(sorted((o for o in ref.fc_options if o["block_id"] == b["id"]), key=lambda o: o["order_index"]))
        for b in blocks
    )


@dataclass(frozen=True)
class Respondent:
    """One simulated person: session ids, answers (with offsets from the start), FC choices, and behaviour."""

    session_id: str
    share_token: str
    ip: str
    answers: tuple[tuple[int, str, str, str, str, int], ...]  # qid, text, type, section, value, offset_ms
    fc_choices: tuple[tuple[int, str, str, int], ...]  # question id, block_id, option_id, offset_ms
    answer_ms: int
    abandon_after: int | None = None  # answers written before leaving; None = finishes

    @property
    def finishes(self) -> bool:
        return self.abandon_after is None


def _clamp(value: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, math.floor(value + 0.5)))


def new_respondent(rng: random.Random, *, answer_ms: int | None = None, abandon: bool = False) -> Respondent:
    """A respondent with a latent function profile answering all 248 questions on each item's own scale.

    Ids and the share token are random UUIDs (not drawn from ``rng``: tokens must be unguessable and reruns must
    not collide); every answer and choice is drawn from ``rng``. ``answer_ms`` is the time answering takes.
    """
    levels = {f: rng.uniform(1.8, 4.6) for f in _FUNCS}
    bias, noise = rng.gauss(0.0, 0.2), rng.uniform(0.5, 0.9)
    total_ms = answer_ms if answer_ms is not None else rng.randint(10 * 60_000, 25 * 60_000)
    blocks = _fc_blocks()
    choices = []
    for options in blocks:
        # Gumbel noise on the fit between the option's weights and the latent levels: usually the fitting option.
        def utility(o: dict[str, Any]) -> float:
            fit = sum(float(w) * (levels[f] - 3.0) for f, w in o["weights_json"].items())
            return fit - 0.9 * math.log(-math.log(rng.random() or 1e-12))

        choices.append(max(options, key=utility))
    questions = _questions()
    answers = []
    for i, q in enumerate(questions):
        offset = int(total_ms * (i + 1) / (len(questions) + 1))
        if q.scale == "LIKERT_1_5" and q.tag and q.tag[:2] in levels:
            raw = _clamp(levels[q.tag[:2]] + bias + rng.gauss(0.0, noise), 1, 5)
            value = str(6 - raw if q.reverse else raw)
        elif q.scale == "LIKERT_1_5":
            value = str(_clamp(3.3 + bias + rng.gauss(0.0, 0.9), 1, 5))
        elif q.scale in ("LIKERT_1_7", "STATE_1_7"):
            value = str(_clamp(4.0 + rng.gauss(0.0, 1.4), 1, 7))
        elif q.fc_map:
            funcs = list(q.fc_map.values())
            value = rng.choices(funcs, [math.exp(1.6 * (levels[f] - 3.0)) for f in funcs])[0]
        elif q.qid in _FC_BLOCK_QUESTIONS:
            # The frontend stores the option's label text, not its letter (scoring spec §3).
            value = str(choices[q.qid - _FC_BLOCK_QUESTIONS.start]["prompt"])
        else:
            value = rng.choice(("Yes", "No", "Sometimes", "Prefer not to say"))
        text = f"Question {q.qid}"
        answers.append((q.qid, text, q.scale.lower(), q.section, value, offset))
    fc = tuple(
        (qid, str(o["block_id"]), str(o["id"]), answers[qid - 1][5])
        for qid, o in zip(_FC_BLOCK_QUESTIONS, choices, strict=True)
    )
    address = _ADDRESSES[rng.randrange(2, _ADDRESSES.num_addresses - 1)]
    return Respondent(
        session_id=str(uuid.uuid4()),
        share_token=str(uuid.uuid4()),
        ip=str(address),
        answers=tuple(answers),
        fc_choices=fc,
        answer_ms=total_ms,
        abandon_after=rng.randint(5, _MIN_COMPLETE - 1) if abandon else None,
    )


def write_session(db: Database, r: Respondent, started_at: datetime) -> None:
    """Inserts the ``assessment_sessions`` row the frontend creates when a respondent starts."""
    with db.begin() as conn:
        conn.execute(
            assessment_sessions.insert().values(
                id=r.session_id,
                session_type="prism",
                started_at=started_at,
                created_at=started_at,
                updated_at=started_at,
                total_questions=_TOTAL_QUESTIONS,
                completed_questions=0,
                status="in_progress",
                share_token=r.share_token,
            )
        )


def write_answers(db: Database, r: Respondent, started_at: datetime, upto_ms: int, after_ms: int = -1) -> int:
    """Writes the answers (and FC choices) given in (after_ms, upto_ms] since the start; returns how many answers."""
    limit = len(r.answers) if r.abandon_after is None else r.abandon_after
    rows = [
        {
            "session_id": r.session_id,
            "question_id": qid,
            "question_text": text,
            "question_type": qtype,
            "question_section": section,
            "answer_value": value,
            "answer_numeric": int(value) if value.isdigit() else None,
            "response_time_ms": max(400, r.answer_ms // len(r.answers)),
            "created_at": started_at + timedelta(milliseconds=offset),
            "updated_at": started_at + timedelta(milliseconds=offset),
        }
        for qid, text, qtype, section, value, offset in r.answers[:limit]
        if after_ms < offset <= upto_ms
    ]
    written_qids = {row["question_id"] for row in rows}
    fc_rows = [
        {
            "session_id": r.session_id,
            "block_id": block_id,
            "option_id": option_id,
            "answered_at": started_at + timedelta(milliseconds=offset),
        }
        for qid, block_id, option_id, offset in r.fc_choices
        if qid in written_qids
    ]
    if rows:
        with db.begin() as conn:
            conn.execute(assessment_responses.insert(), rows)
            if fc_rows:
                conn.execute(fc_responses.insert(), fc_rows)
    return len(rows)


# ====================================================================================================================
# Report


@dataclass
class SessionOutcome:
    """What happened to one respondent, as the simulator saw it (the ground truth for that session)."""

    session_id: str
    started_at: datetime
    answers: int = 0
    fc_answers: int = 0
    abandoned: str | None = None  # "natural" | "injected"
    injected: list[str] = field(default_factory=list)
    finalize_status: int | None = None
    finalize_code: str | None = None
    finalize_ms: float | None = None
    finalized_at: datetime | None = None
    results_status: int | None = None
    results_tokenless: bool = False
    type_code: str | None = None
    error: str | None = None


@dataclass
class SimulationReport:
    """Everything one simulation did and injected, per respondent and in totals."""

    functions_url: str
    clock: str
    seed: int
    started_at: datetime
    ended_at: datetime
    requested: dict[str, object]
    inject: dict[str, float]
    sessions: list[SessionOutcome] = field(default_factory=list)

    @property
    def injected_counts(self) -> dict[str, int]:
        counts = Counter(name for s in self.sessions for name in s.injected)
        return {name: counts.get(name, 0) for name in INJECTABLE}

    def totals(self) -> dict[str, object]:
        """The counts soak tests compare with: sessions, abandonment, finalize and results outcomes, faults."""
        finalized = [s for s in self.sessions if s.finalize_status is not None]
        latencies = sorted(s.finalize_ms for s in finalized if s.finalize_ms is not None)
        return {
            "sessions_started": len(self.sessions),
            "abandoned_natural": sum(s.abandoned == "natural" for s in self.sessions),
            "abandoned_injected": sum(s.abandoned == "injected" for s in self.sessions),
            "finalize_calls": len(finalized),
            "finalize_status": dict(sorted(Counter(str(s.finalize_status) for s in finalized).items())),
            "completed_sessions": sum(
                s.finalize_status == 200 or s.finalize_code in ("PROFILE_WRITE_FAILED", "FC_UPSERT_ERROR")
                for s in self.sessions
            ),
            "profiles_expected": sum(s.finalize_status == 200 for s in self.sessions),
            "results_status": dict(
                sorted(Counter(str(s.results_status) for s in self.sessions if s.results_status is not None).items())
            ),
            "results_served_without_token": sum(s.results_tokenless and s.results_status == 200 for s in self.sessions),
            "transport_errors": sum(s.error is not None for s in self.sessions),
            "finalize_p50_ms": _percentile(latencies, 0.5),
            "finalize_p95_ms": _percentile(latencies, 0.95),
            "injected": self.injected_counts,
        }

    def to_json(self) -> dict[str, object]:
        def encode(value: object) -> object:
            if isinstance(value, datetime):
                return value.astimezone(UTC).isoformat()
            if isinstance(value, dict):
                return {k: encode(v) for k, v in value.items()}
            if isinstance(value, list):
                return [encode(v) for v in value]
            return value

        return {
            "functions_url": self.functions_url,
            "clock": self.clock,
            "seed": self.seed,
            "started_at": encode(self.started_at),
            "ended_at": encode(self.ended_at),
            "requested": self.requested,
            "inject": self.inject,
            "totals": self.totals(),
            "injected_sessions": {
                name: [s.session_id for s in self.sessions if name in s.injected] for name in INJECTABLE
            },
            "sessions": [encode(asdict(s)) for s in self.sessions],
        }

    def summary(self) -> str:
        """One line: respondents, what they did, and the calls that got no answer, if any."""
        t = self.totals()
        abandoned = sum(o.abandoned is not None for o in self.sessions)
        line = (
            f"{t['sessions_started']} respondents: {t['finalize_calls']} finalized (status "
            f"{_counts(t['finalize_status'])}), {abandoned} abandoned; results fetched "
            f"{_counts(t['results_status'])}, {t['results_served_without_token']} served without a token"
        )
        return line + (f"; {t['transport_errors']} call(s) got no answer" if t["transport_errors"] else "")

    def render(self) -> str:
        t = self.totals()
        failed = f": {t['transport_errors']} call(s) got no answer (transport errors)" if t["transport_errors"] else ""
        lines = [
            f"simulated {t['sessions_started']} respondent(s) against {self.functions_url}{failed}",
            f"  clock {self.clock}: {self.started_at.isoformat()} -> {self.ended_at.isoformat()} (seed {self.seed})",
            f"  abandoned: {t['abandoned_natural']} natural, {t['abandoned_injected']} injected",
            f"  finalizeAssessment: {t['finalize_calls']} call(s), status {_counts(t['finalize_status'])}; "
            f"p50 {_ms(t['finalize_p50_ms'])}, p95 {_ms(t['finalize_p95_ms'])}",
            f"  completed sessions: {t['completed_sessions']}; profiles expected: {t['profiles_expected']}",
            f"  results fetched: status {_counts(t['results_status'])}; served without a token: "
            f"{t['results_served_without_token']}",
        ]
        if t["transport_errors"]:
            first = next(o.error for o in self.sessions if o.error)
            lines.append(f"  transport errors: {t['transport_errors']} (the first: {first})")
        lines.append("  injected:")
        counts = self.injected_counts
        for name in INJECTABLE:
            p = self.inject.get(name, 0.0)
            lines.append(f"    {name:<24} p={p:<5g} {counts[name]} session(s)")
        return "\n".join(lines)


def _counts(value: object) -> str:
    if not isinstance(value, dict) or not value:
        return "none"
    return ", ".join(f"{k}x{v}" for k, v in value.items())


def _ms(value: object) -> str:
    return f"{value:.1f} ms" if isinstance(value, float) else "n/a"


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return float(values[index])


# ====================================================================================================================
# Parsing


def parse_inject(text: str | None) -> dict[str, float]:
    """``name=P,name=P`` → probabilities; unknown names or P outside [0, 1] are a ``UsageError``."""
    result: dict[str, float] = {}
    if not text:
        return result
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if name not in INJECTABLE:
            raise UsageError(f"unknown fault '{name}' in --inject (known: {', '.join(INJECTABLE)})")
        try:
            p = float(value) if sep else 1.0
        except ValueError:
            raise UsageError(f"--inject {name}: '{value}' is not a probability") from None
        if not 0.0 <= p <= 1.0:
            raise UsageError(f"--inject {name}: probability must be within 0..1, not {value}")
        result[name] = p
    return result


# ====================================================================================================================
# The simulation


class _Client:
    """The HTTP side of every respondent: one connection pool, headers for client address, faults and time."""

    def __init__(
        self, functions_url: str, key: str | None, clock: Clock, simulated: bool, transport: httpx.BaseTransport | None
    ) -> None:
        self.base = functions_url.rstrip("/")
        self.key = key
        self.clock = clock
        self.simulated = simulated
        self.http = httpx.Client(timeout=30.0, transport=transport, headers={"user-agent": _USER_AGENT})

    def close(self) -> None:
        self.http.close()

    def check(self, *, with_key: bool) -> None:
        """One call that changes nothing (a finalize without a session id, which the server answers 400 before it
        reads anything) before any respondent writes a row: the URL must answer as the PRISM functions, and, when
        the run sends simulated time or faults (``with_key``), accept them with this key.

        Without it a dead port or a refused key showed only after hundreds of sessions had been written."""
        headers = {"content-type": "application/json"}
        if with_key:
            if not self.key:
                raise ConfigError(
                    "simulated time and injected faults need the service-role key: set the variable named by the "
                    "environment's service_role_key_env (default SUPABASE_SERVICE_ROLE_KEY)"
                )
            headers["x-gatefill-now"] = _instant(self.clock).isoformat()
            headers["authorization"] = f"Bearer {self.key}"
        url = f"{self.base}/finalizeAssessment"
        try:
            response = self.http.post(url, content="{}", headers=headers)
        except httpx.TransportError as exc:
            raise UsageError(
                f"no functions server answers at {self.base} ({type(exc).__name__}); start one with "
                "`gatefill serve functions --env NAME --allow-fault-injection` or give --functions-url"
            ) from None
        code = _code(response)
        if code in ("FAULT_INJECTION_DISABLED", "UNAUTHORIZED"):
            raise UsageError(
                f"the functions server at {self.base} refused simulated time/faults ({code}): start it with "
                "--allow-fault-injection and the same service-role key"
            )
        if response.status_code != 400:
            raise UsageError(
                f"{url} does not answer as the PRISM finalizeAssessment function (HTTP {response.status_code}"
                + (f" {code}" if code else "")
                + "); check --functions-url (it ends in /functions/v1)"
            )

    def post(self, name: str, body: Mapping[str, object], ip: str, faults: Sequence[str] = ()) -> httpx.Response:
        headers = {"x-forwarded-for": ip, "content-type": "application/json"}
        if faults:
            headers["x-gatefill-fault"] = ", ".join(faults)
        if self.simulated:
            headers["x-gatefill-now"] = _instant(self.clock).isoformat()
        if "x-gatefill-fault" in headers or "x-gatefill-now" in headers:
            if not self.key:
                raise ConfigError("fault injection and simulated time need the service-role key variable to be set")
            headers["authorization"] = f"Bearer {self.key}"
        try:
            response = self.http.post(f"{self.base}/{name}", content=json.dumps(body), headers=headers)
        except httpx.TransportError as exc:
            raise _Transport(f"{type(exc).__name__} calling {name}") from exc
        refused = _code(response) in ("FAULT_INJECTION_DISABLED", "UNAUTHORIZED")
        if response.status_code in (401, 403) and refused and (faults or self.simulated):
            raise UsageError(
                f"the functions server at {self.base} refused fault injection/simulated time "
                f"({_code(response)}): start it with --allow-fault-injection and set the service-role key"
            )
        return response


def _instant(clock: Clock) -> datetime:
    """The clock's now at millisecond precision, as the platform's JavaScript ``Date`` stamps rows."""
    now = clock.now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class _Transport(GatefillError):
    """A request that got no HTTP answer (connection refused, timeout)."""


def _code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, str) else None


def _arrivals(rng: random.Random, sessions: int | None, rate_per_s: float | None, duration_s: float) -> list[float]:
    """Offsets (s) of respondent arrivals: N uniform arrivals, or a Poisson process at the rate, over the duration."""
    if sessions is not None:
        return sorted(rng.uniform(0.0, duration_s) for _ in range(sessions))
    assert rate_per_s is not None
    times = []
    t = rng.expovariate(rate_per_s)
    while t < duration_s:
        times.append(t)
        t += rng.expovariate(rate_per_s)
    return times


class _Simulation:
    """The event loop: a time-ordered queue of respondent actions, run on the clock, recording each outcome."""

    def __init__(
        self,
        db: Database,
        client: _Client,
        clock: Clock,
        rng: random.Random,
        report: SimulationReport,
        *,
        faults: Mapping[str, float],
        abandon_rate: float,
        slow_ms: float,
        answer_cap_ms: int,
        pace: float,
    ) -> None:
        self.db = db
        self.client = client
        self.clock = clock
        self.rng = rng
        self.report = report
        self.faults = faults
        self.abandon_rate = abandon_rate
        self.slow_ms = slow_ms
        self.answer_cap_ms = answer_cap_ms
        # Pauses (before finalize, before opening the results) shrink with short runs, so a real-clock run of a
        # few seconds ends in seconds too; runs of an hour or more keep them at their realistic length.
        self.pace = pace
        self.begin = report.started_at
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def elapsed(self) -> float:
        return (self.clock.now() - self.begin).total_seconds()

    def schedule(self, at: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, action))

    def run(self) -> None:
        while self._queue:
            at, _, action = heapq.heappop(self._queue)
            wait = at - self.elapsed()
            if wait > 0:
                self.clock.sleep(wait)
            action()

    def add_respondent(self, offset_s: float) -> None:
        """Draws one respondent and its faults, and schedules its start, saves, finalize and results fetch."""
        rng = self.rng
        injected = [name for name in INJECTABLE if rng.random() < self.faults.get(name, 0.0)]
        natural = rng.random() < self.abandon_rate
        abandon = "abandon" in injected or natural
        answer_ms = min(rng.randint(10 * 60_000, 25 * 60_000), max(1_000, self.answer_cap_ms))
        r = new_respondent(rng, answer_ms=answer_ms, abandon=abandon)
        if abandon:
            # An abandoning respondent never reaches finalize: the abandonment is all that was injected.
            injected = ["abandon"] if "abandon" in injected else []
        outcome = SessionOutcome(session_id=r.session_id, started_at=self.begin, injected=injected)
        if abandon:
            outcome.abandoned = "injected" if injected else "natural"
        self.report.sessions.append(outcome)
        _Respondent(self, r, outcome).schedule(offset_s)


class _Respondent:
    """One respondent's actions on the timeline: start, a few saves of answers, finalize, fetch the results."""

    def __init__(self, sim: _Simulation, r: Respondent, outcome: SessionOutcome) -> None:
        self.sim = sim
        self.r = r
        self.outcome = outcome
        self.started: datetime = sim.begin
        self.written_ms = -1
        self.token: str | None = None
        last = len(r.answers) if r.abandon_after is None else r.abandon_after
        self.stop_ms = r.answer_ms if r.finishes else r.answers[last - 1][5]

    def schedule(self, offset_s: float) -> None:
        sim = self.sim
        sim.schedule(offset_s, self.start)
        for i in range(1, _SAVES + 1):
            upto = self.stop_ms * i // _SAVES
            sim.schedule(offset_s + upto / 1000.0, functools.partial(self.save, upto))
        if self.r.finishes:
            sim.schedule(offset_s + self.stop_ms / 1000.0 + sim.rng.uniform(0.5, 3.0) * sim.pace, self.finalize)

    def start(self) -> None:
        self.started = _instant(self.sim.clock)
        self.outcome.started_at = self.started
        write_session(self.sim.db, self.r, self.started)

    def save(self, upto_ms: int) -> None:
        self.outcome.answers += write_answers(self.sim.db, self.r, self.started, upto_ms, self.written_ms)
        self.written_ms = upto_ms
        limit = len(self.r.answers) if self.r.abandon_after is None else self.r.abandon_after
        self.outcome.fc_answers = sum(
            1 for qid, _, _, offset in self.r.fc_choices if offset <= upto_ms and qid <= limit
        )

    def finalize(self) -> None:
        sim, outcome = self.sim, self.outcome
        faults = [f"slow={sim.slow_ms:g}" if n == "slow" else n for n in outcome.injected if n in _SERVER_FAULTS]
        started = time.perf_counter()
        try:
            response = sim.client.post("finalizeAssessment", {"session_id": self.r.session_id}, self.r.ip, faults)
        except _Transport as exc:
            outcome.error = str(exc)
            return
        outcome.finalize_ms = (time.perf_counter() - started) * 1000.0
        outcome.finalize_status = response.status_code
        outcome.finalize_code = _code(response)
        outcome.finalized_at = _instant(sim.clock)
        if response.status_code != 200:
            return
        body = response.json()
        profile = body.get("profile") if isinstance(body, dict) else None
        outcome.type_code = profile.get("type_code") if isinstance(profile, dict) else None
        token = body.get("share_token") if isinstance(body, dict) else None
        self.token = token if isinstance(token, str) else None
        # People open their results link a few seconds later.
        sim.schedule(sim.elapsed() + sim.rng.uniform(1.0, 8.0) * sim.pace, self.fetch_results)

    def fetch_results(self) -> None:
        bypass = "token_bypass" in self.outcome.injected
        body: dict[str, object] = {"session_id": self.r.session_id}
        if not bypass:
            body["share_token"] = self.token
        try:
            response = self.sim.client.post(
                "get-results-by-session", body, self.r.ip, ["token_bypass"] if bypass else []
            )
        except _Transport as exc:
            self.outcome.error = str(exc)
            return
        self.outcome.results_status = response.status_code
        self.outcome.results_tokenless = bypass


def simulate(
    db: Database,
    functions_url: str,
    *,
    sessions: int | None = None,
    rate: str | None = None,
    duration: str | float | None = None,
    clock: Clock | None = None,
    inject: Mapping[str, float] | None = None,
    seed: int = 0,
    service_role_key: str | None = None,
    abandon_rate: float = 0.08,
    slow_ms: float = 250.0,
    max_sessions: int = 100_000,
    transport: httpx.BaseTransport | None = None,
) -> SimulationReport:
    """Runs simulated respondents against the functions server at ``functions_url`` and returns the ground truth.

    Exactly one of ``sessions`` (N arrivals spread uniformly over ``duration``) and ``rate`` (``R/h`` Poisson
    arrivals during ``duration``) is given; ``duration`` defaults to 1h. Respondents who started before the end
    finish, so the run ends a little after ``duration``. Answering takes 10-25 minutes, shortened to half the
    duration when that is shorter, and the pauses before finalize and results shrink likewise below an hour. With
    a ``SimulatedClock`` the run takes only as long as its writes and calls.
    """
    rate_per_s, duration_s, faults = _checked_arguments(sessions, rate, duration, inject, abandon_rate, max_sessions)
    clock = clock or RealClock()
    simulated = isinstance(clock, SimulatedClock)
    require_schema(db)
    rng = random.Random(seed)
    requested = {"sessions": sessions, "rate": rate, "duration_s": duration_s, "abandon_rate": abandon_rate}
    report = _new_report(functions_url, clock, seed, requested, faults)
    client = _Client(functions_url, service_role_key, clock, simulated, transport)
    try:
        client.check(with_key=simulated or any(faults.get(name, 0.0) > 0 for name in _KEYED_FAULTS))
        sim = _Simulation(
            db,
            client,
            clock,
            rng,
            report,
            faults=faults,
            abandon_rate=abandon_rate,
            slow_ms=slow_ms,
            answer_cap_ms=int(duration_s * 500),
            pace=min(1.0, duration_s / 3600.0),
        )
        for offset in _arrivals(rng, sessions, rate_per_s, duration_s):
            sim.add_respondent(offset)
        sim.run()
        report.ended_at = clock.now()
    finally:
        client.close()
    report.sessions.sort(key=lambda s: s.started_at)
    return report


def _checked_arguments(
    sessions: int | None,
    rate: str | None,
    duration: str | float | None,
    inject: Mapping[str, float] | None,
    abandon_rate: float,
    max_sessions: int,
) -> tuple[float | None, float, dict[str, float]]:
    """Refuses what ``simulate`` cannot run (``UsageError``); returns the arrival rate per second, the duration in
    seconds and the faults."""
    if (sessions is None) == (rate is None):
        raise UsageError("give exactly one of --sessions N and --rate R/h")
    if sessions is not None and not 0 <= sessions <= max_sessions:
        raise UsageError(f"--sessions must be within 0..{max_sessions}")
    rate_per_s = None
    if rate is not None:
        parsed = parse_rate(rate if "/" in rate or not rate.strip()[:1].isdigit() else f"{rate}/h")
        if parsed.per_second is None:
            raise UsageError("--rate must be a finite rate such as 120/h")
        rate_per_s = parsed.per_second
    try:
        duration_s = parse_duration(duration) if isinstance(duration, str) else float(duration or 3600.0)
    except ValueError as exc:
        raise UsageError(f"--duration: {exc}") from None
    if duration_s <= 0:
        raise UsageError("--duration must be positive")
    if rate_per_s is not None and rate_per_s * duration_s > max_sessions:
        raise UsageError(f"--rate x --duration would start more than {max_sessions} sessions")
    faults = dict(inject or {})
    unknown = set(faults) - set(INJECTABLE)
    if unknown:
        raise UsageError(f"unknown fault(s): {', '.join(sorted(unknown))}")
    if not 0.0 <= abandon_rate <= 1.0:
        raise UsageError("abandon_rate must be within 0..1")
    return rate_per_s, duration_s, faults


def _new_report(
    functions_url: str, clock: Clock, seed: int, requested: Mapping[str, object], faults: dict[str, float]
) -> SimulationReport:
    """The report of a run starting now on ``clock``: what was asked for, and no sessions yet."""
    begin = clock.now()
    return SimulationReport(
        functions_url=functions_url,
        clock="simulated" if isinstance(clock, SimulatedClock) else "real",
        seed=seed,
        started_at=begin,
        ended_at=begin,
        requested=dict(requested),
        inject=faults,
    )


def run_simulation(
    env: Environment,
    *,
    functions_url: str | None,
    sessions: int | None = None,
    rate: str | None = None,
    duration: str | None = None,
    clock: str = "real",
    start: datetime | None = None,
    inject: str | None = None,
    seed: int = 0,
) -> SimulationReport:
    """What ``gatefill simulate`` runs: resolves the URL, key and clock, then ``simulate`` on the environment's DB."""
    if env.kind == "production":
        # The simulator writes synthetic sessions and answers: never into a production database.
        raise UsageError(f"environment '{env.name}' is production: simulate writes synthetic sessions, refused")
    url = functions_url or env.functions_url
    if not url:
        raise ConfigError(f"environment '{env.name}': no functions_url (give --functions-url)")
    if clock not in ("real", "simulated"):
        raise UsageError("--clock must be 'real' or 'simulated'")
    if start is not None and clock != "simulated":
        raise UsageError("--start needs --clock simulated")
    chosen: Clock = SimulatedClock(utc(start) if start else None) if clock == "simulated" else RealClock()
    with Database(env) as db:
        return simulate(
            db,
            url,
            sessions=sessions,
            rate=rate,
            duration=duration,
            clock=chosen,
            inject=parse_inject(inject),
            seed=seed,
            service_role_key=env.service_role_key(),
        )
