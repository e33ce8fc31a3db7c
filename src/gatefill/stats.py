"""Proportion statistics for the soak gate: intervals, non-inferiority against a baseline, and sequential monitoring.

This module turns counts (k successes out of n sessions) into verdicts PASS / FAIL / INCONCLUSIVE that stay valid at
small n and under repeated looks. It is pure: no I/O, no clock, only scipy for exact distributions.

Method choices, and why:

* **Wilson score interval** (`wilson_interval`) is the interval we *show*. At small n and rates near 0 or 1 it keeps
  close to its nominal coverage, whereas the Wald interval (statsmodels' default ``method='normal'``) collapses to zero
  width at k = 0 or k = n and undercovers badly near 0.9, which is exactly where conversion lives.
* **Clopper-Pearson** (`clopper_pearson_interval`, `zero_event_upper_bound`) is the interval we *gate* on. It is
  exact (coverage is at least the nominal level for every n and p) and it is the inversion of the exact binomial
  test, so a bound and a test never disagree. `rule_of_three_upper` is its closed form for zero events in N: a clean
  soak only shows "rate ≤ 1 − α^(1/N) ≈ 3/N", never "rate = 0".
* **Non-inferiority, not superiority.** A backfill must not make conversion worse; it is not expected to improve it.
  We test H0: p ≤ baseline − margin against H1: p > baseline − margin (PASS when rejected) and, the other way round,
  H0': p ≥ baseline − margin against p < baseline − margin (FAIL when rejected). Asking "is it better than the
  baseline?" instead would need about 880 sessions to see +2.5 pp and would reward noise at n = 12.
* **Known baseline → exact one-sided binomial test** (`noninferiority_vs_known`): no normal approximation, so the
  error rate is at most α at any n. The reported `Decision.interval` is the two-sided Clopper-Pearson interval at
  1 − 2α, shifted by the baseline: its ends are the two one-sided (1 − α) bounds dual to the two tests, so PASS holds
  exactly when ``interval.low ≥ −margin`` and FAIL exactly when ``interval.high ≤ −margin``.
* **Baseline that is itself a sample → Miettinen–Nurminen score test** (`noninferiority_two_sample`): the
  Farrington–Manning test of p − p0 = −margin, whose variance uses the maximum-likelihood estimates restricted to the
  null, times the Miettinen–Nurminen factor N/(N − 1). Restricting the variance to the null is what keeps the test
  near its level at the boundary of a margin hypothesis (a Wald variance does not). It matches statsmodels'
  ``test_proportions_2indep(..., method='score')`` exactly. The interval for the difference is the inversion of the
  same score test (again at 1 − 2α), so the interval and the verdict always agree; a Newcombe interval would not be
  exactly dual to the test.
* **Repeated looks → Lan-DeMets alpha spending, O'Brien-Fleming type, spent Bonferroni-style** (`SequentialPlan`,
  `sequential_noninferiority`). A soak looks at the data every interval for hours; testing each look at α would
  inflate the chance of a false PASS well above α. The cumulative one-sided error allowed by information fraction t
  is α(t) = 2 − 2Φ(z_{1−α/2} / √t), where α is the *one-sided* level: it is 0 at t = 0 and exactly α at t = 1. (The
  variant 2 − 2Φ(z_{1−α} / √t) reaches 2α at t = 1 and would overspend, so it is not used.) Look j of K (t_j = j/K)
  runs each one-sided test at the increment α(t_j) − α(t_{j−1}). By the union bound the chance of ever declaring a
  false PASS (or, separately, a false FAIL) is at most the sum of the increments, α. This is conservative: proper
  group-sequential boundaries would use the correlation between looks and spend the same α with more power. We accept
  that cost because the guarantee then needs no normal approximation (with the exact test it holds at every n), does
  not care how traffic is spread over the looks, and survives skipped looks. For K = 12 and α = 0.05 the final look
  runs at ≈ 0.0094, so reaching 80 % power there takes about 1.7× the sessions of a single fixed test (501 instead
  of 297 for baseline 0.892 and a 5 pp margin). Information is measured by the calendar (look / max_looks), not by n,
  so the per-look levels are fixed before any data arrive.
* **An absolute floor** (`sequential_at_least`): "the rate is at least 85 %" is the exact one-sided binomial test
  of H0: p ≤ floor (PASS when rejected; FAIL when p ≥ floor is rejected the other way), i.e. the known-baseline test
  with a zero margin, run at the same per-look levels as the non-inferiority test so repeated looks cost it nothing
  beyond its own alpha.
* **Minimum data** (`DEFAULT_MIN_N` = 30): with fewer sessions the verdict is INCONCLUSIVE ("too little data") whatever
  the tests say. For a baseline of 0.892 and a 5 pp margin (threshold 0.842) the exact test cannot pass at all below
  n = 18 even with zero failures (0.842^17 ≈ 0.054 > 0.05, 0.842^18 ≈ 0.045); at the final look of a 12-look plan it
  needs n ≥ 28 with zero failures; and only from n = 29 does it tolerate one failed session. Below 30 a PASS would
  therefore hinge on every single session, the two-sample normal approximation is poor, and the first sessions of a
  soak (warm-up, one tester) are the least independent, so a FAIL there is not trusted either.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

__all__ = [
    "DEFAULT_MIN_N",
    "Decision",
    "Interval",
    "Sample",
    "SequentialPlan",
    "Verdict",
    "clopper_pearson_interval",
    "noninferiority_two_sample",
    "noninferiority_vs_known",
    "required_sample_size_known",
    "rule_of_three_upper",
    "sequential_at_least",
    "sequential_noninferiority",
    "wilson_interval",
    "zero_event_upper_bound",
]


@functools.cache
def _scipy() -> SimpleNamespace:
    """scipy's distributions and root finder, imported on first use: importing scipy.stats takes about half a second,
    and every command reaches this module (the soak's and the status code import it) while few compute with it."""
    from scipy.optimize import brentq
    from scipy.stats import beta, binom, norm

    return SimpleNamespace(beta=beta, binom=binom, norm=norm, brentq=brentq)


Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE"]

DEFAULT_MIN_N = 30
"""Fewest sessions (in each sample) on which a decision may conclude; see the module docstring for the numbers."""

# Confidence of the Wilson interval attached to every Decision for display; the verdict never reads it.
_DISPLAY_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A confidence interval [low, high] together with how it was computed and at which confidence."""

    low: float
    high: float
    method: str
    confidence: float = 0.95

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Sample:
    """A count of successes out of trials, e.g. the baseline window's completed sessions that have a profile."""

    k: int
    n: int

    def __post_init__(self) -> None:
        _counts(self.k, self.n)

    @property
    def rate(self) -> float:
        """k / n, or NaN when there are no trials."""
        return self.k / self.n if self.n else math.nan


@dataclass(frozen=True)
class Decision:
    """The outcome of one non-inferiority comparison: the verdict, the evidence behind it and one sentence saying why.

    ``interval`` is for the *difference* ``estimate − baseline`` and is two-sided at confidence 1 − 2·alpha, so its
    ends are the one-sided bounds dual to the two tests: PASS ⇔ ``interval.low ≥ −margin`` and FAIL ⇔
    ``interval.high ≤ −margin`` (up to rounding, and unless the minimum-data rule forced INCONCLUSIVE).
    ``rate_interval`` is a 95 % Wilson interval for the current rate, for reports only. ``alpha`` is the level each
    one-sided test was run at: the nominal level of the look for a sequential decision.
    """

    verdict: Verdict
    k: int
    n: int
    estimate: float
    baseline: float
    margin: float
    alpha: float
    p_value_noninferior: float
    p_value_inferior: float
    interval: Interval
    rate_interval: Interval
    method: str
    reason: str
    baseline_k: int | None = None
    baseline_n: int | None = None
    look: int | None = None
    max_looks: int | None = None

    @property
    def threshold(self) -> float:
        """The rate that must be beaten: baseline − margin."""
        return self.baseline - self.margin

    @property
    def difference(self) -> float:
        """Observed rate minus baseline rate (NaN when either has no trials)."""
        return self.estimate - self.baseline


@dataclass(frozen=True)
class SequentialPlan:
    """The look schedule of a soak and how its one-sided error budget alpha is spent over those looks."""

    max_looks: int
    alpha: float = 0.05
    spending: Literal["obrien_fleming"] = "obrien_fleming"

    def __post_init__(self) -> None:
        if operator.index(self.max_looks) < 1:
            raise ValueError(f"max_looks must be at least 1, got {self.max_looks}")
        _check_alpha(self.alpha)
        if self.spending != "obrien_fleming":
            raise ValueError(f"unknown spending function {self.spending!r}; only 'obrien_fleming' is implemented")

    def spent(self, fraction: float) -> float:
        """Cumulative one-sided alpha allowed by information fraction ``fraction`` (0 → 0, 1 → alpha exactly)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"information fraction must be in [0, 1], got {fraction}")
        if fraction == 0.0:
            return 0.0
        if fraction == 1.0:
            # Returned as given rather than recomputed so the budget closes exactly, not to within rounding.
            return self.alpha
        z = float(_scipy().norm.isf(self.alpha / 2.0))
        return 2.0 * float(_scipy().norm.sf(z / math.sqrt(fraction)))

    def nominal_alpha(self, look: int) -> float:
        """Level each one-sided test runs at on look ``look`` (1-based): the spend added since the previous look."""
        look = operator.index(look)
        if not 1 <= look <= self.max_looks:
            raise ValueError(f"look must be between 1 and {self.max_looks}, got {look}")
        return self.spent(look / self.max_looks) - self.spent((look - 1) / self.max_looks)

    def nominal_alphas(self) -> tuple[float, ...]:
        """The nominal level of every look, first to last; they add up to alpha."""
        return tuple(self.nominal_alpha(j) for j in range(1, self.max_looks + 1))


# --------------------------------------------------------------------------------------------------------------------
# Intervals and bounds


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Two-sided Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    k, n = _counts(k, n)
    _check_confidence(confidence)
    if n == 0:
        return Interval(0.0, 1.0, "wilson", confidence)
    z = float(_scipy().norm.isf((1.0 - confidence) / 2.0))
    p = k / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / (1.0 + z2n)
    # At k = 0 and k = n the bounds are exactly 0 and 1; computing them would leave rounding dust like 1e-17.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Interval(low, high, "wilson", confidence)


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Two-sided exact (Clopper-Pearson) interval for a binomial proportion; (0, 1) when n == 0."""
    k, n = _counts(k, n)
    _check_confidence(confidence)
    low, high = _cp_bounds(k, n, (1.0 - confidence) / 2.0)
    return Interval(low, high, "clopper-pearson", confidence)


def rule_of_three_upper(n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper bound on a rate after zero events in n trials: 1 − (1 − confidence)^(1/n) (≈ 3/n)."""
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    _check_confidence(confidence)
    if n == 0:
        return 1.0
    # expm1 keeps precision for large n, where the bound is tiny and 1 − x would cancel.
    return -math.expm1(math.log1p(-confidence) / n)


def zero_event_upper_bound(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided Clopper-Pearson upper bound on a rate after k events in n trials (k = 0: the rule of three)."""
    k, n = _counts(k, n)
    _check_confidence(confidence)
    if k == n:
        return 1.0
    if k == 0:
        return rule_of_three_upper(n, confidence)
    return float(_scipy().beta.isf(1.0 - confidence, k + 1, n - k))


# --------------------------------------------------------------------------------------------------------------------
# Non-inferiority decisions


def noninferiority_vs_known(
    k: int,
    n: int,
    baseline: float,
    margin: float,
    alpha: float = 0.05,
    *,
    min_n: int = DEFAULT_MIN_N,
) -> Decision:
    """Exact one-sided binomial non-inferiority test of k/n against a baseline rate known without sampling error.

    PASS when H0: p ≤ baseline − margin is rejected at ``alpha``; FAIL when p ≥ baseline − margin is rejected at
    ``alpha`` (the rate is clearly below the threshold); otherwise, or when n < ``min_n``, INCONCLUSIVE.
    """
    _check_alpha(alpha)
    return _decide_known(k, n, baseline, margin, alpha, min_n, method="exact binomial", look=None, max_looks=None)


def noninferiority_two_sample(
    k: int,
    n: int,
    k0: int,
    n0: int,
    margin: float,
    alpha: float = 0.05,
    *,
    min_n: int = DEFAULT_MIN_N,
) -> Decision:
    """Miettinen–Nurminen score test that the rate k/n is not below the sampled baseline k0/n0 by more than margin.

    The p-values equal statsmodels' ``test_proportions_2indep(k, n, k0, n0, value=-margin, method='score',
    compare='diff', alternative='larger')`` (and ``'smaller'`` for ``p_value_inferior``). Both samples need ``min_n``
    trials before the verdict may be PASS or FAIL.
    """
    _check_alpha(alpha)
    return _decide_two_sample(
        k, n, Sample(k0, n0), margin, alpha, min_n, method="Miettinen-Nurminen score", look=None, max_looks=None
    )


def sequential_noninferiority(
    k: int,
    n: int,
    *,
    baseline: float | Sample,
    margin: float,
    plan: SequentialPlan,
    look: int,
    min_n: int = DEFAULT_MIN_N,
) -> Decision:
    """Non-inferiority decision at look ``look`` of ``plan``, valid however many of the plan's looks are taken.

    ``k`` and ``n`` are cumulative since the soak began. ``baseline`` is a known rate (exact binomial test) or a
    `Sample` (score test). Each test runs at ``plan.nominal_alpha(look)``. PASS and FAIL are final: the caller stops
    watching. INCONCLUSIVE before the last look means "keep watching"; at the last look it is the soak's verdict.
    Taking a look twice, or more looks than ``plan.max_looks``, voids the guarantee.
    """
    nominal = plan.nominal_alpha(look)
    method = (
        f"O'Brien-Fleming alpha spending (Bonferroni over looks), look {look} of {plan.max_looks}, "
        f"overall one-sided alpha {plan.alpha:g}"
    )
    if isinstance(baseline, Sample):
        return _decide_two_sample(
            k,
            n,
            baseline,
            margin,
            nominal,
            min_n,
            method=f"Miettinen-Nurminen score; {method}",
            look=look,
            max_looks=plan.max_looks,
        )
    return _decide_known(
        k, n, baseline, margin, nominal, min_n, method=f"exact binomial; {method}", look=look, max_looks=plan.max_looks
    )


def sequential_at_least(
    k: int, n: int, *, floor: float, plan: SequentialPlan, look: int, min_n: int = DEFAULT_MIN_N
) -> Decision:
    """Whether the rate k/n is at least ``floor``, at look ``look`` of ``plan``: the exact one-sided binomial test.

    PASS when H0: p ≤ floor is rejected at ``plan.nominal_alpha(look)`` (the rate is shown to be above the floor),
    FAIL when p ≥ floor is rejected (shown to be below it), INCONCLUSIVE otherwise or below ``min_n`` sessions.
    ``k`` and ``n`` are cumulative; the error budget is spent over the looks exactly as in
    `sequential_noninferiority`, so a floor decision, once reached, is kept by the caller.
    """
    if not 0.0 < floor < 1.0:
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    method = (
        f"exact one-sided binomial test against the floor; O'Brien-Fleming alpha spending (Bonferroni over looks), "
        f"look {look} of {plan.max_looks}, overall one-sided alpha {plan.alpha:g}"
    )
    return _decide_known(
        k,
        n,
        floor,
        0.0,
        plan.nominal_alpha(look),
        min_n,
        method=method,
        look=look,
        max_looks=plan.max_looks,
        threshold_text=f"the floor {_pct(floor)}",
    )


def required_sample_size_known(
    baseline: float,
    margin: float,
    power: float = 0.8,
    alpha: float = 0.05,
    expected: float | None = None,
) -> int:
    """Sessions a one-sided one-sample test at ``alpha`` needs to reach ``power`` (normal approximation).

    The null rate is ``baseline − margin`` and the true rate is ``expected`` (default: the baseline itself, i.e. "the
    backfill changed nothing"); n = ((z_{1−α}·√(p0(1−p0)) + z_{power}·√(p1(1−p1))) / (p1 − p0))², rounded up. With
    ``expected`` below the null rate it is the size needed to show inferiority instead. For a sequential plan pass the
    final look's nominal alpha to get the (conservative) size at which the last look reaches the power.
    """
    _check_alpha(alpha)
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    _check_baseline_margin(baseline, margin)
    p0 = baseline - margin
    p1 = baseline if expected is None else expected
    if not 0.0 <= p1 <= 1.0:
        raise ValueError(f"expected rate must be in [0, 1], got {p1}")
    if p1 == p0:
        raise ValueError("the expected rate equals baseline − margin: no sample size can separate them")
    z_alpha = float(_scipy().norm.isf(alpha))
    z_power = float(_scipy().norm.ppf(power))
    root_n = (z_alpha * math.sqrt(p0 * (1.0 - p0)) + z_power * math.sqrt(p1 * (1.0 - p1))) / abs(p1 - p0)
    # The tiny tolerance stops a product like 296.0000000001 from rounding up to 297.
    return max(1, math.ceil(root_n * root_n - 1e-9))


# --------------------------------------------------------------------------------------------------------------------
# Internals


def _decide_known(
    k: int,
    n: int,
    baseline: float,
    margin: float,
    alpha: float,
    min_n: int,
    *,
    method: str,
    look: int | None,
    max_looks: int | None,
    threshold_text: str | None = None,
) -> Decision:
    k, n = _counts(k, n)
    _check_baseline_margin(baseline, margin)
    threshold = baseline - margin
    # P(X ≥ k) and P(X ≤ k) at the threshold rate: the exact one-sided p-values of the two directions.
    p_noninferior = float(_scipy().binom.sf(k - 1, n, threshold))
    p_inferior = float(_scipy().binom.cdf(k, n, threshold))
    low, high = _cp_bounds(k, n, alpha)
    interval = Interval(
        low - baseline, high - baseline, "clopper-pearson, rate minus known baseline", _two_sided(alpha)
    )
    estimate = k / n if n else math.nan
    observed = f"{_of(k, n)} vs {threshold_text or 'baseline ' + _pct(baseline)}"
    return _decision(
        k=k,
        n=n,
        estimate=estimate,
        baseline=baseline,
        margin=margin,
        alpha=alpha,
        p_noninferior=p_noninferior,
        p_inferior=p_inferior,
        interval=interval,
        method=method,
        observed=observed,
        short_of=max(0, min_n - n),
        min_n=min_n,
        baseline_k=None,
        baseline_n=None,
        look=look,
        max_looks=max_looks,
        threshold_text=threshold_text,
    )


def _decide_two_sample(
    k: int,
    n: int,
    base: Sample,
    margin: float,
    alpha: float,
    min_n: int,
    *,
    method: str,
    look: int | None,
    max_looks: int | None,
) -> Decision:
    k, n = _counts(k, n)
    k0, n0 = base.k, base.n
    rate0 = base.rate
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if n == 0 or n0 == 0:
        # With an empty sample there is no estimate to test; report "no evidence" rather than NaN p-values.
        p_noninferior = p_inferior = 1.0
        interval = Interval(-1.0, 1.0, "miettinen-nurminen score, difference", _two_sided(alpha))
    else:
        z = _mn_score_z(k, n, k0, n0, -margin)
        p_noninferior = float(_scipy().norm.sf(z))
        p_inferior = float(_scipy().norm.cdf(z))
        low, high = _mn_score_interval(k, n, k0, n0, alpha)
        interval = Interval(low, high, "miettinen-nurminen score, difference", _two_sided(alpha))
    estimate = k / n if n else math.nan
    observed = f"{_of(k, n)} vs baseline {_of(k0, n0)}"
    smallest = min(n, n0)
    return _decision(
        k=k,
        n=n,
        estimate=estimate,
        baseline=rate0,
        margin=margin,
        alpha=alpha,
        p_noninferior=p_noninferior,
        p_inferior=p_inferior,
        interval=interval,
        method=method,
        observed=observed,
        short_of=max(0, min_n - smallest),
        min_n=min_n,
        baseline_k=k0,
        baseline_n=n0,
        look=look,
        max_looks=max_looks,
    )


def _decision(
    *,
    k: int,
    n: int,
    estimate: float,
    baseline: float,
    margin: float,
    alpha: float,
    p_noninferior: float,
    p_inferior: float,
    interval: Interval,
    method: str,
    observed: str,
    short_of: int,
    min_n: int,
    baseline_k: int | None,
    baseline_n: int | None,
    look: int | None,
    max_looks: int | None,
    threshold_text: str | None = None,
) -> Decision:
    """One test's Decision: its numbers, with the verdict and one-sentence reason of the rules every test shares.

    ``threshold_text`` names an absolute floor (`sequential_at_least`): the sentence then speaks of the rate being
    above or below that floor instead of non-inferiority to a baseline.
    """
    verdict, reason = _verdict_and_reason(
        baseline=baseline,
        margin=margin,
        alpha=alpha,
        p_noninferior=p_noninferior,
        p_inferior=p_inferior,
        observed=observed,
        short_of=short_of,
        min_n=min_n,
        look=look,
        max_looks=max_looks,
        threshold_text=threshold_text,
    )
    return Decision(
        verdict=verdict,
        k=k,
        n=n,
        estimate=estimate,
        baseline=baseline,
        margin=margin,
        alpha=alpha,
        p_value_noninferior=p_noninferior,
        p_value_inferior=p_inferior,
        interval=interval,
        rate_interval=wilson_interval(k, n, _DISPLAY_CONFIDENCE),
        method=method,
        reason=reason,
        baseline_k=baseline_k,
        baseline_n=baseline_n,
        look=look,
        max_looks=max_looks,
    )


def _verdict_and_reason(
    *,
    baseline: float,
    margin: float,
    alpha: float,
    p_noninferior: float,
    p_inferior: float,
    observed: str,
    short_of: int,
    min_n: int,
    look: int | None,
    max_looks: int | None,
    threshold_text: str | None,
) -> tuple[Verdict, str]:
    """The verdict rules shared by every test, with the one-sentence reason that states them."""
    margin_text = f"{_pct(baseline - margin)} (baseline {_pct(baseline)} − margin {margin * 100:.1f} pp)"
    threshold = threshold_text or margin_text
    above, below = ("", "") if threshold_text else ("non-inferior, ", "inferior, ")
    names = ("p(rate ≤ floor)", "p(rate ≥ floor)") if threshold_text else ("non-inferiority p", "inferiority p")
    tests = f"{names[0]} = {_p(p_noninferior)}, {names[1]} = {_p(p_inferior)}, alpha = {_p(alpha)}"
    where = f" at look {look} of {max_looks}" if look is not None else ""
    if short_of > 0:
        return (
            "INCONCLUSIVE",
            f"too little data: {observed}; at least {min_n} sessions are needed in each sample ({tests}).",
        )
    if p_noninferior <= alpha:
        return "PASS", f"{observed}: {above}the rate is shown to be above {threshold}{where} ({tests})."
    if p_inferior <= alpha:
        return "FAIL", f"{observed}: {below}the rate is shown to be below {threshold}{where} ({tests})."
    watching = look is not None and max_looks is not None and look < max_looks
    outcome = "keep watching" if watching else "no conclusion"
    shown = "neither above nor below" if threshold_text else "neither non-inferiority nor inferiority to"
    return "INCONCLUSIVE", f"{observed}: {shown} {threshold} is shown{where}, {outcome} ({tests})."


def _cp_bounds(k: int, n: int, tail: float) -> tuple[float, float]:
    """Clopper-Pearson bounds with ``tail`` probability outside on each side (tail 0 gives the trivial [0, 1])."""
    # isf rather than ppf(1 − tail): sequential looks use tails near 1e-11, where 1 − tail loses the digits.
    low = 0.0 if k == 0 else float(_scipy().beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(_scipy().beta.isf(tail, k + 1, n - k))
    return low, high


def _restricted_mle(k: int, n: int, k0: int, n0: int, delta: float) -> tuple[float, float]:
    """Maximum-likelihood rates (p, p0) of the two samples under the constraint p − p0 = delta (Farrington–Manning).

    The constrained likelihood equation is a cubic in p; its admissible root has the closed trigonometric form below.
    """
    rate, rate0 = k / n, k0 / n0
    if delta == 0.0:
        pooled = (k + k0) / (n + n0)
        return pooled, pooled
    theta = n0 / n
    a = 1.0 + theta
    b = -(1.0 + theta + rate + theta * rate0 + delta * (theta + 2.0))
    c = delta * delta + delta * (2.0 * rate + theta + 1.0) + rate + theta * rate0
    d = -rate * delta * (1.0 + delta)
    v = b**3 / (27.0 * a**3) - b * c / (6.0 * a * a) + d / (2.0 * a)
    u = math.copysign(math.sqrt(max(0.0, b * b / (9.0 * a * a) - c / (3.0 * a))), v)
    if u == 0.0:
        p = -b / (3.0 * a)
    else:
        # Clamp: rounding can push the cosine argument a hair outside [-1, 1] when two roots nearly coincide.
        w = (math.pi + math.acos(max(-1.0, min(1.0, v / u**3)))) / 3.0
        p = 2.0 * u * math.cos(w) - b / (3.0 * a)
    # Keep both rates in [0, 1] despite rounding, preserving the constraint.
    p = min(max(p, max(0.0, delta)), min(1.0, 1.0 + delta))
    return p, p - delta


def _mn_score_z(k: int, n: int, k0: int, n0: int, delta: float) -> float:
    """Miettinen–Nurminen z statistic for H0: p − p0 = delta (large values favour p − p0 > delta)."""
    p, p0 = _restricted_mle(k, n, k0, n0, delta)
    total = n + n0
    variance = (p * (1.0 - p) / n + p0 * (1.0 - p0) / n0) * total / (total - 1)
    excess = k / n - k0 / n0 - delta
    if variance <= 0.0:
        # Both restricted rates are 0 or 1: the data sit exactly on the null or infinitely far from it.
        return 0.0 if excess == 0.0 else math.copysign(math.inf, excess)
    return excess / math.sqrt(variance)


def _mn_score_interval(k: int, n: int, k0: int, n0: int, tail: float) -> tuple[float, float]:
    """Difference interval from inverting the score test, ``tail`` probability outside on each side."""
    if tail <= 0.0:
        return -1.0, 1.0
    z = float(_scipy().norm.isf(tail))
    observed = k / n - k0 / n0
    # The statistic falls as the null difference rises; the ends of the interval are where it crosses ±z. Search just
    # inside (-1, 1): at exactly ±1 the restricted rates are forced to 0 and 1 and the variance vanishes.
    edge = 1.0 - 1e-12

    def crossing(target: float, lo: float, hi: float, outside: float) -> float:
        f_lo = _mn_score_z(k, n, k0, n0, lo) - target
        f_hi = _mn_score_z(k, n, k0, n0, hi) - target
        if f_lo == 0.0:
            return lo
        if f_hi == 0.0:
            return hi
        if (f_lo > 0.0) == (f_hi > 0.0):
            return outside
        return float(_scipy().brentq(lambda d: _mn_score_z(k, n, k0, n0, d) - target, lo, hi, xtol=1e-13, rtol=1e-13))

    low = crossing(z, -edge, observed, -1.0) if observed > -edge else -1.0
    high = crossing(-z, observed, edge, 1.0) if observed < edge else 1.0
    return low, high


def _counts(k: int, n: int) -> tuple[int, int]:
    k, n = operator.index(k), operator.index(n)
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"counts must satisfy 0 <= k <= n, got k={k}, n={n}")
    return k, n


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_alpha(alpha: float) -> None:
    # Below 0.5 the two one-sided tests can never both reject, so PASS and FAIL stay mutually exclusive.
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")


def _check_baseline_margin(baseline: float, margin: float) -> None:
    if not 0.0 <= baseline <= 1.0:
        raise ValueError(f"baseline must be in [0, 1], got {baseline}")
    if not 0.0 <= margin <= baseline:
        raise ValueError(f"margin must be in [0, baseline], got {margin} with baseline {baseline}")


def _two_sided(tail: float) -> float:
    return 1.0 - 2.0 * tail


def _pct(rate: float) -> str:
    return "n/a" if math.isnan(rate) else f"{rate:.1%}"


def _of(k: int, n: int) -> str:
    return f"{k} of {n} ({_pct(k / n)})" if n else f"{k} of {n}"


def _p(value: float) -> str:
    # Two decimals read best for ordinary p-values; tiny ones (sequential levels, strong evidence) need exponents.
    return f"{value:.2f}" if value >= 0.01 else f"{value:.2g}"
