"""Every error gatefill raises on purpose, each carrying its data and the exit code the CLI maps it to.

The tree::

    GatefillError                      exit 1 unless a subclass says otherwise
    ├── UsageError                     exit 2: the user asked for something malformed
    │   ├── ConfigError                missing or malformed gatefill.toml, unknown environment, bad override
    │   ├── InputLineError             a malformed line on a JSON Lines stdin (``error: line N: ...``)
    │   ├── RunNotFound                (ledger) no run with that id in the environment(s) searched
    │   └── NothingToRollBack          (rollback) the run changed no data, or a dry run of a rolled-back run
    ├── DatabaseError                  exit 1: a statement failed (message scrubbed of secrets)
    │   ├── DatabaseUnreachable        exit 2: cannot connect (the message never contains the password)
    │   └── SchemaMissing              exit 2: the database lacks tables or columns the pipeline needs
    ├── DataError                      exit 1: stored data that cannot be processed (e.g. unparseable reference data)
    │   └── ScoringInputError          (prism.scoring) an input the original functions would have crashed on
    ├── IllegalTransition              (ledger) exit 1: a run status move the transition table forbids
    ├── RunPaused                      (apply) exit 1, or 130 after Ctrl-C, 143 after SIGTERM: stopped between
    │                                  batches, resumable
    ├── RollbackConflicts              (rollback) exit 1: rows changed since the run wrote them (use --force)
    ├── RollbackVerificationFailed     (rollback) exit 1: verification failed, nothing committed
    ├── FunctionFailure                (prism.platform.service) an HTTP function's error, with its status and code
    ├── ExecutorUnavailable            exit 1: an executor's service did not answer after every retry
    │   └── FunctionsUnavailable       (prism.functions_executor) the PRISM functions server did not answer
    ├── RunLocked                      (ledger) exit 4: the run is active elsewhere
    └── GateBlocked                    exit 4: a gate refuses to let a phase proceed

Subclasses defined next to their phase are marked with their module. Driver exceptions (sqlite3, psycopg,
httpx) are translated into these once, at the boundary that calls the driver, with ``raise ... from exc``; phase
code never catches a driver exception.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ConfigError",
    "DataError",
    "DatabaseError",
    "DatabaseUnreachable",
    "ExecutorUnavailable",
    "GateBlocked",
    "GatefillError",
    "InputLineError",
    "SchemaMissing",
    "UsageError",
]


class GatefillError(Exception):
    """Root of every error gatefill raises deliberately; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1


class UsageError(GatefillError):
    """The user asked for something malformed or impossible; nothing was written."""

    exit_code = 2


class ConfigError(UsageError):
    """The configuration file or an environment override is missing, malformed or names an unknown environment."""


class InputLineError(UsageError):
    """One line of a JSON Lines input stream could not be used."""

    def __init__(self, line_no: int, reason: str) -> None:
        self.line_no = line_no
        self.reason = reason
        super().__init__(f"line {line_no}: {reason}")


class DatabaseError(GatefillError):
    """A statement failed in the database; the message names the target with its password masked."""


class DatabaseUnreachable(DatabaseError):
    """The database could not be reached; ``target`` is the URL with any password masked."""

    exit_code = 2

    def __init__(self, target: str, reason: str) -> None:
        self.target = target
        self.reason = reason
        super().__init__(f"cannot connect to {target}: {reason}")


class SchemaMissing(DatabaseError):
    """The database lacks tables or columns the pipeline needs."""

    exit_code = 2

    def __init__(self, target: str, missing: Sequence[str]) -> None:
        self.target = target
        self.missing = list(missing)
        shown = ", ".join(self.missing[:12]) + (" ..." if len(self.missing) > 12 else "")
        super().__init__(
            f"{target} lacks {len(self.missing)} required table(s)/column(s): {shown} "
            "(run `gatefill db init --env NAME` to create them, or `gatefill db check` to list them)"
        )


class ExecutorUnavailable(GatefillError):
    """The service an executor writes through (e.g. the functions server) did not answer after every retry."""

    reason: str = ""


class DataError(GatefillError):
    """Stored data that cannot be processed as it is."""


class GateBlocked(GatefillError):
    """A gate refuses to let a phase proceed; ``missing`` says what would let it through."""

    exit_code = 4

    def __init__(self, gate: str, missing: Sequence[str]) -> None:
        self.gate = gate
        self.missing = list(missing)
        super().__init__(f"gate '{gate}' blocks this step: " + "; ".join(self.missing))
