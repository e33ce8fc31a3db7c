"""Writes a rollback's report, ``rollback_report.md`` (a dry run: ``rollback_dry_run.md``), and renders its lines for
a terminal: what was restored and deleted per table, the conflicts, and the verification with its counts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gatefill.artifacts import write_text
from gatefill.db import format_utc
from gatefill.rollback import DRY_RUN_REPORT_NAME, REPORT_NAME, RollbackResult

__all__ = ["render_report", "render_rollback", "write_rollback_report"]


def write_rollback_report(result: RollbackResult, artifacts_dir: Path) -> RollbackResult:
    """Writes the report into ``artifacts_dir/<run>/`` and returns the result with its path (a dry run's report has a
    name of its own, so it never replaces the report of a real rollback)."""
    path = artifacts_dir / result.run_id / (DRY_RUN_REPORT_NAME if result.dry_run else REPORT_NAME)
    result = replace(result, report_path=path)
    write_text(path, render_report(result))
    return result


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_report(result: RollbackResult) -> str:
    """``rollback_report.md``: what was restored and deleted per table, conflicts, verification with its counts."""
    lines = _head(result)
    lines += [
        "Every key comes from the run's ledger; rows the run did not write are never addressed, and nothing is "
        "selected by timestamp. Rows are deleted by primary key, then before-images are inserted back whole (a job "
        "whose images hold only the columns it set has those columns updated back in place, by key).",
        "",
    ]
    lines += _tables(result) + _conflicts(result) + _verification(result)
    if result.notes:
        lines += ["", "## Problems found by verification", ""] + [f"- {_cell(n)}" for n in result.notes]
    return "\n".join(lines) + "\n"


def _head(result: RollbackResult) -> list[str]:
    mode = "DRY RUN: executed inside a transaction that was then rolled back" if result.dry_run else "executed"
    if result.refused:
        mode = "REFUSED: nothing was changed"
    elif not result.dry_run and not result.committed:
        mode = "FAILED verification: the transaction was rolled back, nothing was changed"
    status = (
        f"{result.status_before.value} → {result.status_after.value}"
        if result.committed
        else f"{result.status_before.value} (unchanged)"
    )
    lines = [
        f"# Rollback report: run `{result.run_id}`",
        "",
        "| | |",
        "|---|---|",
        f"| verdict | **{result.verdict}** |",
        f"| mode | {mode} |",
        f"| forced | {'yes (--force): before-images restored over the conflicts below' if result.forced else 'no'} |",
        f"| environment | {_cell(result.environment)} (`{_cell(result.database)}`) |",
        f"| run status | {status} |",
        f"| generated at | {format_utc(result.generated_at)} |",
        f"| ledger changes | {result.changes} "
        f"(`sum(rows) FROM gatefill_change_sets WHERE run_id = '{_cell(result.run_id)}'`) |",
        f"| conflicts | {len(result.conflicts)} |",
        "",
    ]
    if not result.status_allows_rollback:
        lines += [
            f"Note: a run in status `{result.status_before.value}` cannot become `rolled_back`; "
            "a real rollback would be refused.",
            "",
        ]
    return lines


def _tables(result: RollbackResult) -> list[str]:
    lines = [
        "## Rows per table",
        "",
        "| table | inserted by the run | deleted | already absent | updated by the run | restored |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in result.tables:
        lines.append(
            f"| {t.table} | {t.inserted_by_run} | {t.deleted} | {t.already_absent} | {t.updated_by_run} | "
            f"{t.restored} |"
        )
    if result.refused:
        lines += ["", "(Refused before any write: the deleted/restored columns are zero because nothing ran.)"]
    return lines


def _conflicts(result: RollbackResult) -> list[str]:
    lines = ["", "## Conflicts: rows changed since the run wrote them", ""]
    if not result.conflicts:
        return [*lines, "None: every row the run wrote still holds, in every column, what the run wrote."]
    lines += ["| table | key | what differs |", "|---|---|---|"]
    for c in result.conflicts:
        what = "deleted since the run wrote it" if c.reason == "deleted" else "changed: " + ", ".join(c.columns)
        lines.append(f"| {c.table} | `{_cell(c.row_key)}` | {_cell(what)} |")
    return lines


def _verification(result: RollbackResult) -> list[str]:
    lines = ["", "## Verification (inside the transaction, before commit)", ""]
    if not result.verification:
        return [*lines, "Not run: " + ("the rollback was refused." if result.refused else "the run changed no rows.")]
    lines += ["| check | expected | measured | verdict | query |", "|---|---:|---:|---|---|"]
    for check in result.verification:
        lines.append(
            f"| {_cell(check.name)} | {check.evidence.get('expected')} | {check.evidence.get('measured')} | "
            f"{check.verdict} | `{_cell(check.query)}` |"
        )
    return lines


def render_rollback(result: RollbackResult) -> list[str]:
    """Short plain lines for the terminal."""
    head = "dry run of rollback" if result.dry_run else "rollback"
    lines = [f"{head} of run {result.run_id} on {result.environment} ({result.database}): {result.verdict}"]
    for t in result.tables:
        if t.inserted_by_run or t.updated_by_run:
            lines.append(
                f"  {t.table}: {t.deleted}/{t.inserted_by_run} inserted rows deleted"
                f" ({t.already_absent} already absent), {t.restored}/{t.updated_by_run} before-images restored"
            )
    for check in result.verification:
        lines.append(f"  {check.verdict:<4} {check.summary}")
    if result.conflicts:
        lines.append(f"  {len(result.conflicts)} conflict(s){' overwritten (--force)' if result.forced else ''}")
    if result.dry_run:
        lines.append("  nothing was changed (dry run)")
    elif result.committed:
        lines.append(f"  run {result.run_id}: {result.status_before.value} → {result.status_after.value}")
    if result.report_path is not None:
        lines.append(f"  report: {result.report_path}")
    return lines
