"""Storage: one alembic schema on SQLite and PostgreSQL, and cursor pages that
stay exact while runs are being created."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from metaflow_stack.service.database import connect, downgrade, migrate
from metaflow_stack.service.schema import metadata

TABLES = {"flows", "runs", "steps", "tasks", "metadata", "artifacts", "events", "parked_events", "relay_state"}


def _database_url(kind: str, tmp_path: Path, postgres) -> str:
    return str(tmp_path / "m.db") if kind == "sqlite" else postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "m.db")
    return request.getfixturevalue("postgres").create_database()


@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index")
def test_migrations_build_exactly_the_schema_and_reverse(database_url: str) -> None:
    database = connect(database_url)
    try:
        migrate(database)
        migrate(database)  # idempotent: a second server starting finds nothing to do
        with database.writer.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            assert set(inspect(conn).get_table_names()) >= TABLES
        downgrade(database, "base")
        with database.writer.connect() as conn:
            assert not TABLES & set(inspect(conn).get_table_names())
        migrate(database)
    finally:
        database.dispose()


def test_revision_0002_moves_events_without_losing_or_renumbering_any(database_url: str) -> None:
    """0001's in-place outbox becomes an outbox and a numbered log, and back, rows intact."""
    database = connect(database_url)
    event = "'F', NULL, 'flow', '{}', 0"
    try:
        migrate(database, "0001")
        with database.writer.begin() as conn:
            for seq, published in ((1, True), (2, True), (3, False)):
                conn.execute(
                    text(
                        "INSERT INTO events (flow_id, run_number, kind, body, ts_epoch, seq, published) "
                        f"VALUES ({event}, :seq, :published)"
                    ),
                    {"seq": seq, "published": published},
                )
            conn.execute(text(f"INSERT INTO events (flow_id, run_number, kind, body, ts_epoch) VALUES ({event})"))
        migrate(database, "0002")
        with database.writer.connect() as conn:
            assert conn.execute(text("SELECT seq FROM events ORDER BY seq")).scalars().all() == [1, 2, 3]
            assert conn.execute(text("SELECT count(*) FROM outbox")).scalar() == 1
            assert conn.execute(text("SELECT last_seq, published_seq FROM relay_state")).one() == (3, 2)
        downgrade(database, "0001")
        with database.writer.connect() as conn:
            rows = conn.execute(text("SELECT seq, published FROM events ORDER BY id")).all()
            assert [(seq, bool(published)) for seq, published in rows] == [
                (1, True),
                (2, True),
                (3, False),
                (None, False),
            ]
    finally:
        database.dispose()


def test_revision_0005_numbers_the_outbox_and_the_log_numbers_on_from_there(database_url: str) -> None:
    """What the relay had not numbered yet follows its last number; writes then number on, never reusing one."""
    database = connect(database_url)
    event = "'F', NULL, 'flow', '{}', 0"
    try:
        migrate(database, "0004")
        with database.writer.begin() as conn:
            conn.execute(
                text(f"INSERT INTO events (seq, flow_id, run_number, kind, body, ts_epoch) VALUES (7, {event})")
            )
            conn.execute(text("UPDATE relay_state SET last_seq = 7, published_seq = 7"))
            for _ in range(2):
                conn.execute(text(f"INSERT INTO outbox (flow_id, run_number, kind, body, ts_epoch) VALUES ({event})"))
        migrate(database)
        with database.writer.begin() as conn:
            assert conn.execute(text("SELECT seq FROM events ORDER BY seq")).scalars().all() == [7, 8, 9]
            conn.execute(text("DELETE FROM events"))  # pruned: numbering still goes on from 9
            conn.execute(text(f"INSERT INTO events (flow_id, run_number, kind, body, ts_epoch) VALUES ({event})"))
            assert conn.execute(text("SELECT seq FROM events")).scalars().all() == [10]
        downgrade(database, "0004")
        with database.writer.connect() as conn:
            assert conn.execute(text("SELECT seq FROM events")).scalars().all() == [10]
            assert conn.execute(text("SELECT last_seq FROM relay_state")).scalar() == 10
    finally:
        database.dispose()


