"""Apply's progress on a console: a Rich bar (rate, ETA) on a terminal; otherwise one plain line per committed batch
(at most one a second, the last always), so a log of a two-minute apply is never silent."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from gatefill.apply import ProgressCallback

__all__ = ["apply_progress"]

#: Plain lines come at most this often (an unthrottled apply commits many batches a second).
_MIN_SECONDS_BETWEEN_LINES = 1.0


@contextmanager
def apply_progress(console: Console, label: str = "apply") -> Iterator[ProgressCallback]:
    """Yields the callback apply calls after each committed batch; the bar (on a terminal) stops at the last one."""
    if not console.is_terminal:
        last = [-_MIN_SECONDS_BETWEEN_LINES]

        def line(done: int, total: int, elapsed: float) -> None:
            if elapsed - last[0] >= _MIN_SECONDS_BETWEEN_LINES or done == total:
                last[0] = elapsed
                rate = f", {done / elapsed * 60:.1f}/min" if elapsed > 0 else ""
                console.print(f"{label}: {done}/{total} sessions, {elapsed:.0f} s{rate}", markup=False)

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "{task.fields[rate]}",
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(label, total=None, rate="")

        def update(done: int, total: int, elapsed: float) -> None:
            rate = f"{done / elapsed * 60:.1f}/min" if elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)
            if done == total:
                bar.stop()  # what the pipeline prints next goes below the finished bar

        yield update
