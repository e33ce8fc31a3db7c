"""The libpq-level pipeline behind the Postgres scoring path (``service_pg.PgConnection``), on a real server.

A batch must store and read exactly what psycopg's cursors store and read, name the statement that failed, never
believe a statement prepared when its PREPARE was skipped, leave a usable connection after a failure, and report a
connection the server dropped as disconnected. Last, the service itself: a parked connection the server killed
between calls is replaced without the caller seeing an error.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg.types.json import Jsonb

from gatefill.clock import RealClock
from gatefill.errors import DatabaseError
from gatefill.prism import scoring
from gatefill.prism.platform.service import CallContext, Faults, PrismService, _ReferenceCache
from gatefill.prism.platform.service_pg import ParkedConnections, PgConnection, PgStatement, PipelineStepFailed
from gatefill.prism.sandbox.simulator import Respondent, new_respondent, write_answers, write_session
from gatefill.prism.schema import PROFILE_RESULT_COLUMNS, assessment_responses, profiles
from tests.conftest import Target, _conninfo, _with_database, server_url

_TABLE = """
CREATE TABLE kinds (
    id integer PRIMARY KEY, t text, b bigint, n numeric, at timestamptz, doc jsonb, u uuid, flag boolean, missing text
)
"""
_INSERT = PgStatement.from_pyformat(
    "INSERT INTO kinds (id, t, b, n, at, doc, u, flag, missing) "
    "VALUES (%(id)s, %(t)s, %(b)s, %(n)s, %(at)s, %(doc)s, %(u)s, %(flag)s, %(missing)s)"
)
_INSERT_SQL = (
    "INSERT INTO kinds (id, t, b, n, at, doc, u, flag, missing) "
    "VALUES (%(id)s, %(t)s, %(b)s, %(n)s, %(at)s, %(doc)s, %(u)s, %(flag)s, %(missing)s)"
)
_BEGIN = PgStatement(b"BEGIN", ())
_COMMIT = PgStatement(b"COMMIT", ())


def _values(i: int, row_id: int | None = None) -> dict[str, Any]:
    return {
        "id": i if row_id is None else row_id,
        "t": f"text 'quoted' % {i} é",
        "b": 2**40 + i,
        "n": Decimal("12.345") * i,
        "at": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        "doc": Jsonb({"k": [i, 1.5, None, "x"]}),
        "u": uuid.UUID(int=i),
        "flag": i % 2 == 0,
        "missing": None,
    }


@pytest.fixture
def raw(empty_pg: str) -> Iterator[psycopg.Connection[Any]]:
    conninfo = _conninfo(_with_database(server_url(), empty_pg))
    with psycopg.connect(conninfo, autocommit=True) as setup:
        setup.execute(_TABLE)
    with psycopg.connect(conninfo) as conn:
        yield conn


def _ours(conn: psycopg.Connection[Any]) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'gf\\_%' ORDER BY name")
        names = [r[0] for r in cur.fetchall()]
    conn.rollback()
    return names


def test_a_batch_stores_and_reads_what_psycopg_cursors_do(raw: psycopg.Connection[Any]) -> None:
    pg = PgConnection(raw)
    pg.run([(_BEGIN, ()), *[(_INSERT, _INSERT.values(_values(i))) for i in (1, 2)], (_COMMIT, ())])
    with raw.cursor() as cur:
        for i in (1, 2):
            cur.execute(_INSERT_SQL, _values(i, row_id=100 + i))
    raw.commit()
    select = PgStatement.from_pyformat("SELECT t, b, n, at, doc, u, flag, missing FROM kinds WHERE id = %(id)s")
    for ours, theirs in ((1, 101), (2, 102)):
        (result,) = pg.run([(select, select.values({"id": ours}))])
        with raw.cursor() as cur:
            cur.execute("SELECT t, b, n, at, doc, u, flag, missing FROM kinds WHERE id = %s", (theirs,))
            expected = cur.fetchone()
        assert pg.row(result) == expected
        assert expected is not None and expected[0] == f"text 'quoted' % {ours} é"
    raw.rollback()
    (empty,) = pg.run([(select, select.values({"id": 999}))])
    assert pg.row(empty) is None
    raw.rollback()


def test_placeholders_are_numbered_once_per_name_and_double_percent_is_a_literal() -> None:
    statement = PgStatement.from_pyformat("SELECT %(a)s, 'x%%y', %(b)s, %(a)s")
    assert statement.sql == b"SELECT $1, 'x%y', $2, $1"
    assert statement.names == ("a", "b")
    assert statement.values({"b": 2, "a": 1, "c": 3}) == [1, 2]


def test_a_failed_statement_is_named_and_later_ones_are_skipped(raw: psycopg.Connection[Any]) -> None:
    pg = PgConnection(raw)
    batch = [
        (_BEGIN, ()),
        (_INSERT, _INSERT.values(_values(1))),
        (_INSERT, _INSERT.values(_values(1))),  # duplicate key
        (_INSERT, _INSERT.values(_values(3))),
        (_COMMIT, ()),
    ]
    with pytest.raises(PipelineStepFailed) as failed:
        pg.run(batch)
    assert failed.value.index == 2
    assert isinstance(failed.value.cause, psycopg.errors.UniqueViolation)
    assert not failed.value.disconnected
    raw.rollback()
    with raw.cursor() as cur:
        cur.execute("SELECT count(*) FROM kinds")
        assert cur.fetchone() == (0,)
    raw.rollback()
    # The connection is usable again, with the statement it prepared.
    pg.run([(_BEGIN, ()), (_INSERT, _INSERT.values(_values(4))), (_COMMIT, ())])
    with raw.cursor() as cur:
        cur.execute("SELECT id FROM kinds")
        assert cur.fetchall() == [(4,)]
    raw.rollback()


def test_a_prepare_skipped_after_a_failure_is_prepared_again_next_time(raw: psycopg.Connection[Any]) -> None:
    pg = PgConnection(raw)
    boom = PgStatement.from_pyformat("SELECT 1 / %(zero)s")
    later = PgStatement.from_pyformat("SELECT %(x)s::text || 'later'")
    with pytest.raises(PipelineStepFailed) as failed:
        pg.run([(_BEGIN, ()), (boom, [0]), (later, ["a"])])
    assert failed.value.index == 1
    assert isinstance(failed.value.cause, psycopg.errors.DivisionByZero)
    raw.rollback()
    # If ``later`` were remembered as prepared, this would fail with "prepared statement does not exist".
    (result,) = pg.run([(later, ["b"])])
    assert pg.row(result) == ("blater",)
    raw.rollback()


def test_statements_are_prepared_once_per_parameter_types(raw: psycopg.Connection[Any]) -> None:
    pg = PgConnection(raw)
    statement = PgStatement.from_pyformat("SELECT %(x)s::text")
    for i in range(10):
        (result,) = pg.run([(statement, [f"v{i}"])])
        assert pg.row(result) == (f"v{i}",)
    raw.rollback()
    assert len(_ours(raw)) == 1


def test_rollback_keeps_the_prepared_statements(raw: psycopg.Connection[Any]) -> None:
    # psycopg's own rollback() deallocates every prepared statement of the connection; ours must survive it.
    pg = PgConnection(raw)
    pg.run([(_BEGIN, ()), (_INSERT, _INSERT.values(_values(1)))])
    pg.rollback()
    (result,) = pg.run([(PgStatement(b"SELECT count(*) FROM kinds", ()), ())])
    assert pg.row(result) == (0,)
    pg.run([(_BEGIN, ()), (_INSERT, _INSERT.values(_values(2))), (_COMMIT, ())])
    assert len(_ours(raw)) == 1


def test_a_parked_connection_rolled_back_keeps_its_prepared_statements(pg_target: Target) -> None:
    parked = ParkedConnections(pg_target.db.engine)
    statement = PgStatement.from_pyformat("SELECT %(x)s::text")
    try:
        with parked.transaction() as (conn, _):
            # A statement psycopg prepared itself: its rollback() would now send DEALLOCATE ALL.
            conn.raw.execute("SELECT 1", prepare=True)
            conn.raw.commit()
            conn.run([(_BEGIN, ()), (statement, ["a"])])  # left open: rolled back when the transaction ends
        with parked.transaction() as (again, reused):
            assert reused and again is conn
            (result,) = again.run([(statement, ["b"])])
            assert again.row(result) == ("b",)
            again.rollback()
    finally:
        parked.dispose()


def test_statements_deallocated_behind_its_back_are_prepared_again(raw: psycopg.Connection[Any]) -> None:
    pg = PgConnection(raw)
    statement = PgStatement.from_pyformat("SELECT %(x)s::text")
    pg.run([(statement, ["a"])])
    pg.run([(PgStatement(b"DEALLOCATE ALL", ()), ())])
    with pytest.raises(PipelineStepFailed) as failed:
        pg.run([(statement, ["b"])])
    assert isinstance(failed.value.cause, psycopg.errors.InvalidSqlStatementName)
    (result,) = pg.run([(statement, ["c"])])
    assert pg.row(result) == ("c",)


def test_a_connection_without_prepared_statements_sends_unnamed_ones(empty_pg: str) -> None:
    conninfo = _conninfo(_with_database(server_url(), empty_pg))
    with psycopg.connect(conninfo, prepare_threshold=None) as raw:
        pg = PgConnection(raw)
        statement = PgStatement.from_pyformat("SELECT %(x)s::int + 1")
        for i in range(3):
            (result,) = pg.run([(statement, [i])])
            assert pg.row(result) == (i + 1,)
        raw.rollback()
        assert _ours(raw) == []


def test_a_connection_the_server_dropped_is_reported_disconnected(raw: psycopg.Connection[Any], empty_pg: str) -> None:
    pg = PgConnection(raw)
    pid = raw.info.backend_pid
    with psycopg.connect(_conninfo(server_url()), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(PipelineStepFailed) as failed:
        pg.run([(_BEGIN, ()), (PgStatement(b"SELECT 1", ()), ())])
    assert failed.value.disconnected
    assert pg.broken


def _finished_sessions(target: Target, count: int, *, seed: int) -> list[Respondent]:
    """``count`` sessions with every answer written, as the frontend leaves them before finalizeAssessment."""
    rng = random.Random(seed)
    respondents = [new_respondent(rng, answer_ms=60_000) for _ in range(count)]
    now = datetime.now(UTC)
    for r in respondents:
        write_session(target.db, r, now)
        write_answers(target.db, r, now, r.answer_ms)
    return respondents


def test_the_service_replaces_a_parked_connection_the_server_dropped(pg_target: Target) -> None:
    service = PrismService(pg_target.db, clock=RealClock())
    respondents = _finished_sessions(pg_target, 2, seed=3)

    def finalize(session_id: str) -> dict[str, object]:
        return service.finalize(session_id, _context(), results_base_url="http://127.0.0.1")

    try:
        assert finalize(respondents[0].session_id)["ok"] is True
        assert _kill_connections(pg_target) >= 1
        reply = finalize(respondents[1].session_id)
        assert reply["ok"] is True and reply["session_id"] == respondents[1].session_id
    finally:
        service.close()


def _context() -> CallContext:
    return CallContext(now=datetime.now(UTC), faults=Faults(), request_id=uuid.uuid4().hex, ip="127.0.0.1", ua="t")


def _kill_connections(target: Target) -> int:
    name = target.env.database_url.rsplit("/", 1)[1].split("?", 1)[0]
    with psycopg.connect(_conninfo(server_url()), autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_on_the_event_loop_a_dropped_parked_connection_is_replaced_too(pg_target: Target) -> None:
    service = PrismService(pg_target.db, clock=RealClock())
    respondents = _finished_sessions(pg_target, 2, seed=4)

    async def finalize(session_id: str) -> dict[str, object]:
        with ThreadPoolExecutor(1) as calls:
            return await service.finalize_async(session_id, _context(), calls, results_base_url="http://127.0.0.1")

    try:
        assert asyncio.run(finalize(respondents[0].session_id))["ok"] is True
        assert _kill_connections(pg_target) >= 1
        reply = asyncio.run(finalize(respondents[1].session_id))
        assert reply["ok"] is True and reply["session_id"] == respondents[1].session_id
    finally:
        service.close()


def _profile_scores(target: Target, session_id: str) -> dict[str, object]:
    with target.db.connect() as conn:
        row = conn.execute(sa.select(profiles).where(profiles.c.session_id == session_id)).one()
    return {k: row._mapping[k] for k in PROFILE_RESULT_COLUMNS}


def test_repeated_answers_go_to_the_portable_reader_and_the_latest_answer_wins(pg_target: Target) -> None:
    """The fast path reads answers unordered and gives up on a repeated question; both drivers then score through
    the portable reader, which keeps the latest answer: the profile equals that of a session answered so once."""
    db = pg_target.db
    rng = random.Random(5)
    base = new_respondent(rng, answer_ms=60_000)
    # A strength item answered other than "1", re-answered "1" later: the later answer sorts first by value, so a
    # reader that kept whichever row came last would keep the stale one.
    key = scoring.ReferenceData.from_package().key_rows
    strength = {k.question_id for k in key.values() if k.scale_type == "LIKERT_1_5" and (k.tag or "").endswith("_S")}
    qid, text, qtype, section, _, offset = next(a for a in base.answers if a[0] in strength and a[4] != "1")
    changed = "1"
    direct = replace(
        new_respondent(rng, answer_ms=60_000),
        answers=tuple(a if a[0] != qid else (qid, text, qtype, section, changed, offset) for a in base.answers),
        fc_choices=base.fc_choices,
    )
    repeated = [replace(base, session_id=str(uuid.uuid4()), share_token=str(uuid.uuid4())) for _ in range(2)]
    started = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    with db.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE assessment_responses DROP CONSTRAINT uniq_session_question")
    for r in (base, direct, *repeated):
        write_session(db, r, started)
        write_answers(db, r, started, r.answer_ms)
    later = started + timedelta(hours=1)
    with db.begin() as conn:
        for r in repeated:
            conn.execute(
                assessment_responses.insert().values(
                    session_id=r.session_id,
                    question_id=qid,
                    question_text=text,
                    question_type=qtype,
                    question_section=section,
                    answer_value=changed,
                    created_at=later,
                    updated_at=later,
                )
            )
    service = PrismService(db, clock=RealClock())

    async def finalize_async(session_id: str) -> dict[str, object]:
        with ThreadPoolExecutor(1) as calls:
            return await service.finalize_async(session_id, _context(), calls, results_base_url="http://127.0.0.1")

    try:
        service.finalize(base.session_id, _context(), results_base_url="http://127.0.0.1")
        service.finalize(direct.session_id, _context(), results_base_url="http://127.0.0.1")
        service.finalize(repeated[0].session_id, _context(), results_base_url="http://127.0.0.1")
        asyncio.run(finalize_async(repeated[1].session_id))
    finally:
        service.close()
    expected = _profile_scores(pg_target, direct.session_id)
    assert _profile_scores(pg_target, base.session_id) != expected  # the changed answer shows in the profile
    assert _profile_scores(pg_target, repeated[0].session_id) == expected
    assert _profile_scores(pg_target, repeated[1].session_id) == expected


def test_on_the_event_loop_expired_reference_data_is_reloaded_in_the_background(pg_target: Target) -> None:
    """A call on the event loop must not wait for the static reference tables' reload: it uses the expired copy
    and hands the reload to the executor; only the first load happens in a call."""
    service = PrismService(pg_target.db, clock=RealClock())
    loads: list[int] = []

    def load() -> Any:
        loads.append(1)
        return service._load_static()

    cache = _ReferenceCache(ttl=0.0)  # always expired
    config = dict(scoring.ReferenceData.from_package().config)
    jobs: list[Any] = []
    try:
        first = cache.get(load, config, drift=False, background=jobs.append)
        assert loads == [1] and jobs == []  # nothing to fall back on: loaded in the call
        again = cache.get(load, config, drift=False, background=jobs.append)
        assert loads == [1] and len(jobs) == 1 and again is first  # the expired copy, reload handed off
        cache.get(load, config, drift=False, background=jobs.append)
        assert len(jobs) == 1  # one reload at a time
        jobs[0]()
        assert loads == [1, 1]
        assert cache.get(load, config, drift=False) is not first  # without a background: reloaded in the call
        assert loads == [1, 1, 1]
    finally:
        service.close()


def test_a_call_cancelled_while_it_waits_on_the_event_loop_leaves_no_connection_behind(pg_target: Target) -> None:
    """Cancelled mid-batch (the session row is locked by someone else, so the read waits): the connection, with a
    batch half answered, is dropped rather than parked, the row lock is not kept, and the next call works."""
    service = PrismService(pg_target.db, clock=RealClock())
    first, second = _finished_sessions(pg_target, 2, seed=6)
    conninfo = _conninfo(pg_target.env.database_url)

    async def cancelled_then_next() -> dict[str, object]:
        with ThreadPoolExecutor(1) as calls, psycopg.connect(conninfo) as holder:
            holder.execute("SELECT 1 FROM assessment_sessions WHERE id = %s FOR UPDATE", (first.session_id,))
            call = asyncio.create_task(
                service.finalize_async(first.session_id, _context(), calls, results_base_url="http://127.0.0.1")
            )
            await asyncio.sleep(0.3)
            assert not call.done()  # waiting for the lock
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            holder.rollback()
            return await service.finalize_async(
                second.session_id, _context(), calls, results_base_url="http://127.0.0.1"
            )

    try:
        assert asyncio.run(cancelled_then_next())["ok"] is True
        # The cancelled call wrote nothing and holds nothing: its session can be finalized at once.
        reply = service.finalize(first.session_id, _context(), results_base_url="http://127.0.0.1")
        assert reply["ok"] is True
        name = pg_target.env.database_url.rsplit("/", 1)[1].split("?", 1)[0]
        with psycopg.connect(_conninfo(server_url()), autocommit=True) as admin:
            stuck = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state LIKE 'idle in transaction%%'",
                (name,),
            ).fetchone()
        assert stuck == (0,)
    finally:
        service.close()


def test_a_failed_background_reload_is_logged_and_the_cached_copy_stays_in_use(
    pg_target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload handed to the executor has no caller to raise to: its failure must be logged (never an
    unretrieved future), the calls go on with the copy they have, and the next expiry tries again."""
    service = PrismService(pg_target.db, clock=RealClock())
    failing = [False]

    def load() -> Any:
        if failing[0]:
            raise DatabaseError("test: the reference tables cannot be read")
        return service._load_static()

    cache = _ReferenceCache(ttl=0.0)  # always expired
    config = dict(scoring.ReferenceData.from_package().config)
    jobs: list[Any] = []
    try:
        first = cache.get(load, config, drift=False, background=jobs.append)
        failing[0] = True
        assert cache.get(load, config, drift=False, background=jobs.append) is first
        with caplog.at_level("WARNING", logger="gatefill.prism.platform.service"):
            assert jobs[0]() is None  # raises nothing
        assert "reloading the reference tables failed (test: the reference tables cannot be read)" in caplog.text
        assert cache.get(load, config, drift=False, background=jobs.append) is first  # still the old copy
        assert len(jobs) == 2  # and a new attempt was handed off
        failing[0] = False
        jobs[1]()
        assert cache.get(load, config, drift=False, background=jobs.append) is not first
    finally:
        service.close()