def test_revision_0007_numbers_new_metadata_among_the_event_rows_and_leaves_older_metadata_out(
    database_url: str,
) -> None:
    """Metadata written after 0007 is numbered by the event rows' counter (on both engines); metadata from
    before had an event row of its own, so it stays out of the log; going back keeps every row, and the
    numbering goes on after the last number handed out, whichever table it went to."""
    from sqlalchemy import insert

    from metaflow_stack.service import event_log
    from metaflow_stack.service import schema as s
    from metaflow_stack.service.event_bus import the_log

    database = connect(database_url)
    event = "'F', 1, 'flow', '{}', 0"
    note = "INSERT INTO metadata (flow_id, run_number, step_name, task_id, field_name, value, type, ts_epoch) "
    try:
        migrate(database, "0006")
        with database.writer.begin() as conn:
            for statement in (
                "INSERT INTO flows (flow_id, ts_epoch) VALUES ('F', 0)",
                "INSERT INTO runs (flow_id, ts_epoch) VALUES ('F', 0)",
                "INSERT INTO steps (run_number, step_name, flow_id, ts_epoch) VALUES (1, 's', 'F', 0)",
                "INSERT INTO tasks (flow_id, run_number, step_name, ts_epoch) VALUES ('F', 1, 's', 0)",
                note + "VALUES ('F', 1, 's', 1, 'before', 'v', 't', 0)",
                f"INSERT INTO events (flow_id, run_number, kind, body, ts_epoch) VALUES ({event})",
            ):
                conn.execute(text(statement))
        migrate(database)
        with database.writer.begin() as conn:
            rows = [
                {"flow_id": "F", "run_number": 1, "step_name": "s", "task_id": 1, "field_name": field}
                | {"value": "v", "type": "t", "ts_epoch": 0}
                for field in ("after", "and after")
            ]
            event_log.number(conn, rows)
            conn.execute(insert(s.metadata_rows), rows)
            event_log.append(conn, "F", 1, "flow", {})
        with database.writer.connect() as conn:
            log = conn.execute(the_log(database.dialect, 0, 10)).all()
            assert [(row.seq, row.kind) for row in log] == [(1, "flow"), (2, "metadata"), (3, "metadata"), (4, "flow")]
            assert json.loads(log[2].data)["body"]["field_name"] == "and after"
            numbers = text("SELECT field_name, seq FROM metadata ORDER BY id")
            assert conn.execute(numbers).all() == [("before", None), ("after", 2), ("and after", 3)]
        with database.writer.begin() as conn:
            last = [rows[0] | {"field_name": "last"}]
            event_log.number(conn, last)
            conn.execute(insert(s.metadata_rows), last)  # number 5, after the last event row
        downgrade(database, "0006")
        with database.writer.begin() as conn:
            conn.execute(text(f"INSERT INTO events (flow_id, run_number, kind, body, ts_epoch) VALUES ({event})"))
            assert conn.execute(text("SELECT seq FROM events ORDER BY seq")).scalars().all() == [1, 4, 6]
            assert conn.execute(text("SELECT count(*) FROM metadata")).scalar() == 4
            conn.execute(text("DELETE FROM events WHERE seq = 6"))  # pruned
        downgrade(database, "0004")  # its relay numbers on from the last number handed out, not the log's last
        with database.writer.connect() as conn:
            assert conn.execute(text("SELECT last_seq FROM relay_state")).scalar() == 6
    finally:
        database.dispose()


#: Text that JSON must escape, or that a hand-made encoding would get wrong.
_AWKWARD = 'say "hi" \\ back\\slash\nnew line\ttab \x01 é 日本 🚀 </script> {"not": "json"} null'


