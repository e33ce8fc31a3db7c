"""Hold indicators for apply: what is read before each batch to decide whether it may start (gh-ost's manual
throttles: a flag file and a user query), behind one small protocol that later indicators (replication lag, WAL
rate, the app's p95) implement the same way.

An indicator never lets a batch start on an unknown: a read that fails is a Hold that says why.
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

__all__ = ["Decision", "Indicator", "Reading", "ThrottleFile", "ThrottleQuery", "first_hold", "validate_all"]


class Decision(StrEnum):
    """What an indicator says about the next batch."""

    NORMAL = "normal"
    HOLD = "hold"


@dataclass(frozen=True)
class Reading:
    """One look at one indicator: its decision, the value it read, and why, in one line."""

    indicator: str
    decision: Decision
    value: str
    reason: str

    @property
    def holds(self) -> bool:
        return self.decision is Decision.HOLD


class Indicator(Protocol):
    """Something apply reads before each batch."""

    @property
    def name(self) -> str:
        """Short and stable (``file``, ``query``): the ledger records holds under it."""
        ...

    def validate(self, db: Database) -> None:
        """``UsageError`` (exit 2) when the indicator cannot be read at all; called once, before anything is
        written."""
        ...

    def read(self, db: Database) -> Reading:
        """The indicator now; never raises for a failed read (that is a Hold saying why)."""
        ...


@dataclass(frozen=True)
class ThrottleFile:
    """Holds while a file exists (``--throttle-file``): an operator touches it to hold, removes it to resume."""

    path: Path
    name: str = "file"

    def validate(self, db: Database) -> None:
        return None  # a file already present at start simply holds the first batch

    def read(self, db: Database) -> Reading:
        if self.path.exists():
            return Reading(self.name, Decision.HOLD, "present", f"throttle file {self.path} exists")
        return Reading(self.name, Decision.NORMAL, "absent", f"throttle file {self.path} absent")


@dataclass(frozen=True)
class ThrottleQuery:
    """Holds while a read-only query on the environment's database returns a true first column
    (``--throttle-query``); no row, NULL, 0 or false let the batch start."""

    sql: str
    name: str = "query"

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
        try:
            value = self._first_column(db)
        except DatabaseError as exc:
            return Reading(self.name, Decision.HOLD, "error", f"throttle query failed: {exc}")
        if value:
            return Reading(self.name, Decision.HOLD, str(value), f"throttle query returned {value!r}")
        return Reading(self.name, Decision.NORMAL, str(value), f"throttle query returned {value!r}")


def validate_all(indicators: Sequence[Indicator], db: Database) -> None:
    """Validates every indicator (the first that cannot be read raises ``UsageError``)."""
    for indicator in indicators:
        indicator.validate(db)


def first_hold(indicators: Sequence[Indicator], db: Database) -> Reading | None:
    """The first indicator that holds, in the order given; None when every one is Normal."""
    for indicator in indicators:
        reading = indicator.read(db)
        if reading.holds:
            return reading
    return None
