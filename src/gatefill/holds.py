"""Apply's indicators: what is read before a batch to decide how the apply goes on, each look classified Normal,
Hold or Stop as GitLab's batched migrations do (Hold: go on, slower and in smaller batches; Stop: no batch starts
until every indicator has been Normal for a cool-down). Here are the protocol and the manual ones (gh-ost's flag
file and user query, both Stop); the health indicators (Postgres, the live app) are in ``gatefill.indicators``.

An indicator never lets a batch start on an unknown: a read that fails is a Stop that says why. One that does not
apply where it runs (a Postgres statistic on SQLite, replica lag without replicas) says N/A and why; it is never a
made-up Normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from gatefill.db import Database
from gatefill.errors import DatabaseError, UsageError

__all__ = ["Decision", "Indicator", "Reading", "ThrottleFile", "ThrottleQuery", "read_all", "validate_all", "worst"]


class Decision(StrEnum):
    """What an indicator says about the next batch (N/A: it cannot say, and why is in the reading)."""

    NOT_APPLICABLE = "n/a"
    NORMAL = "normal"
    HOLD = "hold"
    STOP = "stop"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Decision.NOT_APPLICABLE: 0, Decision.NORMAL: 0, Decision.HOLD: 1, Decision.STOP: 2}


@dataclass(frozen=True)
class Reading:
    """One look at one indicator: its decision, the value it read, the thresholds it was held against, and why, in
    one line."""

    indicator: str
    decision: Decision
    value: str
    reason: str
    threshold: str = ""

    @property
    def holds(self) -> bool:
        """Whether it keeps the next batch from starting (a Stop)."""
        return self.decision is Decision.STOP

    @property
    def slows(self) -> bool:
        return self.decision is Decision.HOLD


class Indicator(Protocol):
    """Something apply reads before each batch."""

    @property
    def name(self) -> str:
        """Short and stable (``file``, ``query``): the ledger records holds under it."""
        ...

    @property
    def per_batch(self) -> bool:
        """Read before every batch (cheap, and an operator expects it at once); False: at most once a look
        interval (the health indicators, whose rates are measured between looks)."""
        ...

    def validate(self, db: Database) -> None:
        """``UsageError`` (exit 2) when the indicator cannot be read at all; called once, before anything is
        written."""
        ...

    def read(self, db: Database) -> Reading:
        """The indicator now; never raises for a failed read (that is a Stop saying why)."""
        ...


@dataclass(frozen=True)
class ThrottleFile:
    """Holds while a file exists (``--throttle-file``): an operator touches it to hold, removes it to resume."""

    path: Path
    name: str = "file"
    per_batch: bool = True

    def validate(self, db: Database) -> None:
        return None  # a file already present at start simply holds the first batch

    def read(self, db: Database) -> Reading:
        rule = "stop while the file exists"
        if self.path.exists():
            return Reading(self.name, Decision.STOP, "present", f"throttle file {self.path} exists", rule)
        return Reading(self.name, Decision.NORMAL, "absent", f"throttle file {self.path} absent", rule)


@dataclass(frozen=True)
class ThrottleQuery:
    """Holds while a read-only query on the environment's database returns a true first column
    (``--throttle-query``); no row, NULL, 0 or false let the batch start."""

    sql: str
    name: str = "query"
    per_batch: bool = True

    def _first_column(self, db: Database) -> object:
        with db.read_only() as conn:
            row = conn.execute(sa.text(self.sql)).first()
        return None if row is None or len(row) == 0 else row[0]

    def validate(self, db: Database) -> None:
        if not self.sql.strip():
            raise UsageError("--throttle-query needs a query")
        try:
            self._first_column(db)
        except DatabaseError as exc:
            raise UsageError(f"--throttle-query failed: {exc}") from exc

    def read(self, db: Database) -> Reading:
        rule = "stop while the first column is true"
        try:
            value = self._first_column(db)
        except DatabaseError as exc:
            return Reading(self.name, Decision.STOP, "error", f"throttle query failed: {exc}", rule)
        decision = Decision.STOP if value else Decision.NORMAL
        return Reading(self.name, decision, str(value), f"throttle query returned {value!r}", rule)


def validate_all(indicators: Sequence[Indicator], db: Database) -> None:
    """Validates every indicator (the first that cannot be read raises ``UsageError``)."""
    for indicator in indicators:
        indicator.validate(db)


def read_all(indicators: Sequence[Indicator], db: Database) -> list[Reading]:
    """One look at each indicator, in the order given."""
    return [indicator.read(db) for indicator in indicators]


def worst(readings: Sequence[Reading]) -> Reading | None:
    """The first of the most severe readings (Stop over Hold); None when none holds or stops."""
    found: Reading | None = None
    for reading in readings:
        if reading.decision.severity > (found.decision.severity if found else 0):
            found = reading
    return found
