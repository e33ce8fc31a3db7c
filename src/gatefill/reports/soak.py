"""Writes a soak's files from its ``SoakResult``: ``staging_observability.md`` (with its PNG chart),
``staging_soak_gate.md`` and ``soak_measurements.json``.

Every number comes from the result, which the soak read from its ledger and its checks when it stopped; the chart
draws the rates with their 95 % Wilson intervals, the reference lines and the events per bucket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gatefill import stats
from gatefill.artifacts import render, write_json, write_text
from gatefill.job import ChartGuides, Check, SeriesBucket
from gatefill.soak import (
    STATE_PREFIX,
    SoakObservations,
    SoakResult,
    baseline_text,
    duration_text,
)

__all__ = ["CHART_NAME", "write_soak_artifacts"]

CHART_NAME = "staging_observability_chart.png"


def write_soak_artifacts(result: SoakResult, artifacts_dir: Path) -> SoakResult:
    """Writes the soak's files into ``artifacts_dir/<run>/`` and returns the result with their paths."""
    seen = result.observations
    assert seen is not None, "a soak result from run_soak carries what its reports show"
    out = artifacts_dir / result.run_id
    paths: dict[str, Path] = {}
    chart_note = (
        _chart(out / CHART_NAME, seen.buckets, f"soak {result.run_id}: {seen.env.name}", seen.guides)
        if seen.chart
        else "chart not drawn (--no-chart)"
    )
    if chart_note is None:
        paths["chart"] = out / CHART_NAME
    facts = _facts(result, seen)
    paths["observability"] = write_text(
        out / "staging_observability.md", _observability(result, seen, facts, chart_note)
    )
    paths["gate"] = write_text(
        out / "staging_soak_gate.md",
        render(
            "gate.md.j2",
            title=f"Staging soak gate {result.run_id}",
            verdict=result.verdict,
            facts={**facts, "why": result.reason},
            checks=[_display(c) for c in result.checks],
            approvals=seen.approvals,
            next_step=_next_step(result.verdict, result.run_id, result.complete, result.interrupted),
        ),
    )
    paths["measurements"] = write_json(out / "soak_measurements.json", _measurements_json(result, seen))
    return replace(result, paths=paths)


def _facts(result: SoakResult, seen: SoakObservations) -> dict[str, str]:
    run, params, env = seen.run, seen.run.params, seen.env
    duration, interval = float(params["duration_s"]), float(params["interval_s"])
    looks, max_looks = result.looks_taken, result.max_looks
    return {
        "run": f"`{run.id}` ({run.status.value})",
        "environment": f"`{env.name}` ({env.kind}) on `{env.display_url}`",
        "window": f"{result.window_start.isoformat()} → {result.window_end.isoformat()} ({duration_text(duration)})",
        "looks": f"{looks} of {max_looks}, every {duration_text(interval)}"
        + ("" if result.complete else " (window not finished)"),
        "clock": str(params.get("clock", "real")),
        "after apply run": f"`{run.parent_run_id}`" if run.parent_run_id else "none (window given directly)",
        "versions": ", ".join(f"{k} {v}" for k, v in sorted(run.versions.items())) or "none recorded",
        "statistical plan": _statistical_plan(params, max_looks),
        "baseline": baseline_text(result.baseline),
        "observe only": ", ".join(params.get("observe") or []) or "none",
        "written at": seen.read_at.isoformat(),
    }


def _statistical_plan(params: Mapping[str, Any], max_looks: int) -> str:
    return (
        f"non-inferiority margin {float(params['margin']) * 100:.1f} pp, one-sided alpha {params['alpha']} spent "
        f"over {max_looks} looks (O'Brien-Fleming), at least {params['min_n']} sessions per sample; baseline "
        + (
            f"rate {float(params['baseline_rate']):.1%} (given)"
            if params.get("baseline_rate") is not None
            else f"measured over the {float(params['baseline_days']):g} days before the window"
        )
        + (
            f"; conversion floor {float(params['min_conversion']):.1%} (exact one-sided binomial test, alpha "
            "spent the same way)"
            if params.get("min_conversion") is not None
            else "; no conversion floor in this soak's plan"
        )
    )


