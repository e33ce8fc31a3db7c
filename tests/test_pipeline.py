"""The whole pipeline on SQLite, as the demo runs it: it reaches a measured final gate, and a re-run is a no-op."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from gatefill.clock import RealClock
from gatefill.config import load_settings
from gatefill.demo import DEMO_SINCE, run_full_demo
from gatefill.pipeline import PipelineOptions, run_pipeline


def never_soak(*_args: object) -> dict[str, object]:
    raise AssertionError("a finished pipeline must not soak again")


def test_full_pipeline_reaches_the_final_gate_and_rerunning_changes_nothing(tmp_path: Path) -> None:
    with (tmp_path / "out.txt").open("w") as sink:
        state = run_full_demo(tmp_path / "demo", Console(file=sink, width=120), fast=True, soak_sessions=400)
    assert state.done
    steps = state.steps
    assert steps["apply"]["verdict"] == "PASS" and steps["apply"]["results"] == {"written": 39}
    assert steps["soak"]["verdict"] in ("PASS", "INCONCLUSIVE")
    assert steps["health"]["healthy"] is True
    final = Path(steps["final_gate"]["artifact"]).read_text()
    expected = "GO" if steps["soak"]["verdict"] == "PASS" else "INCONCLUSIVE"
    assert f"## Verdict: **{expected}**" in final
    assert "| `" + steps["apply"]["run_id"] + "` | plan | approval | demo |" in final

    settings = load_settings(tmp_path / "demo" / "gatefill.toml", environ={})
    rerun = run_pipeline(
        settings,
        PipelineOptions(staging="staging", production="production", since=DEMO_SINCE),
        clock=RealClock(),
        soak_step=never_soak,
    )
    assert rerun.done and rerun.run_id == state.run_id
    assert rerun.log == ["the pipeline already reached its final gate: nothing to do"]
