"""The job registry: the one place that maps a job's name to its code.

A job is found by name among the built-ins (``prism``), the ``[job.NAME]`` tables of ``gatefill.toml`` (each names
its ``kind``: a built-in kind builds the job from the table's other keys), and installed packages that declare an entry
point in the group ``gatefill.jobs`` (the entry point's name is the job's name; it loads a ``Job`` instance, or a class
or function that returns one when called without arguments). Phases receive the ``Job`` object; they never name a job
package, and only this module imports one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from gatefill.config import Settings
from gatefill.errors import ConfigError, UsageError
from gatefill.job import Job
from gatefill.jobs.sql import KIND as SQL_KIND
from gatefill.jobs.sql import SqlJob
from gatefill.prism.job import PrismJob

__all__ = ["DEFAULT_JOB", "ENTRY_POINT_GROUP", "KINDS", "JobEntry", "available_jobs", "get_job"]

#: The job every phase command runs when ``--job`` is not given (today's commands keep working).
DEFAULT_JOB = "prism"
#: Installed packages register jobs under this entry-point group (``[project.entry-points."gatefill.jobs"]``).
ENTRY_POINT_GROUP = "gatefill.jobs"

#: What every job must have for the phases to run it: the ``Job`` protocol's members, checked when an entry point
#: hands one over (a plugin that lacks one fails here, with its name, not in the middle of a phase).
_REQUIRED = ("name", *sorted(name for name in dir(Job) if not name.startswith("_")))


def _prism_from_table(name: str, table: Mapping[str, Any]) -> Job:
    unknown = set(table) - {"kind", "fc_version", "engine_version"}
    if unknown:
        raise ConfigError(f"job '{name}' (kind prism): unknown key(s) {', '.join(sorted(unknown))}")
    options = {k: str(v) for k, v in table.items() if k != "kind"}
    job = PrismJob(**options)
    job.name = name
    return job


#: Built-in kinds a ``[job.NAME]`` table can name, each building a job from the table.
KINDS: dict[str, Callable[[str, Mapping[str, Any]], Job]] = {"prism": _prism_from_table, SQL_KIND: SqlJob.from_config}


@dataclass(frozen=True)
class JobEntry:
    """One job ``gatefill jobs`` lists: its name, its kind and where it comes from."""

    name: str
    kind: str
    source: str


def _built_ins() -> dict[str, JobEntry]:
    return {DEFAULT_JOB: JobEntry(DEFAULT_JOB, "prism", "built-in")}


def _declared(settings: Settings | None) -> dict[str, JobEntry]:
    if settings is None:
        return {}
    where = str(settings.path) if settings.path else "gatefill.toml"
    found: dict[str, JobEntry] = {}
    for name, table in settings.jobs.items():
        if name in _built_ins():
            raise ConfigError(f"job '{name}' in {where}: the name is the built-in job's; choose another")
        kind = table.get("kind")
        if not isinstance(kind, str) or kind not in KINDS:
            known = ", ".join(sorted(KINDS))
            raise ConfigError(f"job '{name}' in {where}: kind must be one of {known} (got {kind!r})")
        found[name] = JobEntry(name, kind, f"{where} [job.{name}]")
    return found


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_jobs(settings: Settings | None = None) -> list[JobEntry]:
    """Every job that ``--job`` can name, built-ins first, then the config's, then installed packages' by name.
    The config may not reuse a built-in's name (``ConfigError``); an installed entry point whose name is already
    taken is left out (the built-in or the config's job is the one ``--job`` runs)."""
    entries = {**_built_ins()}
    for name, entry in _declared(settings).items():
        entries.setdefault(name, entry)
    for name, ep in sorted(_entry_points().items()):
        entries.setdefault(name, JobEntry(name, "plugin", f"entry point {ep.value} ({ENTRY_POINT_GROUP})"))
    return list(entries.values())


def get_job(name: str | None = None, settings: Settings | None = None) -> Job:
    """The job called ``name`` (default ``prism``); ``UsageError`` listing the known ones when there is none."""
    name = name or DEFAULT_JOB
    declared = _declared(settings)  # every [job.NAME] table's name and kind, each with its one-line error
    if name == DEFAULT_JOB:
        return PrismJob()
    if settings is not None and name in declared:
        table = settings.jobs[name]
        return _checked(KINDS[str(table["kind"])](name, table), f"[job.{name}]")
    ep = _entry_points().get(name)
    if ep is None:
        known = ", ".join(e.name for e in available_jobs(settings))
        raise UsageError(f"unknown job '{name}' (known: {known}; see `gatefill jobs`)")
    return _checked(_load_entry_point(ep), f"entry point {ep.value}")


def _load_entry_point(ep: metadata.EntryPoint) -> object:
    try:
        loaded = ep.load()
    except Exception as exc:  # a plugin's import error must not take the CLI down with a traceback
        raise ConfigError(
            f"job '{ep.name}': entry point {ep.value} failed to load ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(loaded, type) or (callable(loaded) and not hasattr(loaded, "process_batch")):
        loaded = loaded()
    return loaded


def _checked(job: object, where: str) -> Job:
    missing = [attr for attr in _REQUIRED if not hasattr(job, attr)]
    if missing:
        raise ConfigError(f"{where} is not a gatefill job: it lacks {', '.join(missing)}")
    return job  # type: ignore[return-value]  # checked structurally above
