"""The declarative ``sql`` job on SQLite, Postgres and Postgres through PgBouncer: every phase through the library and
the CLI, a live writer's value kept (changed before apply, and while apply waits for its lock), a resumed apply,
exact rollback, and bad declarations refused before anything is written."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gatefill import ledger
from gatefill.apply import ApplyOptions, RunPaused, apply_plan, measure_backfill_gate
from gatefill.cli import main
from gatefill.clock import SimulatedClock
from gatefill.config import load_settings
from gatefill.db import Database
from gatefill.errors import ConfigError, GateBlocked, UsageError
from gatefill.health import check_health
from gatefill.jobs import available_jobs, get_job
from gatefill.jobs.sql import SqlJob, expression_problem
from gatefill.ledger import RunStatus
from gatefill.plan import Plan, PlanParams, build_plan, compose_plan, load_plan
from gatefill.reports.health import write_health_check
from gatefill.reports.rollback_sql import write_rollback_sql
from gatefill.rollback import RollbackConflicts, rollback_run
from tests.conftest import Target, table_digests
from tests.sql_posts import FILL_SLUG, PRESET_EVERY, fill_slug, lowered, make_posts, slugs, snapshot
from tests.test_rollback import run_script

pytestmark = pytest.mark.pooled

SINCE = datetime(2025, 1, 1, tzinfo=UTC)
START = datetime(2025, 9, 17, 12, 0, tzinfo=UTC)


def plan(target: Target, job: SqlJob, tmp_path: Path, batch_size: int = 4) -> Plan:
    params = PlanParams(since=SINCE, rate="unlimited", batch_size=batch_size)
    return build_plan(target.db, target.env, job, params, now=START, artifacts_dir=tmp_path / "artifacts").plan


def apply(target: Target, job: SqlJob, body: Plan, tmp_path: Path, **kw: Any) -> Any:
    return apply_plan(
        target.db,
        target.env,
        job,
        body,
        options=ApplyOptions(approve_as="tester"),
        clock=SimulatedClock(START),
        artifacts_dir=tmp_path / "artifacts",
        **kw,
    )


def changes_of(target: Target, run_id: str) -> list[Any]:
    with target.db.connect() as conn:
        return list(ledger.changes_for(conn, run_id))


# ---------------------------------------------------------------------------------------------------- phases


def test_every_phase_through_the_library(target: Target, tmp_path: Path) -> None:
    todo = make_posts(target.db)
    before = snapshot(target.db)
    job = fill_slug()
    body = plan(target, job, tmp_path)
    assert len(body.runnable) == len(todo) == 19
    assert body.categories() == {"matches_where": [str(i) for i in todo]}
    assert body.expected_changes() == {"posts": {"insert": 0, "update": 19}}
    assert body.versions == {"sql_definition": job.definition.digest}
    assert [c.name for c in body.prechecks] == ["sql_definition", "write_privileges"]

    result = apply(target, job, body, tmp_path)
    assert result.status is RunStatus.SUCCEEDED and result.counts == Counter(written=19)
    filled = slugs(target.db)
    assert all(filled[i] == lowered(target.db, i) for i in todo)
    assert all(filled[i] == f"kept-{i}" for i in filled if i % PRESET_EVERY == 0)
    changes = changes_of(target, body.run_id)
    assert len(changes) == 19 and {c.table for c in changes} == {"posts"}
    assert all(c.before == {"slug": None} and c.after_columns == ("slug",) and c.after is None for c in changes)

    report = gate_of(target, job, body, tmp_path)
    verdicts = {c.name: c.verdict for c in report.checks}
    assert report.verdict == "PASS", report.checks
    assert verdicts["verify_processed"] == "PASS" and verdicts["rollback_dry_run"] == "PASS"

    healthy = _health(target, job, tmp_path)
    assert healthy.healthy and healthy.plan is None
    assert [c.name for c in healthy.checks] == ["rows_matching_where", "verify_violations", "measurement_time"]

    undone = rollback_run(target.db, body.run_id, job.written_tables(), now=START, artifacts_dir=tmp_path / "a")
    assert undone.verdict == "PASS" and undone.committed
    assert snapshot(target.db) == before

    # Health now finds the work again and writes a mini plan that apply accepts as it is.
    sick = _health(target, job, tmp_path)
    assert not sick.healthy and sick.plan is not None and len(sick.plan.runnable) == 19
    mini = load_plan(sick.paths["mini_plan"])
    assert apply(target, job, mini, tmp_path).counts == Counter(written=19)
    assert _health(target, job, tmp_path).healthy


def test_batches_follow_the_keys_order_not_their_text(target: Target, tmp_path: Path) -> None:
    todo = make_posts(target.db)  # ids 1..23: as text, "10" sorts before "2"
    body = plan(target, fill_slug(), tmp_path)
    in_batches = [int(key) for batch in body.batches for key in batch.keys]
    assert in_batches == todo == sorted(todo)


def gate_of(target: Target, job: SqlJob, body: Plan, tmp_path: Path) -> Any:
    clock = SimulatedClock(START)
    return measure_backfill_gate(target.db, target.env, job, body.run_id, clock=clock, artifacts_dir=tmp_path / "a")


def _health(target: Target, job: SqlJob, tmp_path: Path) -> Any:
    result = check_health(target.db, target.env, since=SINCE, now=START, job=job)
    return write_health_check(result, tmp_path / "artifacts")


def test_rerunning_changes_nothing(target: Target, tmp_path: Path) -> None:
    make_posts(target.db)
    job = fill_slug()
    apply(target, job, plan(target, job, tmp_path), tmp_path)
    after = snapshot(target.db)
    again = plan(target, job, tmp_path)
    assert again.runnable == () and again.batches == ()
    assert apply(target, job, again, tmp_path).counts == Counter()
    assert snapshot(target.db) == after


# ---------------------------------------------------------------------------------------------------- live writers


def test_a_live_writer_between_plan_and_apply_keeps_its_value(target: Target, tmp_path: Path) -> None:
    make_posts(target.db)
    job = fill_slug()
    body = plan(target, job, tmp_path)
    with target.db.begin() as conn:
        conn.execute(sa.text("UPDATE posts SET slug = 'live-2' WHERE id = 2"))  # no longer matches where
        conn.execute(sa.text("DELETE FROM posts WHERE id = 3"))
        conn.execute(sa.text("UPDATE posts SET title = 'Renamed' WHERE id = 4"))  # still matches: filled from it
    result = apply(target, job, body, tmp_path)
    assert result.counts == Counter(written=17, already_present=2)
    filled = slugs(target.db)
    assert filled[2] == "live-2" and 3 not in filled and filled[4] == "renamed"
    with target.db.connect() as conn:
        reasons = dict(
            conn.execute(
                sa.select(ledger.session_results.c.session_id, ledger.session_results.c.detail).where(
                    ledger.session_results.c.result == "already_present"
                )
            ).all()
        )
    assert "no longer matches where" in reasons["2"]["operations"][0]["reason"]
    assert "deleted since the plan" in reasons["3"]["operations"][0]["reason"]
    assert {c.row_key for c in changes_of(target, body.run_id)}.isdisjoint({'{"id":"2"}', '{"id":"3"}'})


def test_a_live_writer_holding_the_row_wins_and_apply_waits_for_it(target: Target, tmp_path: Path) -> None:
    """The writer's transaction holds row 1 (Postgres: its row lock; SQLite: the write lock) while apply starts; apply
    waits, then re-evaluates ``where`` on the committed row and leaves it alone."""
    make_posts(target.db)
    job = fill_slug()
    body = plan(target, job, tmp_path, batch_size=50)
    writer = Database(target.env)
    done: list[Any] = []
    try:
        with writer.begin() as conn:
            conn.execute(sa.text("UPDATE posts SET slug = 'written-live' WHERE id = 1"))
            worker = threading.Thread(target=lambda: done.append(apply(target, job, body, tmp_path)))
            worker.start()
            time.sleep(1.0)
            assert worker.is_alive() and not done  # apply waits for the writer's lock
        worker.join(timeout=60)
    finally:
        writer.dispose()
    assert done and done[0].counts == Counter(written=18, already_present=1)
    assert slugs(target.db)[1] == "written-live"


# ---------------------------------------------------------------------------------------------------- resume


def test_an_interrupted_apply_resumes_without_repeating_or_skipping(target: Target, tmp_path: Path) -> None:
    make_posts(target.db)
    job = fill_slug()
    body = plan(target, job, tmp_path, batch_size=3)
    stop = threading.Event()

    def interrupt(batch_no: int) -> None:
        if batch_no == 3:
            stop.set()

    with pytest.raises(RunPaused):
        apply(target, job, body, tmp_path, stop=stop, before_batch=interrupt)
    assert len(changes_of(target, body.run_id)) == 6  # batches 1 and 2
    with target.db.begin() as conn:  # a live writer fills one of the remaining rows meanwhile
        conn.execute(sa.text("UPDATE posts SET slug = 'live-19' WHERE id = 19"))
    resumed = apply(target, job, body, tmp_path)
    assert resumed.status is RunStatus.SUCCEEDED and resumed.counts == Counter(written=12, already_present=1)
    changes = changes_of(target, body.run_id)
    assert len(changes) == 18 and len({c.row_key for c in changes}) == 18
    with target.db.connect() as conn:
        assert Counter(ledger.session_results_for(conn, body.run_id).values()) == Counter(written=18, already_present=1)


# ---------------------------------------------------------------------------------------------------- rollback


def test_rollback_is_exact_and_leaves_everyone_elses_writes_alone(target: Target, tmp_path: Path) -> None:
    todo = make_posts(target.db)
    before = snapshot(target.db)
    job = fill_slug()
    body = plan(target, job, tmp_path)
    apply(target, job, body, tmp_path)
    with target.db.begin() as conn:  # live writes after the apply, none to a column the job set
        conn.execute(sa.text("UPDATE posts SET body = 'edited live' WHERE id = 1"))
        conn.execute(sa.text("UPDATE posts SET score = 0.1 WHERE id = 5"))
        conn.execute(sa.text("INSERT INTO posts (id, title, slug, body, score) VALUES (100, 'New', NULL, 'b', 1.5)"))
    live = {k: v for k, v in snapshot(target.db).items() if k in ("5", "100")}

    result = rollback_run(target.db, body.run_id, job.written_tables(), now=START, artifacts_dir=tmp_path / "a")
    assert result.committed and result.tables[0].restored == 19 and result.tables[0].deleted == 0

    now = snapshot(target.db)
    untouched = {k for k in before if int(k) not in todo and k not in live}
    assert {k: now[k] for k in untouched} == {k: before[k] for k in untouched}  # byte for byte
    assert {k: now[k] for k in live} == live  # the live writes stand
    restored = {k: now[k] for k in before if int(k) in todo and k != "1"}
    assert restored == {k: before[k] for k in restored}
    with target.db.connect() as conn:  # row 1: its slug restored beside the body written live since
        assert conn.execute(sa.text("SELECT slug, body FROM posts WHERE id = 1")).one() == (None, "edited live")


def test_rollback_refuses_a_row_changed_since_unless_forced(target: Target, tmp_path: Path) -> None:
    make_posts(target.db)
    job = fill_slug()
    body = plan(target, job, tmp_path)
    apply(target, job, body, tmp_path)
    with target.db.begin() as conn:
        conn.execute(sa.text("UPDATE posts SET slug = 'edited' WHERE id = 2"))
        conn.execute(sa.text("DELETE FROM posts WHERE id = 3"))
    kept = snapshot(target.db)
    with pytest.raises(RollbackConflicts) as refused:
        rollback_run(
            target.db, body.run_id, job.written_tables(), now=START, artifacts_dir=tmp_path / "a"
        ).raise_for_verdict()
    assert len(refused.value.conflicts) == 2 and snapshot(target.db) == kept
    forced = rollback_run(
        target.db, body.run_id, job.written_tables(), now=START, artifacts_dir=tmp_path / "a", force=True
    )
    assert forced.committed and forced.verified
    assert "1 deleted since the run wrote them stay deleted" in forced.verification[0].summary
    assert slugs(target.db)[2] is None and 3 not in slugs(target.db)


def test_the_rollback_script_restores_the_same(target: Target, tmp_path: Path) -> None:
    before = (make_posts(target.db), snapshot(target.db))[1]
    job = fill_slug()
    body = plan(target, job, tmp_path)
    apply(target, job, body, tmp_path)
    path = write_rollback_sql(target.db, body.run_id, job.written_tables(), tmp_path / "rollback.sql", now=START)
    text = path.read_text()
    assert "DELETE FROM posts" not in text and "UPDATE posts SET slug = NULL WHERE id = '1';" in text
    done = run_script(_Case(target), path)
    assert done.returncode == 0, done.stderr
    assert snapshot(target.db) == before


class _Case:
    """What ``tests.test_rollback.run_script`` reads of its case."""

    def __init__(self, target: Target) -> None:
        # psql runs the script through the pooler too: one transaction, nothing kept in the session.
        dialect = "postgresql" if target.dialect == "pooled" else target.dialect
        self.target = dataclasses.replace(target, dialect=dialect)


# ---------------------------------------------------------------------------------------------------- rows and keys


def test_verify_fails_only_the_rows_it_does_not_hold_for(target: Target, tmp_path: Path) -> None:
    make_posts(target.db)
    with target.db.begin() as conn:
        conn.execute(sa.text("UPDATE posts SET title = NULL WHERE id IN (2, 7)"))  # lower(NULL) is NULL
    job = fill_slug()
    body = plan(target, job, tmp_path)
    result = apply(target, job, body, tmp_path)
    assert result.counts == Counter(written=17, failed=2)
    assert all("verify (slug is not null) does not hold" in (f.error or "") for f in result.failures)
    assert slugs(target.db)[2] is None and slugs(target.db)[7] is None
    report = gate_of(target, job, body, tmp_path)
    assert report.verdict == "FAIL" and {c.name: c.verdict for c in report.checks}["write_errors"] == "FAIL"


def test_composite_keys_and_typed_values_round_trip(target: Target, tmp_path: Path) -> None:
    postgres = target.db.engine.dialect.name == "postgresql"
    schema = "app" if postgres else None
    table = "app.ledger_lines" if postgres else "ledger_lines"
    ddl = (
        "CREATE SCHEMA app; CREATE TABLE app.ledger_lines (tenant int, day date, amount numeric(12, 3), "
        "doubled numeric(14, 3), stamped timestamptz, PRIMARY KEY (tenant, day))"
        if postgres
        else "CREATE TABLE ledger_lines (tenant INTEGER, day TEXT, amount NUMERIC, doubled NUMERIC, stamped TEXT, "
        "PRIMARY KEY (tenant, day))"
    )
    with target.db.begin() as conn:
        for statement in ddl.split("; "):
            conn.exec_driver_sql(statement)
        for tenant in (1, 2, 10):
            for day in ("2025-01-01", "2025-01-02"):
                conn.execute(
                    sa.text(f"INSERT INTO {table} (tenant, day, amount) VALUES (:t, :d, :a)"),
                    {"t": tenant, "d": day, "a": 1.125 * tenant},
                )
    before = snapshot(target.db, table, "tenant || '/' || day")
    job = SqlJob.from_config(
        "double",
        {
            "kind": "sql",
            "schema": schema,
            "table": "ledger_lines",
            "key": ["tenant", "day"],
            "where": "doubled is null",
            "set": {"doubled": "amount * 2", "stamped": "'2025-09-17T12:00:00Z'"},
            "verify": "doubled = amount * 2",
        },
    )
    body = plan(target, job, tmp_path, batch_size=4)
    keys = [c.key for c in body.candidates]
    assert keys[:3] == ['["1","2025-01-01"]', '["1","2025-01-02"]', '["2","2025-01-01"]']
    assert job.parse_key('[10, "2025-01-02"]') == '["10","2025-01-02"]'
    assert apply(target, job, body, tmp_path).counts == Counter(written=6)
    undone = rollback_run(target.db, body.run_id, job.written_tables(), now=START, artifacts_dir=tmp_path / "a")
    assert undone.verified and snapshot(target.db, table, "tenant || '/' || day") == before


def test_keys_are_bound_never_interpolated(target: Target, tmp_path: Path) -> None:
    hostile = ["x'); DROP TABLE notes; --", 'a"b', "100%", "x:y", "plain"]
    with target.db.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE notes (code TEXT PRIMARY KEY, b TEXT, upper_body TEXT)")
        conn.execute(sa.text("INSERT INTO notes (code, b) VALUES (:c, 'b')"), [{"c": c} for c in hostile])
    job = SqlJob.from_config(
        "upper",
        {
            "kind": "sql",
            "table": "notes",
            "key": "code",
            "where": "upper_body is null",
            "set": {"upper_body": "upper(b)"},
        },
    )
    body = plan(target, job, tmp_path)
    assert apply(target, job, body, tmp_path).counts == Counter(written=5)
    with target.db.connect() as conn:
        assert dict(conn.execute(sa.text("SELECT code, upper_body FROM notes")).all()) == {c: "B" for c in hostile}
    undone = rollback_run(target.db, body.run_id, job.written_tables(), now=START, artifacts_dir=tmp_path / "a")
    assert undone.verified


# ---------------------------------------------------------------------------------------------------- declarations


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"table": None}, "'table' is missing"),
        ({"set": {"id": "1"}}, "set column 'id' is part of the key"),
        ({"set": {}}, "set must be a table"),
        ({"key": []}, "key must be the primary key's column"),
        ({"key": ["id", "id"]}, "key names a column twice"),
        ({"table": "posts; DROP TABLE posts"}, "is not a plain SQL identifier"),
        ({"table": 'posts" --'}, "is not a plain SQL identifier"),
        ({"key": "id) OR (1=1"}, "is not a plain SQL identifier"),
        ({"schema": "public.x"}, "is not a plain SQL identifier"),
        ({"set": {"slug = 'x', title": "1"}}, "is not a plain SQL identifier"),
        ({"where": "slug is null; DELETE FROM posts"}, "';' is not allowed"),
        ({"where": "slug is null) OR (true"}, "unbalanced ')'"),
        ({"where": "slug is null -- and more"}, "comments are not allowed"),
        ({"set": {"slug": "lower(title) /* x */"}}, "comments are not allowed"),
        ({"set": {"slug": "'unterminated"}}, "unterminated ' quote"),
        ({"verify": "(slug is not null"}, "unbalanced '('"),
        ({"where": "  "}, "where must be a non-empty SQL expression"),
        ({"set": {"slug": 3}}, "set.slug must be a non-empty SQL expression"),
    ],
)
def test_bad_declarations_are_one_line_config_errors(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        fill_slug(**changes)
    text = str(error.value)
    assert text.startswith("job 'fill_slug' (kind sql): ") and message in text and "\n" not in text


def test_the_expression_check_reads_quotes_as_sql_does() -> None:
    assert expression_problem("title || ';' || \"odd;name\"") is None
    assert expression_problem("'it''s' = title") is None
    assert expression_problem("E'it\\'s (' = title") is None
    assert expression_problem("$$a;b)$$ = title") is None
    assert expression_problem("$tag$ -- $tag$ = title") is None
    assert expression_problem("'-- not a comment'") is None
    assert expression_problem("$$ never closed") == "unterminated dollar quote"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"table": "absent"}, "table absent does not exist"),
        ({"set": {"slugg": "lower(title)"}}, "posts has no column(s) slugg"),
        ({"key": "title"}, "key ['title'] is not the primary key of posts"),
        ({"set": {"slug": "lowr(title)"}}, "where/set does not plan on posts"),
        ({"where": "slug is nul"}, "where/set does not plan on posts"),
        ({"verify": "slug is not nul"}, "verify does not plan on posts"),
        ({"where": "no_such_column is null"}, "where/set does not plan on posts"),
    ],
)
def test_declarations_that_do_not_fit_the_database_write_nothing(
    target: Target,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    message: str,
) -> None:
    make_posts(target.db)
    config = {**FILL_SLUG, **changes}
    write_config(tmp_path, target, config)
    monkeypatch.chdir(tmp_path)
    digests = table_digests(target.db)
    assert main(["plan", "--env", "test", "--job", "fill_slug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: job 'fill_slug' (kind sql): ") and message in err and err.count("\n") == 1
    assert table_digests(target.db) == digests  # no ledger, no run, no row
    assert not (tmp_path / "artifacts").exists()


def test_a_type_the_column_cannot_take_is_refused_on_postgres(target: Target) -> None:
    make_posts(target.db)
    job = fill_slug(set={"score": "title"}, where="score is null", verify=None)
    if target.db.engine.dialect.name == "sqlite":
        job.require_schema(target.db)  # SQLite stores any value in any column
        return
    with pytest.raises(ConfigError, match='where/set does not plan on posts: column "score" is of type double'):
        job.require_schema(target.db)


def test_a_plan_of_another_definition_is_refused(target: Target, tmp_path: Path) -> None:
    make_posts(target.db)
    body = plan(target, fill_slug(), tmp_path)
    other = fill_slug(set={"slug": "upper(title)"})
    with pytest.raises(UsageError, match="make a new plan"):
        apply(target, other, body, tmp_path)
    assert all(s is None for i, s in slugs(target.db).items() if i % PRESET_EVERY)


# ---------------------------------------------------------------------------------------------------- the CLI


def write_config(tmp_path: Path, target: Target, job: dict[str, Any]) -> Path:
    lines = ['artifacts_dir = "artifacts"', "", "[env.test]", f'database_url = "{target.url}"']
    lines += [f'pooler = "{target.env.pooler}"', "", "[job.fill_slug]"]
    lines += [f"{k} = {_toml(v)}" for k, v in job.items() if v is not None]
    path = tmp_path / "gatefill.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def test_jobs_lists_prism_and_the_configs_sql_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gatefill.toml").write_text(
        '[env.test]\ndatabase_url = "sqlite:///x.db"\n\n[job.fill_slug]\n'
        + "\n".join(f"{k} = {_toml(v)}" for k, v in FILL_SLUG.items()),
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    assert main(["jobs"]) == 0
    out = capsys.readouterr().out
    assert "prism" in out and "built-in" in out and "fill_slug" in out and "[job.fill_slug]" in out
    from gatefill.config import load_settings

    settings = load_settings(tmp_path / "gatefill.toml")
    entries = {e.name: (e.kind, e.source) for e in available_jobs(settings)}
    assert entries["prism"] == ("prism", "built-in")
    assert entries["fill_slug"][0] == "sql" and entries["fill_slug"][1].endswith("gatefill.toml [job.fill_slug]")
    assert isinstance(get_job("fill_slug", settings), SqlJob)


def test_plan_approve_apply_rollback_health_from_the_cli(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    todo = make_posts(target.db)
    before = snapshot(target.db)
    write_config(tmp_path, target, FILL_SLUG)
    monkeypatch.chdir(tmp_path)

    assert main(["plan", "--env", "test", "--job", "fill_slug", "--rate", "unlimited"]) == 0
    out = capsys.readouterr().out
    run_id = out.split("run ", 1)[1].split()[0]
    assert f"{len(todo)} candidates" in out and "expected posts: +0 inserted, 19 updated" in out
    assert main(["apply", run_id]) == 4  # not approved
    capsys.readouterr()
    assert main(["approve", run_id, "--gate", "plan", "--by", "tester"]) == 0
    assert main(["apply", run_id]) == 0
    out = capsys.readouterr().out
    assert "written 19" in out.replace(":", "") or "19 written" in out, out
    assert "backfill gate: PASS" in out
    assert all(s is not None for s in slugs(target.db).values())

    assert main(["health", "--env", "test", "--job", "fill_slug"]) == 0
    assert "HEALTHY" in capsys.readouterr().out
    assert main(["rollback", run_id]) == 0
    assert snapshot(target.db) == before
    capsys.readouterr()
    assert main(["health", "--env", "test", "--job", "fill_slug"]) == 1
    out = capsys.readouterr().out
    mini = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("mini_plan: "))
    assert main(["apply", mini, "--approve-as", "tester", "--rate", "unlimited"]) == 0
    assert all(s is not None for s in slugs(target.db).values())


# ---------------------------------------------------------------------------------------------------- gates


def test_a_production_apply_needs_a_passing_soak_of_the_same_definition(tmp_path: Path) -> None:
    """Two sql jobs with different definitions share no version: the soak of one does not open the gate of the other
    (PRISM's version keys alone would have matched them both)."""
    from gatefill.config import Environment, Settings
    from gatefill.soak import SoakOptions, soak_job

    envs = {
        name: Environment(name=name, kind=name, database_url=f"sqlite:///{tmp_path / name}.db")  # type: ignore[arg-type]
        for name in ("staging", "production")
    }
    settings = Settings(None, tmp_path, tmp_path / "artifacts", envs)
    job, other = fill_slug(), fill_slug(where="slug is null and id > 0")
    with Database(envs["staging"], create=True) as staging:
        make_posts(staging)
        target = Target("sqlite", envs["staging"], staging)
        applied = plan(target, job, tmp_path)
        apply(target, job, applied, tmp_path)
        options = SoakOptions(after=applied.run_id, duration=3600.0, interval=1800.0, chart=False)
        soaked = soak_job(envs["staging"], job, options, clock="simulated")
        assert soaked.verdict == "PASS", soaked.checks
        with staging.begin() as conn:
            ledger.record_approval(conn, run_id=soaked.run_id, gate="soak", approved_by="tester", now=START)
    with Database(envs["production"], create=True) as production:
        make_posts(production)
        target = Target("sqlite", envs["production"], production)
        for candidate, allowed in ((other, False), (job, True)):
            body = plan(target, candidate, tmp_path)
            if not allowed:
                with pytest.raises(GateBlocked, match=re.escape("the plan writes {'sql_definition'")):
                    apply(target, candidate, body, tmp_path, settings=settings)
                continue
            assert apply(target, candidate, body, tmp_path, settings=settings).counts == Counter(written=19)


# ---------------------------------------------------------------------------------------------------- the README


def readme_blocks(language: str) -> list[str]:
    """The ``language`` code blocks of the README's "Write your own job" section, in order."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Write your own job") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(rf"```{language}\n(.*?)\n```", section, re.S)


def test_the_readmes_sql_job_works_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The TOML block is the job these tests use, and the commands run as written on a SQLite ``staging`` (apply
    unthrottled, as in tests/test_readme.py, so the suite does not wait a minute)."""
    import tomllib

    toml = readme_blocks("toml")[0]
    assert tomllib.loads(toml)["job"]["fill_slug"] == FILL_SLUG
    (tmp_path / "gatefill.toml").write_text(f'[env.staging]\ndatabase_url = "sqlite:///staging.db"\n\n{toml}\n')
    monkeypatch.chdir(tmp_path)
    with Database(load_settings(tmp_path / "gatefill.toml").env("staging"), create=True) as db:
        make_posts(db)
    run_id = ""
    expected_exit = {"health": [0, 1]}
    for line in readme_blocks("sh")[0].splitlines():
        argv = line.split("#")[0].split()
        assert argv[0] == "gatefill"
        argv = [run_id if a == "RUN" else a for a in argv[1:]]
        argv += ["--rate", "unlimited"] if argv[0] == "apply" else []
        code = main(argv)
        out = capsys.readouterr().out
        if argv[0] == "plan":
            run_id = out.split("run ", 1)[1].split()[0]
        wanted = expected_exit[argv[0]].pop(0) if argv[0] in expected_exit else 0
        assert code == wanted, (argv, out)
        if argv[0] == "jobs":
            assert "fill_slug" in out and "sql" in out and "prism" in out
    with Database(load_settings(tmp_path / "gatefill.toml").env("staging")) as db:
        assert all(s is None for i, s in slugs(db).items() if i % PRESET_EVERY)  # rolled back


def test_the_readmes_python_job_loads_through_its_entry_point(
    target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tomllib
    from importlib import metadata

    import gatefill.jobs as registry

    package = tmp_path / "acme_backfills"
    package.mkdir()
    (package / "__init__.py").write_text(readme_blocks("python")[0], encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    declared = tomllib.loads(readme_blocks("toml")[1])["project"]["entry-points"]["gatefill.jobs"]
    points = {n: metadata.EntryPoint(n, v, "gatefill.jobs") for n, v in declared.items()}
    monkeypatch.setattr(registry, "_entry_points", lambda: points)

    assert [e.name for e in available_jobs()] == ["prism", "acme_slugs"]
    job = get_job("acme_slugs")
    assert isinstance(job, SqlJob) and job.name == "acme_slugs"
    make_posts(target.db)
    body = plan(target, job, tmp_path)
    assert [c.name for c in body.prechecks] == ["sql_definition", "write_privileges", "not_in_freeze"]
    assert apply(target, job, body, tmp_path).counts == Counter(written=19)


@pytest.mark.parametrize("target", ["postgresql"], indirect=True)
def test_a_read_only_role_checks_health_but_cannot_plan(target: Target, tmp_path: Path) -> None:
    """Production health may run as a role that can only read: the UPDATE is then planned as a SELECT of its
    expressions, and the write-privileges precheck refuses a plan (exit 4) instead of a confusing parse error."""
    from gatefill.config import Environment

    make_posts(target.db)
    job = fill_slug()
    apply(target, job, plan(target, job, tmp_path), tmp_path)
    role = f"gf_reader_{uuid.uuid4().hex[:8]}"
    with target.db.begin() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"GRANT SELECT ON posts TO {role}")
    reader_env = Environment(name="test", kind="staging", database_url=target.url.replace("postgres@", f"{role}@", 1))
    try:
        with Database(reader_env) as reader:
            reading = fill_slug()
            reading.require_schema(reader)
            health = check_health(reader, reader_env, since=SINCE, now=START, job=reading)
            assert health.healthy, health.checks
            refused = pytest.raises(GateBlocked, match=r"write_privileges: .*UPDATE on posts MISSING")
            with refused, reader.connect() as conn:
                compose_plan(conn, reader_env, reading, PlanParams(since=SINCE), now=START)
    finally:
        with target.db.begin() as conn:
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")


def test_a_sql_pipeline_reaches_a_go_that_cites_its_own_checks(tmp_path: Path) -> None:
    """plan → apply → soak → health → mini plan → production apply → final gate, for the sql job: the checklist cites
    the job's gating checks (verify on the soaked rows and on production), none of PRISM's."""
    from gatefill.config import Environment, Settings
    from gatefill.pipeline import PipelineOptions, run_pipeline
    from gatefill.soak import SoakOptions, soak_job

    envs = {
        name: Environment(name=name, kind=name, database_url=f"sqlite:///{tmp_path / name}.db")  # type: ignore[arg-type]
        for name in ("staging", "production")
    }
    for env in envs.values():
        with Database(env, create=True) as db:
            make_posts(db)
    settings = Settings(None, tmp_path, tmp_path / "artifacts", envs)
    job = fill_slug()
    clock = SimulatedClock(START)

    def soak_step(db: Database, env: Any, apply_run: str, _clock: Any, artifacts: Path) -> dict[str, Any]:
        options = SoakOptions(after=apply_run, duration=3600.0, interval=1800.0, chart=False)
        record = soak_job(env, job, options, clock="simulated").step_record()
        clock.advance(2 * 3600)  # the soak's simulated hour has passed for the pipeline too
        return record

    options = PipelineOptions("staging", "production", SINCE, rate="unlimited", auto_approve_as="tester")
    state = run_pipeline(settings, options, job=job, clock=clock, soak_step=soak_step)
    assert state.done and state.steps["final_gate"]["verdict"] == "GO", state.log
    text = Path(state.steps["final_gate"]["artifact"]).read_text()
    assert "| verify holds on every row the staging apply wrote | PASS |" in text
    assert "| verify holds on every production row that needs no work | PASS |" in text
    assert "version_stamps" not in text and "conversion" not in text
    with Database(envs["production"]) as production:
        assert all(s is not None for s in slugs(production).values())


def test_the_registry_refuses_a_config_job_named_as_a_built_in_and_a_plugin_that_is_not_a_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib import metadata

    import gatefill.jobs as registry
    from gatefill.config import load_settings
    from gatefill.errors import ConfigError

    config = tmp_path / "gatefill.toml"
    config.write_text('[job.prism]\nkind = "sql"\ntable = "posts"\nkey = "id"\nwhere = "1=1"\nset = { a = "1" }\n')
    settings = load_settings(config, environ={})
    with pytest.raises(ConfigError, match="the name is the built-in job's"):
        get_job("prism", settings)
    with pytest.raises(ConfigError, match="the name is the built-in job's"):
        available_jobs(settings)

    class HalfAJob:
        name = "half"

        def discover(self) -> None: ...

    monkeypatch.setattr(
        registry, "_entry_points", lambda: {"half": metadata.EntryPoint("half", "x:y", "gatefill.jobs")}
    )
    monkeypatch.setattr(registry, "_load_entry_point", lambda ep: HalfAJob())
    with pytest.raises(ConfigError, match=r"entry point x:y is not a gatefill job: it lacks .*health_checks"):
        get_job("half")
