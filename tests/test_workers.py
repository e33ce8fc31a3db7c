"""``apply --workers N`` and ``gatefill worker`` on procrastinate, on the Postgres server (and through PgBouncer):
a worker killed with kill -9 mid-batch loses nothing and writes nothing twice; the rate is global across workers; a
worker joins from outside; SQLite refuses more than one worker.

The sql job (``tests/sql_posts.py``) is the job: a batch can be made to block deterministically by holding one of its
rows locked in another connection.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ensure_run_for_plan
from gatefill.config import Environment
from gatefill.db import Database
from gatefill.lease import RunLease
from gatefill.plan import PlanParams, build_plan
from gatefill.queue import BatchArgs, ensure_queue_schema
from gatefill.workers import COMMITTED, run_batch
from gatefill.worklist import open_work
from tests.conftest import create_pg_database, drop_pg_database, pg_env, pooled_env, sqlite_env, table_digests
from tests.sql_posts import FILL_SLUG, fill_slug, make_posts

pytestmark = pytest.mark.postgres

SINCE = datetime(2025, 8, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 8, 0, tzinfo=UTC)


@pytest.fixture
def pg_db() -> Iterator[tuple[Environment, Database]]:
    name = create_pg_database()
    env = pg_env(name)
    db = Database(env)
    try:
        yield env, db
    finally:
        db.dispose()
        drop_pg_database(name)


def _config(tmp_path: Path, env: Environment) -> Path:
    """gatefill.toml with the environment and the README's sql job."""
    table = "\n".join(f"{k} = {_toml(v)}" for k, v in FILL_SLUG.items())
    pooler = f'pooler = "{env.pooler}"\n' if env.pooler != "none" else ""
    config = tmp_path / "gatefill.toml"
    config.write_text(
        f'artifacts_dir = "artifacts"\n[env.test]\ndatabase_url = "{env.database_url}"\n{pooler}'
        f"[job.fill_slug]\n{table}\n",
        encoding="utf-8",
    )
    return config


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f'{k} = "{v}"' for k, v in value.items()) + " }"
    return f'"{value}"'


def _plan(db: Database, env: Environment, tmp_path: Path, *, rate: str, batch_size: int) -> str:
    params = PlanParams(since=SINCE, rate=rate, batch_size=batch_size)
    return build_plan(db, env, fill_slug(), params, now=START, artifacts_dir=tmp_path / "artifacts").plan.run_id


def _gatefill(config: Path, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gatefill", "--config", str(config), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
    )