def test_the_log_encodes_any_text_and_null_exactly(database_url: str) -> None:
    """The database writes each event's JSON: quotes, backslashes, control characters, any Unicode, ids by
    their client-chosen names, and SQL NULLs (a JSON column's too) and JSON nulls come out as the values they
    are (on both engines)."""
    from sqlalchemy import insert, null

    from metaflow_stack.service import event_log
    from metaflow_stack.service import schema as s
    from metaflow_stack.service.event_bus import the_log

    database = connect(database_url)
    try:
        migrate(database)
        with database.writer.begin() as conn:
            conn.execute(insert(s.flows).values(flow_id="F", ts_epoch=0))
            conn.execute(insert(s.runs).values(flow_id="F", run_id=_AWKWARD, ts_epoch=0))
            conn.execute(insert(s.steps).values(run_number=1, step_name="s", flow_id="F", run_id=_AWKWARD, ts_epoch=0))
            conn.execute(insert(s.tasks).values(flow_id="F", run_number=1, step_name="s", task_name="t 1", ts_epoch=0))
            ids = {"flow_id": "F", "run_number": 1, "run_id": _AWKWARD, "step_name": "s", "task_id": 1}
            rows = [
                ids
                | {"task_name": "t 1", "field_name": "attempt_ok", "value": "True", "type": _AWKWARD}
                | {"user_name": _AWKWARD, "tags": [_AWKWARD, "attempt_id:0"], "system_tags": {"k": [1, None]}}
                | {"ts_epoch": 7, "attempt_id": None},
                ids
                | {"task_name": None, "field_name": "note", "value": _AWKWARD, "type": "t", "user_name": None}
                | {"tags": null(), "system_tags": None, "ts_epoch": 8, "attempt_id": 2},
            ]
            event_log.number(conn, rows)
            conn.execute(insert(s.metadata_rows), rows)
            event_log.append(conn, "F", None, "flow", {"name": _AWKWARD, "nested": [{"x": None}, 1.5, True]})
        with database.writer.connect() as conn:
            log = conn.execute(the_log(database.dialect, 0, 10)).all()
            numbers = conn.execute(text("SELECT id FROM metadata ORDER BY id")).scalars().all()
        events = [json.loads(row.data) for row in log]
        assert [(e["seq"], e["kind"], e["flow_id"], e["run_number"]) for e in events] == [
            (log[0].seq, "metadata", "F", 1),
            (log[0].seq + 1, "metadata", "F", 1),
            (log[0].seq + 2, "flow", "F", None),
        ]
        first = {"id": numbers[0], "flow_id": "F", "run_number": _AWKWARD, "step_name": "s", "task_id": "t 1"}
        first |= {"field_name": "attempt_ok", "value": "True", "type": _AWKWARD, "user_name": _AWKWARD}
        first |= {"ts_epoch": 7, "tags": [_AWKWARD, "attempt_id:0"], "system_tags": {"k": [1, None]}}
        second = {"id": numbers[1], "flow_id": "F", "run_number": _AWKWARD, "step_name": "s", "task_id": 1}
        second |= {"field_name": "note", "value": _AWKWARD, "type": "t", "user_name": None, "ts_epoch": 8}
        second |= {"tags": None, "system_tags": None}
        assert events[0]["body"] == first | {"attempt_id": None, "status": "completed"}
        assert events[1]["body"] == second | {"attempt_id": 2, "status": None}
        assert events[2]["body"] == {"name": _AWKWARD, "nested": [{"x": None}, 1.5, True]}
        assert [e["ts_epoch"] for e in events[:2]] == [7, 8]
    finally:
        database.dispose()


@pytest.mark.slow
def test_a_page_walk_under_concurrent_inserts_sees_every_run_once(database_url: str, service_factory) -> None:
    service = service_factory(database_url)
    http = httpx.Client(base_url=service.url, timeout=30)
    http.post("/flows/PageFlow", json={})
    before = [http.post("/flows/PageFlow/run", json={"user_name": "ana"}).json()["run_number"] for _ in range(600)]
    stop = threading.Event()
    inserted: list[int] = []

    def insert() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as writer:
            while not stop.is_set():
                inserted.append(writer.post("/flows/PageFlow/run", json={"user_name": "bo"}).json()["run_number"])

    writers = [threading.Thread(target=insert) for _ in range(2)]
    for thread in writers:
        thread.start()
    seen: list[int] = []
    cursor = None
    while True:
        params = {"_limit": 25, **({"_cursor": cursor} if cursor else {})}
        answer = http.get("/flows/PageFlow/runs", params=params)
        assert answer.status_code == 200, answer.text
        seen += [r["run_number"] for r in answer.json()]
        cursor = answer.headers.get("X-Next-Cursor")
        if not cursor:
            break
    stop.set()
    for thread in writers:
        thread.join()
    assert inserted, "the writers ran during the walk"
    assert len(seen) == len(set(seen)), "no run twice"
    assert set(before) <= set(seen), "every run that existed when the walk began"
    assert set(seen) <= set(before) | set(inserted)


def test_serve_names_an_unreachable_database_in_one_line() -> None:
    from conftest import free_port, run_cli

    result = run_cli("service", "serve", "--database", f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    assert result.returncode == 1
    assert "error: cannot use the database postgresql+psycopg://nobody@127.0.0.1" in result.stderr
    assert "fix: check --database" in result.stderr and "Traceback" not in result.stderr
    wrong = run_cli("service", "migrate", "--database", "mysql://x/y")
    assert wrong.returncode == 1 and "unsupported database URL scheme 'mysql'" in wrong.stderr
