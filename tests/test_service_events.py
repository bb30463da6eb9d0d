"""Events: every committed write is published once, in order, with a sequence
number; streams resume with ``since``; nothing is lost while NATS restarts or
while the database replica a stream reads from lags behind."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import httpx
import pytest
from conftest import LOOPBACK, need
from sqlalchemy import text

pytestmark = pytest.mark.slow


def _write_runs(url: str, flow: str, runs: int, tasks: int) -> list[int]:
    """Runs, each with a step and ``tasks`` tasks that start and finish; returns the run numbers."""
    with httpx.Client(base_url=url, timeout=30) as http:
        http.post(f"/flows/{flow}", json={})
        numbers = []
        for _ in range(runs):
            number = http.post(f"/flows/{flow}/run", json={"system_tags": ["metaflow_version:2.19.0"]}).json()[
                "run_number"
            ]
            http.post(f"/flows/{flow}/runs/{number}/steps/fan/step", json={})
            for _ in range(tasks):
                task = http.post(f"/flows/{flow}/runs/{number}/steps/fan/task", json={}).json()["task_id"]
                path = f"/flows/{flow}/runs/{number}/steps/fan/tasks/{task}/metadata"
                tags = ["attempt_id:0"]
                assert (
                    http.post(
                        path, json=[{"field_name": "attempt", "value": "0", "type": "a", "tags": tags}]
                    ).status_code
                    == 200
                )
                ok = [{"field_name": "attempt_ok", "value": "True", "type": "b", "tags": tags}]
                assert http.post(path, json=ok).status_code == 200
            numbers.append(number)
        return numbers


def _events_per_run(tasks: int) -> int:
    # run, step, then per task: task, and its two metadata rows (attempt, attempt_ok), each its own event
    return 2 + tasks * 3


class Collector:
    """Reads ``/events`` on a thread until told to stop."""

    def __init__(self, url: str, **params: str) -> None:
        self.events: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, params), daemon=True)
        self._thread.start()

    def _read(self, url: str, params: dict[str, str]) -> None:
        try:
            with httpx.stream("GET", f"{url}/events", params=params, timeout=httpx.Timeout(5, read=60)) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
                    if self._stop.is_set():
                        return
        except httpx.HTTPError:
            if not self._stop.is_set():
                raise  # the service went away before the test was done

    def wait_for(self, count: int, seconds: float = 60) -> list[dict]:
        deadline = time.monotonic() + seconds
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        return self.events


def _check_order(events: list[dict], runs: list[int], tasks: int) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "contiguous, in order, no repeats"
    for number in runs:
        mine = [e for e in events if e["run_number"] == number]
        assert len(mine) == _events_per_run(tasks)
        assert mine[0]["kind"] == "run" and mine[-1]["kind"] == "metadata"
        statuses = [(e["body"]["field_name"], e["body"]["status"]) for e in mine if e["kind"] == "metadata"]
        assert statuses == [("attempt", "running"), ("attempt_ok", "completed")] * tasks


def _check_metadata_bodies(url: str, events: list[dict]) -> None:
    """A metadata event's body is the metadatum as the API answers it, with its attempt and the status it sets."""
    notes = [e for e in events if e["kind"] == "metadata"]
    assert notes
    with httpx.Client(base_url=url, timeout=30) as http:
        for event in notes[:4] + notes[-2:]:
            body = event["body"]
            task = (
                f"/flows/{body['flow_id']}/runs/{body['run_number']}/steps/{body['step_name']}/tasks/{body['task_id']}"
            )
            stored = {m["id"]: m for m in http.get(f"{task}/metadata").json()}
            extra = {"attempt_id": 0, "status": "running" if body["field_name"] == "attempt" else "completed"}
            assert body == stored[body["id"]] | extra