class _Lines:
    """A process's stdout lines, read on a thread so that the test can wait for one."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError):  # closed by _stop
            for line in self.proc.stdout:
                self.seen.append(line.rstrip("\n"))
                self._new.put(line)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.seen):
            assert time.monotonic() < deadline, f"never printed {text!r}: {self.seen}"
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=0.1)


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (a graceful stop), then its pipes closed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _state(db: Database, run_id: str) -> tuple[dict[int, str | None], list[tuple[str, str]], list[tuple[str, ...]]]:
    """The data (every post's slug), the run's session results and its recorded changes, comparable across runs."""
    with db.connect() as conn:
        slugs = {i: s for i, s in conn.execute(sa.text("SELECT id, slug FROM posts ORDER BY id"))}
        sr = ledger.session_results
        results = [
            (r.session_id, r.result)
            for r in conn.execute(sa.select(sr).where(sr.c.run_id == run_id).order_by(sr.c.session_id))
        ]
        changes = sorted(
            (c.table, c.row_key, str(c.before), str(c.after_digest)) for c in ledger.changes_for(conn, run_id)
        )
    return slugs, results, changes


def _status(db: Database, run_id: str) -> ledger.RunStatus:
    with db.connect() as conn:
        return ledger.get_run(conn, run_id, with_plan=False).status


def _waiting_worker(db: Database, timeout: float = 30) -> tuple[int, int]:
    """The worker process (and its batch) whose transaction waits on a row lock, from pg_stat_activity."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.connect() as conn:
            name = conn.execute(
                sa.text(
                    "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND application_name LIKE 'gatefill worker %'"
                )
            ).scalar()
        if name:
            _, _, pid, _, batch_no = name.split()
            return int(pid), int(batch_no)
        time.sleep(0.1)
    raise AssertionError("no worker ever waited on the locked row")


def test_a_worker_killed_mid_batch_loses_nothing_and_writes_nothing_twice(
    pg_db: tuple[Environment, Database], tmp_path: Path
) -> None:
    env, db = pg_db
    make_posts(db, 120)  # 96 to fill (every 5th has a slug), 12 batches of 8
    db.dispose()  # a template must have no connection
    ref_name = create_pg_database(template=env.url.database)  # the same database, for an uninterrupted run
    ref_env = pg_env(ref_name)
    try:
        run_id = _plan(db, env, tmp_path, rate="unlimited", batch_size=8)
        config = _config(tmp_path, env)
        admin = psycopg.connect(env.url.set(drivername="postgresql").render_as_string(hide_password=False))
        admin.execute("SELECT 1 FROM posts WHERE id = 41 FOR UPDATE")  # a row of a middle batch: its worker blocks
        apply = _gatefill(config, "apply", run_id, "--workers", "2", "--approve-as", "tess")
        try:
            pid, _ = _waiting_worker(db)
            os.kill(pid, signal.SIGKILL)
            admin.rollback()  # the lock goes; the batch's retry (after the stall timeout) commits it
            out, err = apply.communicate(timeout=90)
        finally:
            _stop(apply)
            admin.close()
        assert apply.returncode == 0, (out, err)
        assert "backfill gate: PASS" in out

        # The same plan applied without workers, uninterrupted, on a copy of the same database.
        (tmp_path / "ref").mkdir()
        ref_config = _config(tmp_path / "ref", ref_env)
        with Database(ref_env) as ref:
            ref_run = _plan(ref, ref_env, tmp_path / "ref", rate="unlimited", batch_size=8)
            ref_apply = _gatefill(ref_config, "apply", ref_run, "--approve-as", "tess")
            ref_out, ref_err = ref_apply.communicate(timeout=60)
            assert ref_apply.returncode == 0, (ref_out, ref_err)
            expected = _state(ref, ref_run)
        got = _state(db, run_id)
        assert got[0] == expected[0] and all(s is not None for s in got[0].values())
        assert got[1] == expected[1] and len(got[1]) == 96  # one result per session: none twice, none lost
        assert [c[1:] for c in got[2]] == [c[1:] for c in expected[2]] and len(got[2]) == 96
        with db.connect() as conn:
            batches = ledger.committed_batches(conn, run_id)
        assert batches == set(range(1, 13))
        assert _status(db, run_id) is ledger.RunStatus.SUCCEEDED
    finally:
        drop_pg_database(ref_name)


def _local_workers_of(pid: int) -> list[int]:
    """Live processes started as local workers of apply ``pid`` (their command line names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"--until-pid" in argv and argv[argv.index(b"--until-pid") + 1] == str(pid).encode():
                    found.append(int(entry.name))
    return found


def test_sigterm_stops_the_workers_and_pauses_the_run_which_resumes(
    pg_db: tuple[Environment, Database], tmp_path: Path
) -> None:
    env, db = pg_db
    make_posts(db, 250)
    run_id = _plan(db, env, tmp_path, rate="20/s", batch_size=10)  # 200 sessions: 20 batches, 10 s
    config = _config(tmp_path, env)
    apply = _gatefill(config, "apply", run_id, "--workers", "2", "--approve-as", "tess")
    try:
        deadline = time.monotonic() + 60
        while True:
            with db.connect() as conn:
                if ledger.committed_batches(conn, run_id):
                    break
            assert apply.poll() is None and time.monotonic() < deadline, apply.communicate()
            time.sleep(0.1)
        apply.send_signal(signal.SIGTERM)
        out, err = apply.communicate(timeout=60)
    finally:
        _stop(apply)
    assert apply.returncode == 143, (out, err)
    assert "paused: interrupted (SIGTERM)" in err
    assert _status(db, run_id) is ledger.RunStatus.PAUSED
    assert not _local_workers_of(apply.pid)
    with db.connect() as conn:
        left = ledger.committed_batches(conn, run_id)
        queued = conn.execute(
            sa.text("SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')")
        ).scalar_one()
    assert 0 < len(left) < 20 and queued == 0

    resume = _gatefill(config, "apply", run_id, "--workers", "2", "--rate", "unlimited")
    out, err = resume.communicate(timeout=90)
    assert resume.returncode == 0, (out, err)
    slugs, results, changes = _state(db, run_id)
    assert len(results) == 200 and len(changes) == 200 and all(r == "written" for _, r in results)
    assert sum(1 for s in slugs.values() if s is None) == 0
    assert _status(db, run_id) is ledger.RunStatus.SUCCEEDED


def test_a_stop_indicator_holds_the_batches_already_queued_for_the_workers(
    pg_db: tuple[Environment, Database], tmp_path: Path
) -> None:
    env, db = pg_db
    make_posts(db, 50)
    # 40 sessions, 8 batches of 5 at 4/s: 1.25 s of tokens each. Without the Stop reaching them, the batches queued
    # ahead (about 2 per worker) would go on committing for about 5 s after the apply read the flag.
    run_id = _plan(db, env, tmp_path, rate="4/s", batch_size=5)
    config, flag = _config(tmp_path, env), tmp_path / "hold.flag"
    apply = _gatefill(config, "apply", run_id, "--workers", "2", "--approve-as", "tess", "--no-health",
                      "--throttle-file", str(flag), "--throttle-interval", "0.2", "--cool-down", "1")  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not _committed(db, run_id):
            assert apply.poll() is None and time.monotonic() < deadline, apply.communicate()
            time.sleep(0.05)
        flag.touch()
        while not _open_holds(db, run_id):  # the apply has read the flag: a Stop, published to the workers
            assert apply.poll() is None and time.monotonic() < deadline, apply.communicate()
            time.sleep(0.05)
        time.sleep(2.8)  # a batch that reserved its tokens before the Stop (one per worker) commits within 2.5 s
        held_at = _committed(db, run_id)
        time.sleep(3.0)
        assert _committed(db, run_id) == held_at, "a queued batch started while the Stop held"
        assert len(held_at) < 8
        flag.unlink()
        out, err = apply.communicate(timeout=90)
    finally:
        _stop(apply)
    assert apply.returncode == 0, (out, err)
    slugs, results, changes = _state(db, run_id)
    assert sum(1 for s in slugs.values() if s is None) == 0
    assert len(results) == 40 and len(changes) == 40 and all(r == "written" for _, r in results)
    with db.connect() as conn:
        stops = [h for h in ledger.holds_for(conn, run_id) if h.indicator == "file"]
    assert len(stops) == 1 and stops[0].ended_by == "clear"


def _committed(db: Database, run_id: str) -> set[int]:
    with db.connect() as conn:
        return ledger.committed_batches(conn, run_id)


def _open_holds(db: Database, run_id: str) -> list[ledger.Hold]:
    with db.connect() as conn:
        return [h for h in ledger.holds_for(conn, run_id) if h.ended_at is None]


class _SharedClock:
    """A simulated clock shared by worker threads: a sleeping thread wakes when every thread still working is asleep
    and its wake-up comes first; the clock jumps to it. Database work takes no simulated time."""

    def __init__(self, start: datetime, threads: int) -> None:
        self._start, self._now, self._active = start, 0.0, threads
        self._sleepers: dict[int, float] = {}
        self._cond = threading.Condition()

    def now(self) -> datetime:
        with self._cond:
            return self._start + timedelta(seconds=self._now)

    def monotonic(self) -> float:
        with self._cond:
            return self._now

    def sleep(self, seconds: float) -> None:
        me = threading.get_ident()
        with self._cond:
            self._sleepers[me] = self._now + max(0.0, seconds)
            self._cond.notify_all()
            while self._sleepers[me] > self._now:
                first = min(self._sleepers.values())
                if len(self._sleepers) >= self._active and first > self._now:  # all asleep, none due yet: jump
                    self._now = first
                    self._cond.notify_all()
                else:  # someone works, or a due sleeper has yet to wake
                    self._cond.wait(timeout=10)
            del self._sleepers[me]
            self._cond.notify_all()

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()


def test_two_workers_keep_the_global_rate(pg_db: tuple[Environment, Database], tmp_path: Path) -> None:
    env, db = pg_db
    make_posts(db, 250)  # 200 to fill
    job = fill_slug()
    params = PlanParams(since=SINCE, rate="50/s", batch_size=10)
    plan = build_plan(db, env, job, params, now=START, artifacts_dir=tmp_path / "artifacts").plan
    run = ensure_run_for_plan(db, plan, now=START)
    ensure_queue_schema(db)
    clock = _SharedClock(START, threads=2)
    tasks: queue.Queue[BatchArgs] = queue.Queue()
    done: dict[str, list[int]] = {"a": [], "b": []}
    with RunLease(db, run.id, "apply") as lease:
        with db.begin() as conn:
            ledger.publish_pace(conn, run.id, rate_per_second=50.0, level="normal", reason="test", at=START)
        todo = open_work(db, run, plan)
        while (task := todo.take(10)) is not None:
            tasks.put(BatchArgs(task, lease.holder.id))

        def worker(name: str) -> None:
            try:
                while True:
                    try:
                        args = tasks.get_nowait()
                    except queue.Empty:
                        return
                    assert run_batch(db, job, args, clock) == COMMITTED
                    done[name].append(args.task.batch_no)
            finally:
                clock.leave()

        threads = [threading.Thread(target=worker, args=(n,)) for n in done]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    with db.connect() as conn:
        rows = conn.execute(sa.select(ledger.batches).where(ledger.batches.c.run_id == run.id)).all()
    assert len(rows) == 20 and sum(r.sessions for r in rows) == 200
    elapsed = (max(r.finished_at for r in rows) - START).total_seconds()
    rate = 200 / elapsed
    assert abs(rate - 50.0) <= 0.02 * 50.0, f"{rate:.2f}/s over {elapsed:.3f} s"
    assert len(done["a"]) >= 5 and len(done["b"]) >= 5, done  # both worked, sharing one bucket
    # No window of the run went faster: the n-th batch committed no earlier than n batches' worth of tokens.
    for n, finished in enumerate(sorted(r.finished_at for r in rows), start=1):
        assert (finished - START).total_seconds() >= n * 10 / 50.0 - 1e-6


def test_a_worker_from_outside_joins_an_apply(pg_db: tuple[Environment, Database], tmp_path: Path) -> None:
    env, db = pg_db
    make_posts(db, 250)
    run_id = _plan(db, env, tmp_path, rate="unlimited", batch_size=8)  # 200 sessions, 25 batches
    config = _config(tmp_path, env)
    outside = _gatefill(config, "worker", "--env", "test")
    lines = _Lines(outside)
    admin = psycopg.connect(env.url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        lines.wait_for("serving gatefill batches in test")
        # The first worker to take batch 1 waits on its first row until the other worker has committed a batch:
        # whatever the load, both commit some.
        admin.execute("SELECT 1 FROM posts WHERE id = 1 FOR UPDATE")
        apply = _gatefill(config, "apply", run_id, "--workers", "1", "--approve-as", "tess")
        _waiting_worker(db, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            with db.connect() as conn:
                if ledger.committed_batches(conn, run_id):
                    break
            assert apply.poll() is None and time.monotonic() < deadline, apply.communicate()
            time.sleep(0.1)
        admin.rollback()
        out, err = apply.communicate(timeout=90)
        assert apply.returncode == 0, (out, err)
        outside.send_signal(signal.SIGTERM)
        assert outside.wait(timeout=30) == 0
        lines.thread.join(timeout=10)  # every line read, to the end
    finally:
        admin.close()
        _stop(outside)
    assert any("stopped" in line for line in lines.seen[-2:]), lines.seen
    said = [line.split() for line in lines.seen if line.startswith("run ")]
    theirs = {int(words[3].rstrip(":")) for words in said if words[4] == "committed"}
    with db.connect() as conn:
        committed = ledger.committed_batches(conn, run_id)
    assert committed == set(range(1, 26))
    assert theirs and theirs < committed, f"outside: {sorted(theirs)}"  # both workers committed some batches
    assert _status(db, run_id) is ledger.RunStatus.SUCCEEDED


@pytest.mark.pooled
def test_two_workers_through_a_transaction_pooler(tmp_path: Path) -> None:
    name = create_pg_database()
    try:
        env = pooled_env(name)
        with Database(env) as db:
            make_posts(db, 100)
            run_id = _plan(db, env, tmp_path, rate="unlimited", batch_size=10)
            config = _config(tmp_path, env)
            apply = _gatefill(config, "apply", run_id, "--workers", "2", "--approve-as", "tess")
            out, err = apply.communicate(timeout=90)
            assert apply.returncode == 0, (out, err)
            assert "backfill gate: PASS" in out
            with db.connect() as conn:
                assert ledger.committed_batches(conn, run_id) == set(range(1, 9))
                assert conn.execute(sa.text("SELECT count(*) FROM posts WHERE slug IS NULL")).scalar_one() == 0
    finally:
        drop_pg_database(name)


def test_sqlite_refuses_more_than_one_worker_and_writes_nothing_and_runs_one_in_process(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path / "staging.db")
    with Database(env, create=True) as db:
        make_posts(db, 20)
        run_id = _plan(db, env, tmp_path, rate="unlimited", batch_size=5)
        before = table_digests(db)
    config = _config(tmp_path, env)
    proc = _gatefill(config, "apply", run_id, "--workers", "2", "--approve-as", "tess")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert err.strip().count("\n") == 0 and "SQLite is single-process" in err
    with Database(env) as db:
        assert table_digests(db) == before

    one = _gatefill(config, "apply", run_id, "--workers", "1", "--approve-as", "tess")  # the in-process apply
    out, err = one.communicate(timeout=60)
    assert one.returncode == 0, (out, err)
    with Database(env) as db:
        assert _status(db, run_id) is ledger.RunStatus.SUCCEEDED
        assert len(_state(db, run_id)[1]) == 16


def test_the_queue_schema_is_applied_once_whatever_the_number_of_calls(pg_db: tuple[Environment, Database]) -> None:
    _, db = pg_db
    ensure_queue_schema(db)
    ensure_queue_schema(db)
    with db.connect() as conn:
        tables = conn.execute(
            sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename = 'procrastinate_jobs'")
        ).scalar_one()
    assert tables == 1
