"""Events: every committed write is published once, in order, with a sequence
number; streams resume with ``since``; nothing is lost while NATS restarts or
while the database replica a stream reads from lags behind."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

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
    # run, step, then per task: task, metadata + task-status (attempt), metadata + task-status (attempt_ok)
    return 2 + tasks * 5


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
        assert [e["run_seq"] for e in mine] == list(range(1, _events_per_run(tasks) + 1))
        assert mine[0]["kind"] == "run" and mine[-1]["kind"] == "task-status"


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
    # Resuming after seq 10 replays exactly what followed; a run-scoped stream sees only its run.
    resumed = Collector(service.url, since="10").wait_for(expected - 10)
    assert [e["seq"] for e in resumed] == [e["seq"] for e in events[10:]]
    one_run = events[-1]["run_number"]
    scoped = Collector(service.url, since="0", run=str(one_run)).wait_for(_events_per_run(3))
    assert {e["run_number"] for e in scoped} == {one_run} and len(scoped) == _events_per_run(3)


def test_writes_succeed_while_nats_is_down_and_events_follow_in_order(service_factory, nats_server) -> None:
    import asyncio

    service = service_factory(nats_url=nats_server.url)
    live = Collector(service.url, since="0")
    first = _write_runs(service.url, "Before", 2, 2)
    nats_server.stop()
    during = _write_runs(service.url, "During", 2, 2)  # every write still answers 200
    deadline = time.monotonic() + 20
    while not httpx.get(f"{service.url}/healthcheck").json()["events"]["error"]:
        assert time.monotonic() < deadline, "the relay reports the broker down"
        time.sleep(0.2)
    nats_server.start()
    after = _write_runs(service.url, "After", 1, 2)
    expected = 3 + 5 * _events_per_run(2)
    events = live.wait_for(expected, seconds=90)
    assert len(events) == expected
    _check_order(events, first + during + after, 2)

    async def stored() -> list[dict]:
        import nats

        connection = await nats.connect(nats_server.url)
        jetstream = connection.jetstream()
        subscription = await jetstream.subscribe("metaflow.events.>", ordered_consumer=True)
        found: dict[int, dict] = {}
        while len(found) < expected:
            message = await subscription.next_msg(timeout=10)
            for event in json.loads(message.data):  # a message holds a stretch of one run's events
                assert event["seq"] > max(found, default=0) or event["seq"] in found, "never out of order"
                found.setdefault(event["seq"], event)
        await connection.close()
        return list(found.values())

    durable = asyncio.run(stored())
    assert [e["seq"] for e in durable] == list(range(1, expected + 1)), "JetStream holds every event, in order"


def test_a_stream_reading_a_lagging_replica_waits_and_drops_nothing(service_factory, postgres, lagging_replica) -> None:
    primary = postgres.create_database()
    replica = primary.replace(f":{postgres.port}/", f":{lagging_replica.port}/")
    service = service_factory(primary, read_database=replica)
    time.sleep(1)  # the new database reaches the replica
    live = Collector(service.url, since="0")
    runs = _write_runs(service.url, "Lagging", 3, 2)
    # What a client just wrote it can read at once: single objects come from the primary.
    assert httpx.get(f"{service.url}/flows/Lagging/runs/{runs[-1]}").status_code == 200
    expected = 1 + 3 * _events_per_run(2)
    events = live.wait_for(expected, seconds=90)
    assert len(events) == expected
    _check_order(events, runs, 2)


def test_pruning_drops_old_published_events_and_numbering_goes_on(tmp_path) -> None:
    from fastapi.testclient import TestClient
    from sqlalchemy import text

    from metaflow_stack.service.app import ServiceConfig, create_app

    app = create_app(ServiceConfig(database_url=str(tmp_path / "m.db")))
    db = app.state.store.db

    def published() -> list[int]:
        deadline = time.monotonic() + 10
        with db.reader.connect() as conn:  # the writer's pool is the relay's
            while conn.execute(text("SELECT count(*) FROM outbox")).scalar() or (
                conn.execute(text("SELECT last_seq - published_seq FROM relay_state")).scalar()
            ):
                assert time.monotonic() < deadline, "the relay publishes the outbox"
                time.sleep(0.05)
                conn.rollback()
            return conn.execute(text("SELECT seq FROM events ORDER BY seq")).scalars().all()

    with TestClient(app) as client:
        for flow in ("A", "B", "C"):
            assert client.post(f"/flows/{flow}", json={}).status_code == 200
        assert published() == [1, 2, 3]
        assert app.state.hub.prune(retention_s=3600) == 0  # young events stay
        time.sleep(0.01)  # the events are now older than "0 s ago", to the millisecond
        assert app.state.hub.prune(retention_s=0) == 3
        assert client.post("/flows/D", json={}).status_code == 200
        assert published() == [4]  # numbers are never handed out twice
