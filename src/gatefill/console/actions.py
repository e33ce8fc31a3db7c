"""The console's one write of its own: pausing a running apply exactly as Ctrl-C in its terminal does (SIGINT to the
process that holds the run's lease, which then stops after its current batch and records the run as paused).

Only a process on this host can be signalled; for any other the page shows the lease holder and what to do there.
Resuming has no signal: it is a new ``gatefill apply RUN`` invocation, whose command line the page shows.
"""

from __future__ import annotations

import os
import signal
import socket

from gatefill import ledger
from gatefill.config import Settings
from gatefill.errors import UsageError
from gatefill.runs import run_progress

__all__ = ["pause_run", "resume_command"]


def pause_run(settings: Settings, env: str, run_id: str) -> str:
    """Sends SIGINT to the live apply holding ``run_id``'s lease on this host; returns what was done, in one line."""
    progress = run_progress(settings, run_id, env)
    run, lease = progress.run, progress.lease
    if run.phase != ledger.APPLY_PHASE or run.status is not ledger.RunStatus.RUNNING:
        raise UsageError(f"run {run_id} is a {run.status.value} {run.phase} run: only a running apply can be paused")
    if lease is None or lease.expired or lease.holder.command != "apply":
        raise UsageError(f"no live apply holds run {run_id} (its lease: {lease.describe() if lease else 'free'})")
    holder = lease.holder
    if holder.host != socket.gethostname():
        raise UsageError(f"run {run_id} is applied on {holder.host} (pid {holder.pid}): press Ctrl-C there")
    try:
        os.kill(holder.pid, signal.SIGINT)
    except ProcessLookupError:
        raise UsageError(f"pid {holder.pid}, which holds run {run_id}, is not running any more") from None
    except PermissionError:
        raise UsageError(f"not allowed to signal pid {holder.pid}: press Ctrl-C in its terminal") from None
    return f"sent Ctrl-C (SIGINT) to apply pid {holder.pid}: it pauses after its current batch"


def resume_command(env: str, run_id: str) -> str:
    """The command that resumes a paused apply from its first unfinished batch."""
    return f"gatefill apply {run_id} --env {env}"
