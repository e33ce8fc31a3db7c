"""The run lease on SQLite, on Postgres and through PgBouncer in transaction mode: refused while held, taken over
once expired, fenced in writing transactions, renewed by its heartbeat, released on the way out."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.lease import RunLease, lease_name
from gatefill.ledger import LeaseHolder, LeaseLost, RunLocked
from tests.conftest import Target

pytestmark = pytest.mark.pooled


def other(command: str = "apply") -> LeaseHolder:
    return LeaseHolder("f" * 32, "otherhost", 4242, command)


def take(target: Target, holder: LeaseHolder, ttl: float = 60.0) -> tuple[ledger.Lease, ledger.Lease | None]:
    with target.db.begin() as conn:
        return ledger.take_lease(conn, "run:r1", holder, ttl)


def test_a_held_lease_refuses_a_second_holder_naming_the_first(target: Target) -> None:
    ledger.init_ledger(target.db)
    take(target, other())
    me = LeaseHolder.this_process("rollback")
    with pytest.raises(RunLocked) as refused:
        take(target, me)
    assert refused.value.exit_code == 4
    assert "apply by otherhost:4242 (holder ffffffff)" in str(refused.value)
    assert "expires in 60 s" in str(refused.value) or "expires in 59 s" in str(refused.value)
    with target.db.connect() as conn:
        held = ledger.get_lease(conn, "run:r1")
    assert held is not None and held.holder == other() and not held.expired


def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_out(target: Target) -> None:
    ledger.init_ledger(target.db)
    take(target, other(), ttl=0.001)
    time.sleep(0.05)
    me = LeaseHolder.this_process("apply")
    lease, replaced = take(target, me)
    assert lease.holder == me and replaced is not None and replaced.holder == other() and replaced.expired
    assert "expired" in replaced.describe()
    # The old holder wakes up: its renewal fails and its next writing transaction is refused.
    with target.db.begin() as conn:
        assert not ledger.renew_lease(conn, "run:r1", other(), 60.0)
    with pytest.raises(LeaseLost, match=r"now: apply by .*:\d+"), target.db.begin() as conn:
        ledger.fence_lease(conn, "run:r1", other(), 60.0)
    # Releasing what it no longer holds deletes nothing.
    with target.db.begin() as conn:
        ledger.release_lease(conn, "run:r1", other())
        assert ledger.get_lease(conn, "run:r1") is not None


def test_the_same_holder_may_take_its_lease_again(target: Target) -> None:
    ledger.init_ledger(target.db)
    me = LeaseHolder.this_process("apply")
    take(target, me)
    lease, replaced = take(target, me)
    assert lease.holder == me and replaced is None


def test_run_lease_heartbeat_renews_and_release_leaves_nothing(target: Target) -> None:
    ledger.init_ledger(target.db)
    with RunLease(target.db, "r2", "apply", ttl=1.0) as lease:
        with target.db.connect() as conn:
            first = ledger.get_lease(conn, lease_name("r2"))
        time.sleep(1.5)  # longer than the lease: only the heartbeat keeps it
        with target.db.connect() as conn:
            later = ledger.get_lease(conn, lease_name("r2"))
        assert first is not None and later is not None
        assert later.heartbeat_at > first.heartbeat_at and not later.expired
        lease.check()
        with target.db.begin() as conn:
            lease.fence(conn)
    with target.db.connect() as conn:
        assert ledger.get_lease(conn, lease_name("r2")) is None
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger.leases)).scalar_one() == 0


def test_a_lease_taken_over_meanwhile_stops_its_old_holder(target: Target) -> None:
    ledger.init_ledger(target.db)
    with RunLease(target.db, "r3", "apply", ttl=1.0) as lease:
        # Someone takes it over (as after an expiry the heartbeat missed): the heartbeat notices, check() refuses.
        with target.db.begin() as conn:
            conn.execute(ledger.leases.update().values(holder_id="x" * 32, host="elsewhere", pid=1))
        deadline = time.monotonic() + 5
        while not lease.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease.lost.is_set()
        with pytest.raises(LeaseLost, match="elsewhere:1"):
            lease.check()
    with target.db.connect() as conn:
        kept = ledger.get_lease(conn, lease_name("r3"))
    assert kept is not None and kept.holder.host == "elsewhere"  # not released by the process that lost it


def test_two_processes_racing_for_a_free_lease_get_exactly_one(target: Target) -> None:
    ledger.init_ledger(target.db)
    results: list[str] = []
    start = threading.Barrier(4)

    def contend(i: int) -> None:
        holder = LeaseHolder(f"{i:032d}", "host", i, "apply")
        start.wait()
        try:
            take(target, holder)
            results.append("took")
        except RunLocked:
            results.append("refused")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused", "refused", "refused", "took"]
