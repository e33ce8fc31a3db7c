"""Holding a run's lease for the length of a command: take it, renew it on a heartbeat thread, fence each write with
it, release it on every way out.

A session-level advisory lock holds only while its connection's session is ours; behind a transaction-mode pooler
(Supavisor on port 6543, PgBouncer ``pool_mode = transaction``) the session is shared, so the lock protected nothing
and could stay on a pooled server connection after both processes had gone. The lease is a ledger row instead,
written in short transactions of its own (``ledger.take_lease`` and friends), which works the same on SQLite, on a
direct connection and through any pooler, and leaves no lock on any backend.

A holder renews the lease every third of its time to live. One that stops renewing (kill -9, a frozen host, a lost
network) keeps it until it expires by the database's clock; then the next command takes it over, and until then
``gatefill status`` shows the stale holder. Because a holder can be paused past its expiry and wake up after a
takeover, each batch's transaction also fences with the lease (``fence``): the commit happens only if this holder
still holds it, and nobody can take it over between that proof and the commit.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from types import TracebackType

from sqlalchemy.engine import Connection

from gatefill import ledger
from gatefill.db import Database
from gatefill.errors import DatabaseError

__all__ = ["RunLease", "describe_lease", "lease_name"]


def lease_name(run_id: str) -> str:
    """The one lease of a run: apply, rollback and soak of the same run exclude each other."""
    return f"run:{run_id}"


def describe_lease(lease: ledger.Lease | None, run_status: str) -> str:
    """One line for ``gatefill status``: who holds the run's lease, or that a stale holder is waiting to expire."""
    if lease is None:
        if run_status == "running":
            return "no process holds it: the run was interrupted; `gatefill apply RUN` resumes it"
        return "free"
    gone = lease.holder.host == socket.gethostname() and not _pid_alive(lease.holder.pid)
    hint = f"; pid {lease.holder.pid} is not running on this host" if gone else ""
    if not lease.expired:
        then = "; once it expires the next command on this run takes it over" if gone else ""
        return f"held: {lease.describe()}{hint}{then}"
    return f"STALE: {lease.describe()}{hint}; the next command on this run takes it over"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLease:
    """The lease of one run held by this process for one command (a context manager)."""

    def __init__(self, db: Database, run_id: str, command: str, *, ttl: float | None = None) -> None:
        self.db = db
        self.name = lease_name(run_id)
        self.ttl = ttl if ttl is not None else db.env.lease_ttl
        self.holder = ledger.LeaseHolder.this_process(command)
        #: The expired lease this one replaced (a holder that died), for the run's event log; None if it was free.
        self.replaced: ledger.Lease | None = None
        #: Set when the heartbeat found the lease taken over, or could not renew it before it expired.
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLease:
        with self.db.begin() as conn:
            _, self.replaced = ledger.take_lease(conn, self.name, self.holder, self.ttl)
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with self.db.begin() as conn:
                ledger.release_lease(conn, self.name, self.holder)
        except DatabaseError:
            # The database went away: the lease expires by itself, and the command's own outcome (already
            # committed, or the error it is leaving with) is what the user needs to see, not this.
            pass

    def check(self) -> None:
        """Raises ``LeaseLost`` if the lease is no longer ours: call before starting a unit of work.

        After a heartbeat found it gone (or could not renew it in time) this asks the database again: a lease that
        expired while the database was away but that nobody took over is renewed and kept."""
        if not self.lost.is_set():
            return
        with self.db.begin() as conn:
            ledger.fence_lease(conn, self.name, self.holder, self.ttl)
        self.lost.clear()

    def fence(self, conn: Connection) -> None:
        """In a writing transaction: proves the lease is still ours and holds it until that transaction ends."""
        ledger.fence_lease(conn, self.name, self.holder, self.ttl)

    def _heartbeat(self) -> None:
        interval = self.ttl / 3
        last_renewed = time.monotonic()
        while not self._stop.wait(interval):
            try:
                with self.db.begin() as conn:
                    held = ledger.renew_lease(conn, self.name, self.holder, self.ttl)
            except DatabaseError:
                # Unreachable or busy: try again next beat, unless the lease may have expired meanwhile.
                if time.monotonic() - last_renewed >= self.ttl:
                    self.lost.set()
                continue
            if not held:
                self.lost.set()
                return
            last_renewed = time.monotonic()