def _observability(result: SoakResult, seen: SoakObservations, facts: dict[str, str], chart_note: str | None) -> str:
    rate_names = sorted({n for b in seen.buckets for n in b.rates})
    event_names = sorted({e for b in seen.buckets for e in b.events})
    return render(
        "staging_observability.md.j2",
        run_id=result.run_id,
        verdict=result.verdict,
        reason=result.reason,
        facts=facts,
        names=list(seen.check_names),
        timeline=[
            {
                "seq": m.seq,
                "cutoff": m.window_end.isoformat(),
                "taken_at": m.taken_at.isoformat(),
                "verdict": m.verdict,
                "checks": {c.name: c.verdict + ("" if c.gating else " (obs)") for c in m.checks},
            }
            for m in result.measurements
        ],
        rate_names=rate_names,
        event_names=event_names,
        buckets=[
            {
                "start": b.start.isoformat(),
                "end": b.end.isoformat(),
                "rates": {n: _rate_cell(*b.rates.get(n, (0, 0)), b.pending.get(n, 0)) for n in rate_names},
                "events": {e: b.events.get(e, 0) for e in event_names},
            }
            for b in seen.buckets
        ],
        tables=seen.tables,
        chart=CHART_NAME if chart_note is None else None,
        chart_note=chart_note,
        pending_note=seen.guides.note,
        interrupted=result.interrupted,
        complete=result.complete,
        baseline=result.baseline.to_json() if result.baseline is not None else None,
    )


def _measurements_json(result: SoakResult, seen: SoakObservations) -> dict[str, Any]:
    run = seen.run
    return {
        "run_id": result.run_id,
        "environment": seen.env.name,
        "status": run.status.value,
        "verdict": result.verdict,
        "reason": result.reason,
        "window_start": result.window_start.isoformat(),
        "window_end": result.window_end.isoformat(),
        "params": run.params,
        "versions": dict(run.versions),
        "parent_run_id": run.parent_run_id,
        "looks": result.looks_taken,
        "max_looks": result.max_looks,
        "complete": result.complete,
        "baseline": result.baseline.to_json() if result.baseline is not None else None,
        "measurements": [
            {
                "seq": m.seq,
                "window_start": m.window_start.isoformat(),
                "cutoff": m.window_end.isoformat(),
                "taken_at": m.taken_at.isoformat(),
                "verdict": m.verdict,
                "checks": [c.to_json() for c in m.checks],
            }
            for m in result.measurements
        ],
        "written_at": seen.read_at.isoformat(),
    }


def _display(check: Check) -> Check:
    """The check as the Markdown reports show it: state keys (look-to-look bookkeeping) left out."""
    shown = {k: v for k, v in check.evidence.items() if not k.startswith(STATE_PREFIX)}
    return replace(check, evidence=shown)


def _rate_cell(k: int, n: int, pending: int = 0) -> str:
    later = f" (+{pending} pending)" if pending else ""
    if n == 0:
        return f"none judged yet ({pending} pending)" if pending else "n/a (0 of 0)"
    ci = stats.wilson_interval(k, n)
    return f"{k}/{n} = {k / n:.1%} [{ci.low:.1%}, {ci.high:.1%}]{later}"


_LINE_STYLES = {"baseline": "-", "threshold": "--", "floor": ":"}