def _slow_connects(engine: sa.engine.Engine, seconds: float) -> Callable[[], None]:
    """Makes every new connection of ``engine`` take ``seconds`` longer (as a far or restarting server would);
    returns the undo. The pool is emptied so the next checkout must connect."""

    def slow(*_args: object) -> None:
        time.sleep(seconds)

    sa.event.listen(engine, "do_connect", slow)
    engine.dispose()
    return lambda: sa.event.remove(engine, "do_connect", slow)


def test_a_checkout_for_a_call_on_the_event_loop_does_not_stall_the_loop(pg_target: Target) -> None:
    """With no parked connection, the call's checkout connects on a thread: the loop's other work goes on."""
    parked = ParkedConnections(pg_target.db.engine)
    undo = _slow_connects(pg_target.db.engine, 1.0)

    async def call_beside_a_ticker() -> tuple[int, tuple[Any, ...] | None]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        async with parked.transaction_async() as (conn, reused):
            assert not reused
            (result,) = await conn.run_async([(PgStatement(b"SELECT 1", ()), ())])
            row = conn.row(result)
        done.set()
        await ticking
        return ticks, row

    try:
        ticks, row = asyncio.run(call_beside_a_ticker())
        assert row == (1,)
        assert ticks >= 20  # the loop ran on through the one-second connect (blocked, it ticks once or twice)
    finally:
        undo()
        parked.dispose()


def test_a_call_cancelled_during_its_checkout_leaves_the_connection_parked(pg_target: Target) -> None:
    parked = ParkedConnections(pg_target.db.engine)
    undo = _slow_connects(pg_target.db.engine, 0.5)

    async def cancel_during_checkout() -> None:
        async def call() -> None:
            async with parked.transaction_async():
                raise AssertionError("not reached: cancelled while checking out")

        task = asyncio.create_task(call())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 10
        while not parked._idle and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    try:
        asyncio.run(cancel_during_checkout())
        assert len(parked._idle) == 1  # the thread's connection was parked, not lost
        pool = pg_target.db.engine.pool
        assert isinstance(pool, sa.pool.QueuePool) and pool.checkedout() == 1  # ... and it is the only one out
    finally:
        undo()
        parked.dispose()
    assert pg_target.db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