def test_sse_delivers_every_write_in_order_and_resumes(service_factory) -> None:
    service = service_factory()
    live = Collector(service.url, since="0")
    threads = [threading.Thread(target=_write_runs, args=(service.url, f"Flow{i}", 2, 3)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = 3 * (1 + 2 * _events_per_run(3))  # each flow: its own event, then its runs
    events = live.wait_for(expected)
    assert len(events) == expected
    for flow in ("Flow0", "Flow1", "Flow2"):
        runs = sorted({e["run_number"] for e in events if e["flow_id"] == flow and e["run_number"]})
        _check_order(events, runs, 3)
    _check_metadata_bodies(service.url, events)
    # Resuming after seq 10 replays exactly what followed; a run-scoped stream sees only its run.
    resumed = Collector(service.url, since="10").wait_for(expected - 10)
    assert [e["seq"] for e in resumed] == [e["seq"] for e in events[10:]]
    one_run = events[-1]["run_number"]
    scoped = Collector(service.url, since="0", run=str(one_run)).wait_for(_events_per_run(3))
    assert {e["run_number"] for e in scoped} == {one_run} and len(scoped) == _events_per_run(3)


async def _stored(nats_url: str, expected: int) -> list[tuple[dict, str]]:
    """The first ``expected`` events JetStream holds, in order, each with the subject it was stored on."""
    import nats
    from nats.js.errors import NotFoundError

    connection = await nats.connect(nats_url)
    jetstream = connection.jetstream()
    deadline = time.monotonic() + 10
    while True:
        try:  # the service's relay declares the stream once it has connected
            subscription = await jetstream.subscribe("metaflow.events.>", ordered_consumer=True)
            break
        except NotFoundError:
            assert time.monotonic() < deadline, "the service declares its JetStream stream"
            await asyncio.sleep(0.1)
    found: dict[int, tuple[dict, str]] = {}
    while len(found) < expected:
        message = await subscription.next_msg(timeout=10)
        for event in json.loads(message.data):  # a message holds a stretch of one run's events
            assert event["seq"] > max(found, default=0) or event["seq"] in found, "never out of order"
            found.setdefault(event["seq"], (event, message.subject))
    await connection.close()
    return list(found.values())


def test_writes_succeed_while_nats_is_down_and_events_follow_in_order(service_factory, nats_server) -> None:
    import asyncio

    service = service_factory(nats_url=nats_server.url)
    live = Collector(service.url, since="0")
    first = _write_runs(service.url, "Before", 2, 2)
    nats_server.stop()
    during = _write_runs(service.url, "During", 2, 2)  # every write still answers 200
    deadline = time.monotonic() + 20
    while not (said := httpx.get(f"{service.url}/healthcheck").json()["events"]["error"]):
        assert time.monotonic() < deadline, "the relay reports the broker down"
        time.sleep(0.2)
    assert said.isidentifier(), said  # (its kind only: the route is open, and a driver's text names hosts)
    nats_server.start()
    after = _write_runs(service.url, "After", 1, 2)
    expected = 3 + 5 * _events_per_run(2)
    events = live.wait_for(expected, seconds=90)
    assert len(events) == expected
    _check_order(events, first + during + after, 2)

    durable = [event for event, _ in asyncio.run(_stored(nats_server.url, expected))]
    assert [e["seq"] for e in durable] == list(range(1, expected + 1)), "JetStream holds every event, in order"


def _replica_caught_up(primary: str, replica: str, seconds: float = 30) -> None:
    """Wait until the replica has replayed everything the primary has written so far (its WAL position)."""
    import psycopg

    with psycopg.connect(primary) as conn:
        written = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    deadline = time.monotonic() + seconds
    while True:
        try:
            with psycopg.connect(replica) as conn:
                if conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (written,)).fetchone()[0]:
                    return
        except psycopg.OperationalError:  # the database itself has not reached the replica yet
            pass
        assert time.monotonic() < deadline, "the replica did not catch up"
        time.sleep(0.05)


def test_a_stream_reading_a_lagging_replica_waits_and_drops_nothing(service_factory, postgres, lagging_replica) -> None:
    primary = postgres.create_database()
    replica = primary.replace(f":{postgres.port}/", f":{lagging_replica.port}/")
    service = service_factory(primary, read_database=replica)
    _replica_caught_up(primary, replica)  # the new database, and the service's migration, reached it
    live = Collector(service.url, since="0")
    runs = _write_runs(service.url, "Lagging", 3, 2)
    # What a client just wrote it can read at once: single objects come from the primary.
    assert httpx.get(f"{service.url}/flows/Lagging/runs/{runs[-1]}").status_code == 200
    expected = 1 + 3 * _events_per_run(2)
    events = live.wait_for(expected, seconds=90)
    assert len(events) == expected
    _check_order(events, runs, 2)
    _replica_caught_up(primary, replica)  # the metadata to compare with is read from the replica
    _check_metadata_bodies(service.url, events)


def test_pruning_drops_old_published_events_and_numbering_goes_on(tmp_path) -> None:
    from fastapi.testclient import TestClient
    from sqlalchemy import text

    from metaflow_stack.service.app import ServiceConfig, create_app

    app = create_app(ServiceConfig(database_url=str(tmp_path / "m.db")))
    db = app.state.store.db

    def published() -> list[int]:
        deadline = time.monotonic() + 10
        with db.reader.connect() as conn:  # the writer's pool is the relay's
            while conn.execute(text("SELECT (SELECT max(seq) FROM events) - published_seq FROM relay_state")).scalar():
                assert time.monotonic() < deadline, "the relay publishes the log"
                time.sleep(0.05)
                conn.rollback()
            return conn.execute(text("SELECT seq FROM events ORDER BY seq")).scalars().all()

    def replayed(last: int) -> list[int]:
        """What ``since=0`` replays, read until ``last``."""
        with client.stream("GET", "/events", params={"since": "0"}) as stream:
            seqs = []
            for line in stream.iter_lines():
                if line.startswith("id: "):
                    seqs.append(int(line[4:]))
                if seqs and seqs[-1] == last:
                    return seqs

    with TestClient(app, base_url=LOOPBACK) as client:
        for flow in ("A", "B"):
            assert client.post(f"/flows/{flow}", json={}).status_code == 200
        client.post("/flows/A/run", json={})
        client.post("/flows/A/runs/1/steps/s/step", json={})
        client.post("/flows/A/runs/1/steps/s/task", json={})
        metadata = [{"field_name": f, "value": "0", "type": "t", "tags": []} for f in ("a", "b")]
        assert client.post("/flows/A/runs/1/steps/s/tasks/1/metadata", json=metadata).status_code == 200
        assert client.post("/flows/C", json={}).status_code == 200
        # Event rows 1-5, the metadata rows numbered 6 and 7 as their own events, then C's event row.
        assert published() == [1, 2, 3, 4, 5, 8]
        assert replayed(8) == list(range(1, 9))
        assert app.state.hub.prune(retention_s=3600) == 0  # young events stay
        time.sleep(0.01)  # the events are now older than "0 s ago", to the millisecond
        assert app.state.hub.prune(retention_s=0) == 6
        assert client.post("/flows/D", json={}).status_code == 200
        assert published() == [9]  # numbers are never handed out twice
        assert replayed(9) == [9]  # the metadata rows stay, as data, but left the log with what was pruned
        assert [m["field_name"] for m in client.get("/flows/A/runs/1/steps/s/tasks/1/metadata").json()] == ["a", "b"]


#: A row trigger runs after the defaults and before the row is written (which would assign an id): it sees
#: the transaction's id only if the number's default took it first.
NO_ID_NO_EVENT = """
CREATE FUNCTION no_id_no_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_current_xact_id_if_assigned() IS NULL THEN
        RAISE EXCEPTION 'event % numbered before its transaction took an id', NEW.seq;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER no_id_no_event BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION no_id_no_event();
CREATE TRIGGER no_id_no_event BEFORE INSERT ON metadata FOR EACH ROW EXECUTE FUNCTION no_id_no_event();
"""
#: A task to write metadata to, inserted as rows (no events).
A_TASK = """
INSERT INTO flows (flow_id, ts_epoch) VALUES ('F', 0);
INSERT INTO runs (flow_id, ts_epoch) VALUES ('F', 0);
INSERT INTO steps (run_number, step_name, flow_id, ts_epoch) VALUES (1, 's', 'F', 0);
INSERT INTO tasks (flow_id, run_number, step_name, ts_epoch) VALUES ('F', 1, 's', 0);
"""


def test_the_relay_waits_for_a_number_still_in_flight_and_skips_one_rolled_back(postgres) -> None:
    from sqlalchemy import insert

    from metaflow_stack.service import event_log
    from metaflow_stack.service import schema as s
    from metaflow_stack.service.database import connect, migrate
    from metaflow_stack.service.events import EventHub

    database = connect(postgres.create_database())
    migrate(database)
    hub = EventHub(database, None)

    def pending() -> list[int]:
        return [event.seq for event in hub._pending()]

    def append(conn, flow: str) -> None:
        event_log.append(conn, flow, None, "flow", {"flow_id": flow})

    def note(conn, field: str) -> None:
        """A metadata row: its own event, numbered by the same counter."""
        rows = [{"flow_id": "F", "run_number": 1, "step_name": "s", "task_id": 1, "field_name": field}]
        rows[0] |= {"value": "v", "type": "t", "ts_epoch": 0}
        event_log.number(conn, rows)
        conn.execute(insert(s.metadata_rows), rows)

    try:
        # Each write below is the first of its transaction. (Number 1 checks nothing: the first nextval
        # of a sequence logs it, which takes an id; the sequence logs again only every 32 numbers.)
        with database.writer.begin() as conn:
            conn.execute(text(NO_ID_NO_EVENT))
            conn.execute(text(A_TASK))
        with database.writer.connect() as slow:
            slow_write = slow.begin()
            note(slow, "slow")  # takes number 1 and stays open
            with database.writer.begin() as fast:
                append(fast, "Fast")  # number 2, committed first
            assert pending() == [] and pending() == []  # 1 may still commit: nothing after it goes out
            slow_write.commit()
        assert pending() == [1, 2]
        hub._mark(2)
        with database.writer.connect() as failed:
            failed_write = failed.begin()
            note(failed, "failed")  # number 3
            failed_write.rollback()
        with database.writer.begin() as conn:
            append(conn, "After")  # number 4
        # The first look finds the hole and notes who was open; once they all ended, 3 is known rolled back.
        assert pending() == []
        assert pending() == [4]
    finally:
        hub.close_connection()
        database.dispose()


def test_an_event_the_broker_refuses_is_parked_and_the_ones_after_it_go_out(service_factory, tmp_path) -> None:
    import asyncio

    from devservers import nats_server

    from metaflow_stack.service.event_bus import subject_token

    need("nats-server", shutil.which("nats-server") is not None, "apt-get install nats-server")
    with nats_server(tmp_path / "nats", max_payload=4096) as broker:
        service = service_factory(nats_url=broker.url)
        with httpx.Client(base_url=service.url, timeout=30) as http:
            assert http.post("/flows/Big", json={}).status_code == 200
            # Its run event (8 KB of tags) is over the broker's 4 KB limit: refused, whatever the retries.
            big = http.post("/flows/Big/run", json={"tags": ["t" * 1000 + str(i) for i in range(8)]}).json()
            # Flow names are Python identifiers, not always NATS tokens: this one travels encoded.
            assert http.post("/flows/Flüsse", json={}).status_code == 200
            small = http.post("/flows/Flüsse/run", json={}).json()["run_number"]
            stored = asyncio.run(_stored(broker.url, 3))
            assert [(event["kind"], event["flow_id"]) for event, _ in stored] == [
                ("flow", "Big"),
                ("flow", "Flüsse"),
                ("run", "Flüsse"),
            ]
            assert stored[2][1] == f"metaflow.events.{subject_token('Flüsse')}.{small}"
            assert subject_token("Flüsse").startswith("~") and "." not in subject_token("a..b")

            # The refused message is retried alone and parked after the batch's other messages went out.
            deadline = time.monotonic() + 30
            while not (parked := http.get("/admin/parked-events").json()["events"]) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert [(e["kind"], e["body"]["run_number"]) for e in parked] == [("run", big["run_number"])]
            assert "MaxPayloadError" in parked[0]["reason"]
            metrics = http.get("/metrics").text
            assert "metaflow_service_events_parked_total 1.0" in metrics
            assert "metaflow_service_relay_up 1.0" in metrics
            # The log keeps the parked event: a stream replaying from it still sees everything, in order.
            replayed = Collector(service.url, since="0").wait_for(4)
            assert [e["seq"] for e in replayed] == [1, 2, 3, 4]


def test_a_stream_too_slow_for_its_buffer_is_told_where_to_resume(tmp_path) -> None:
    import asyncio

    from starlette.requests import Request

    from metaflow_stack.service.database import connect, migrate
    from metaflow_stack.service.events import EventHub
    from metaflow_stack.service.streams import STREAM_BUFFER

    async def connected() -> dict:
        return {"type": "http.request", "body": b"", "more_body": True}

    async def scenario() -> list[bytes]:
        database = connect(str(tmp_path / "m.db"))
        migrate(database)
        hub = EventHub(database, None)
        request = Request({"type": "http", "query_string": b"since=", "headers": []}, connected)
        subscription = await hub.subscribe(Request({"type": "http", "query_string": b"", "headers": []}))
        subscription.since = 0  # replays the (empty) log first, then reads its buffer
        event = {"seq": 1, "kind": "run", "flow_id": "F", "run_number": 1, "ts_epoch": 0, "body": {}}
        for seq in range(1, STREAM_BUFFER + 2):  # the stream reads none of them meanwhile
            hub._fan_out({**event, "seq": seq})
        assert hub.overflows == 1 and subscription.queue.qsize() == 1  # the buffer was dropped, not grown
        return [chunk async for chunk in hub.events(request, subscription)]

    frames = asyncio.run(scenario())
    assert frames == [b'event: resume\ndata: {"since": 0, "reason": "more than 10000 events unread"}\n\n']


def test_past_its_most_streams_a_server_answers_503_and_a_large_replay_goes_out_in_bounded_writes(
    tmp_path, monkeypatch
) -> None:
    """Streams are held without bound no more (2,000 clients that read nothing took 4.7 GB), and a page of
    large events is sent in writes of a MiB or so, not joined whole."""
    import asyncio

    from starlette.requests import Request

    from metaflow_stack.api_errors import ApiError
    from metaflow_stack.service import streams
    from metaflow_stack.service.database import connect, migrate
    from metaflow_stack.service.event_bus import Logged
    from metaflow_stack.service.events import EventHub

    monkeypatch.setattr(streams, "MAX_STREAMS", 2)

    async def scenario() -> int:
        database = connect(str(tmp_path / "m.db"))
        migrate(database)
        hub = EventHub(database, None)
        for _ in range(2):
            await hub.subscribe(Request({"type": "http", "query_string": b"", "headers": []}))
        try:
            await hub.subscribe(Request({"type": "http", "query_string": b"", "headers": []}))
        except ApiError as refused:
            return refused.status
        return 200

    assert asyncio.run(scenario()) == 503
    page = [Logged(seq, "x", "F", 1, "d" * 300_000) for seq in range(1, 11)]
    writes = list(streams._writes(page))
    assert len(writes) == 3 and all(len(w) <= streams.WRITE_BYTES + 300_100 for w in writes)
    assert b"".join(writes).count(b"\nid: ") == 10


def test_replaying_a_million_events_streams_in_bounded_memory(service_factory, tmp_path) -> None:
    import psutil
    from sqlalchemy import insert, update

    from metaflow_stack.service import schema as s
    from metaflow_stack.service.database import connect, migrate

    total = 1_000_000
    database = connect(str(tmp_path / "big.db"))
    migrate(database)
    now = int(time.time() * 1000)  # young enough that the service's pruning keeps them
    with database.writer.begin() as conn:
        for start in range(1, total + 1, 50_000):
            rows = [
                {"seq": seq, "flow_id": "F", "run_number": 1, "kind": "x", "body": {}, "ts_epoch": now}
                for seq in range(start, min(start + 50_000, total + 1))
            ]
            conn.execute(insert(s.events), rows)
        conn.execute(update(s.relay_state).values(published_seq=total))
    database.dispose()

    service = service_factory(str(tmp_path / "big.db"))
    server = psutil.Process(service.process.pid)
    before, peak, seen, last = server.memory_info().rss, 0, 0, b""
    started = time.monotonic()
    with httpx.stream("GET", f"{service.url}/events", params={"since": "0"}, timeout=httpx.Timeout(10, read=60)) as sse:
        for chunk in sse.iter_bytes():
            if not seen:
                first_byte_s = time.monotonic() - started
            seen += (last[-4:] + chunk).count(b"\nid: ")  # a frame's id line may straddle two chunks
            last = (last + chunk)[-200:]
            if seen % 50_000 < 1000:
                peak = max(peak, server.memory_info().rss)
            if seen >= total or time.monotonic() - started > 300:
                break
    assert seen == total and b"id: 1000000\n" in last
    assert first_byte_s < 5, "the first page goes out before the rest is read"
    assert peak - before < 150 * 1024 * 1024, f"the service grew by {(peak - before) >> 20} MiB"