def _chart(path: Path, buckets: Sequence[SeriesBucket], title: str, guides: ChartGuides) -> str | None:
    """Draws the rates (95 % Wilson intervals, reference lines, pending tail shaded) and, when there are any, the
    events per bucket; a panel with nothing to show is replaced by a sentence. Returns why not when it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: charts are files
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart not drawn: matplotlib is not installed"
    if not buckets:
        return "chart not drawn: the window has no buckets yet"
    has_rates = any(n for b in buckets for _, n in b.rates.values())
    events = sorted({e for b in buckets for e in b.events})
    if not has_rates and not events:
        return "chart not drawn: no session was judged and no error or forbidden event was logged in the window"
    panels = [name for name, shown in (("rates", has_rates), ("events", bool(events))) if shown]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.4 * len(panels) + 0.6), sharex=True, squeeze=False)
    try:
        ax = dict(zip(panels, axes[:, 0], strict=True))
        if "rates" in ax:
            _draw_rates(ax["rates"], buckets, guides)
        if "events" in ax:
            _draw_events(ax["events"], buckets, events)
        top = axes[0, 0]
        top.set_title(title)
        top.set_xlim(buckets[0].start, buckets[-1].end)  # the whole window: an empty stretch must look empty
        missing = [] if has_rates else ["No session was judged in the window, so there are no rates to draw."]
        missing += [] if events else ["No error or forbidden event was logged in the window."]
        fig.autofmt_xdate()
        fig.tight_layout(rect=(0, 0.05 * len(missing), 1, 1))
        for i, sentence in enumerate(missing):
            fig.text(0.5, 0.02 + 0.04 * i, sentence, ha="center", va="bottom", fontsize="medium")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return None


def _draw_rates(ax: Any, buckets: Sequence[SeriesBucket], guides: ChartGuides) -> None:
    centres = [b.start + (b.end - b.start) / 2 for b in buckets]
    end = buckets[-1].end
    lowest = min([line.value for line in guides.lines], default=1.0)
    for i, name in enumerate(buckets[0].rates):
        colour = f"C{i}"
        xs, ys, lows, highs = [], [], [], []
        for centre, b in zip(centres, buckets, strict=True):
            k, n = b.rates.get(name, (0, 0))
            if n:
                ci = stats.wilson_interval(k, n)
                lowest = min(lowest, ci.low)
                xs.append(centre)
                ys.append(k / n)
                lows.append(k / n - ci.low)
                highs.append(ci.high - k / n)
        if xs:
            ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, color=colour, label=name)
        for line in guides.lines:
            if line.series == name:
                style = _LINE_STYLES.get(line.style, "-.")
                ax.axhline(line.value, color=colour, linestyle=style, linewidth=1, alpha=0.7, label=line.label)
        after = guides.pending_after.get(name)
        if after is not None and after < end:
            ax.axvspan(after, end, color=colour, alpha=0.12, label=f"{name}: pending (not judged yet)")
    # From just below the lowest interval or reference line, in steps of 0.1, so lines a few points apart stay apart.
    ax.set_ylim(max(0.0, math.floor((lowest - 0.05) * 10) / 10), 1.02)
    ax.set_ylabel("rate (95% Wilson)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="x-small", ncol=2)


def _draw_events(ax: Any, buckets: Sequence[SeriesBucket], names: Sequence[str]) -> None:
    centres = [b.start + (b.end - b.start) / 2 for b in buckets]
    width = (buckets[0].end - buckets[0].start) * 0.8
    stacked = [0] * len(buckets)
    for name in names:
        values = [b.events.get(name, 0) for b in buckets]
        ax.bar(centres, values, width=width, bottom=stacked, label=name)
        stacked = [a + v for a, v in zip(stacked, values, strict=True)]
    ax.set_ylabel("events")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")


def _next_step(verdict: str, run_id: str, complete: bool, interrupted: bool) -> str:
    if interrupted:
        return f"Next: continue the soak with `gatefill soak --resume {run_id}` (it resumes at the next look)."
    if verdict == "PASS":
        return (
            f"Next: review `staging_observability.md`, then record the decision with "
            f"`gatefill approve {run_id} --gate soak --by NAME --note WHY`."
        )
    if verdict == "FAIL":
        return "Next: do not proceed; investigate the failed checks above (their queries and counts are listed)."
    if not complete:
        return f"Next: continue the soak with `gatefill soak --resume {run_id}`."
    return (
        "Next: there is not enough evidence to decide. Soak longer (a new window) or decide by hand and record it with "
        f"`gatefill approve {run_id} --gate soak --by NAME --note WHY`; the reports keep saying INCONCLUSIVE."
    )
