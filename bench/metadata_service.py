"""The metadata service at scale, against what Metaflow users have today.

On one throwaway PostgreSQL (fsync on) and, when installed, NATS JetStream:

- pages of 100k runs: the first and the deepest page end to end over HTTP,
  the keyset query beside the OFFSET query upstream's master uses, and the
  unpaginated listing the stock client asks for;
- the failed tasks of a 10k-task foreach: one ``/failures`` request, against
  the metadata requests the stock Client API makes (``Task.successful`` on
  every task; its datastore reads are not counted);
- writes with events at 1 and 8 writer processes: this service's metadata
  write (the row numbered as its own event in the log, with the relay
  running throughout, as it runs for a service's life) against the same
  insert with the reference UI backend's ``pg_notify`` trigger and a
  listener draining it, and against the same row with no event at all;
  the same numbered write with the relay held back until the slice ends
  (the write's own share of the cost), and the CPU the event path spends
  per event (the relay's process, PostgreSQL, the broker) catching up a
  written log: what it takes from writers on the same cores;
- event fan-out: logged events delivered to 8 SSE subscribers;
- the last 100 lines of a 1 GB task log: one ``tail=100`` request, against
  Metaflow's Client API (``Task.loglines``, which reads the whole log).

    python bench/metadata_service.py [--runs 100000] [--tasks 10000] [--seconds 2] [--rounds 9] [--log-mb 1024]
                                     [--only pages,failures,fan-out,logs,writes]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import psycopg
import requests
from rich.console import Console
from rich.table import Table

from metaflow_stack.datastore.cursors import encode_cursor
from metaflow_stack.service.database import connect, migrate
from metaflow_stack.service.events import EventHub

# The throwaway servers the tests use (tests/devservers.py): not shipped in the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from devservers import NatsServer, PostgresServer, free_port, nats_server, postgres_cluster

console = Console(stderr=True)
FLOW = "BenchFlow"
TAGS = '["team:bench"]'
SYSTEM_TAGS = '["user:bench", "runtime:dev", "metaflow_version:2.19.39"]'

NOTIFY_SCHEMA = """
CREATE TABLE metadata_v3 (
    flow_id VARCHAR(255), run_number BIGINT, run_id VARCHAR(255), step_name VARCHAR(255),
    task_id BIGINT, task_name VARCHAR(255), id BIGSERIAL, field_name VARCHAR(255), value TEXT,
    type VARCHAR(255), user_name VARCHAR(255), ts_epoch BIGINT, tags JSONB, system_tags JSONB,
    PRIMARY KEY (id, flow_id, run_number, step_name, task_id, field_name)
);
CREATE FUNCTION notify_ui() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('notify', json_build_object(
        'table', TG_TABLE_NAME, 'operation', TG_OP,
        'data', json_build_object('flow_id', NEW.flow_id, 'run_number', NEW.run_number,
            'step_name', NEW.step_name, 'task_id', NEW.task_id, 'field_name', NEW.field_name,
            'value', NEW.value, 'tags', NEW.tags))::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER notify_ui AFTER INSERT ON metadata_v3 FOR EACH ROW EXECUTE PROCEDURE notify_ui();
"""


def median_ms(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


# -- data ---------------------------------------------------------------------


def copy_rows(cur, table: str, columns: str, rows) -> None:
    """``COPY table (columns) FROM STDIN`` of ``rows``."""
    with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def load(url: str, runs: int, tasks: int) -> int:
    """``runs`` runs of one flow, and one more run with a ``tasks``-task foreach of which 3 failed."""
    now = int(time.time() * 1000) - runs * 10
    common = "user_name, ts_epoch, tags, system_tags"
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        copy_rows(cur, "flows", f"flow_id, {common}", [(FLOW, "bench", now, "[]", "[]")])
        copy_rows(
            cur,
            "runs",
            f"flow_id, {common}, end_status",
            ((FLOW, "bench", now + i * 10, TAGS, SYSTEM_TAGS, "completed") for i in range(runs)),
        )
        cur.execute(
            f"INSERT INTO runs (flow_id, {common}, end_status) VALUES (%s, 'bench', %s, %s, %s, 'failed') "
            "RETURNING run_number",
            (FLOW, now + runs * 10, TAGS, SYSTEM_TAGS),
        )
        run = cur.fetchone()[0]
        copy_rows(
            cur, "steps", f"run_number, step_name, flow_id, {common}", [(run, "fan", FLOW, "bench", now, "[]", "[]")]
        )
        failed = {tasks // 4, tasks // 2, tasks - 7}
        copy_rows(
            cur,
            "tasks",
            f"flow_id, run_number, step_name, {common}, attempt, attempt_ok, finished_at",
            ((FLOW, run, "fan", "bench", now + i, "[]", "[]", 0, i not in failed, now + i + 5) for i in range(tasks)),
        )
        cur.execute("SELECT task_id FROM tasks WHERE run_number = %s ORDER BY task_id", (run,))
        ids = [r[0] for r in cur.fetchall()]

        def metadata_rows():
            tags = '["attempt_id:0"]'
            for i, task_id in enumerate(ids):
                fields = [("attempt", "0", "attempt"), ("attempt_ok", str(i not in failed), "internal_attempt_status")]
                if i in failed:
                    fields.append(
                        ("exception", json.dumps({"type": "ValueError", "message": f"item {i}"}), "exception")
                    )
                for field, value, kind in fields:
                    yield (FLOW, run, "fan", task_id, field, value, kind, 0, "bench", now, tags, "[]")

        copy_rows(
            cur,
            "metadata",
            f"flow_id, run_number, step_name, task_id, field_name, value, type, attempt_id, {common}",
            metadata_rows(),
        )
        base = ("bench", now, "[]", "[]")
        copy_rows(
            cur,
            "artifacts",
            f"flow_id, run_number, step_name, task_id, attempt_id, name, location, ds_type, sha, type, {common}",
            (
                (FLOW, run, "fan", task_id, 0, name, ":root:/nowhere", "local", name, "metaflow.artifact", *base)
                for task_id in ids
                for name in ("name", "_success")
            ),
        )
        # The history counts as published: its metadata rows were numbered as events as they were copied in.
        cur.execute("UPDATE relay_state SET published_seq = (SELECT last_value FROM events_seq)")
        conn.commit()
        cur.execute("ANALYZE")
    return run


def start_service(url: str, log: Path, log_root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    metaflow = str(Path(sys.executable).with_name("metaflow"))
    process = subprocess.Popen(
        [metaflow, "service", "serve", "--database", url, "--port", str(port), "--log-root", str(log_root)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/healthcheck", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the service did not start: {log.read_text()[-2000:]}")


# -- pages and failures ---------------------------------------------------------


def pages(url: str, base: str, runs: int) -> list[tuple[str, str, str, str]]:
    http = httpx.Client(base_url=base, timeout=120)
    database = connect(url)
    with database.reader.connect() as conn:
        ts, number = conn.exec_driver_sql(
            "SELECT ts_epoch, run_number FROM runs WHERE flow_id = %(f)s ORDER BY ts_epoch DESC, run_number DESC "
            "OFFSET %(o)s LIMIT 1",
            {"f": FLOW, "o": runs - 50},
        ).one()
    deepest = encode_cursor([ts, number])

    def first() -> None:
        assert len(http.get("/flows/BenchFlow/runs", params={"_limit": 50}).json()) == 50

    def deep() -> None:
        assert len(http.get("/flows/BenchFlow/runs", params={"_limit": 50, "_cursor": deepest}).json()) == 50

    first_ms, deep_ms = median_ms(first, 50), median_ms(deep, 50)
    keyset_sql = (
        "SELECT * FROM runs WHERE flow_id = %(f)s AND (ts_epoch, run_number) < (%(t)s, %(n)s) "
        "ORDER BY ts_epoch DESC, run_number DESC LIMIT 50"
    )
    offset_sql = (
        "SELECT * FROM runs WHERE flow_id = %(f)s ORDER BY ts_epoch DESC, run_number DESC LIMIT 50 OFFSET %(o)s"
    )
    with psycopg.connect(url) as conn:
        keyset_ms = median_ms(lambda: conn.execute(keyset_sql, {"f": FLOW, "t": ts, "n": number}).fetchall(), 50)
        offset_ms = median_ms(lambda: conn.execute(offset_sql, {"f": FLOW, "o": runs - 50}).fetchall(), 50)
    sizes = []

    def whole() -> None:
        sizes.append(len(http.get("/flows/BenchFlow/runs").content))

    whole_ms = median_ms(whole, 3)
    database.dispose()
    return [
        (
            "first page of 50 (HTTP)",
            f"{first_ms:.1f} ms",
            f"{whole_ms:,.0f} ms for all {runs + 1:,} runs ({sizes[0] / 1e6:.1f} MB)",
            "< 20 ms",
        ),
        (
            "deepest page of 50 (HTTP)",
            f"{deep_ms:.1f} ms",
            "(no pages in the stock client)",
            f"≤ first ({first_ms:.1f} ms), < 20 ms",
        ),
        ("deepest page, SQL only", f"{keyset_ms:.2f} ms keyset", f"{offset_ms:.2f} ms OFFSET", "keyset ≤ OFFSET"),
    ]


def failures(base: str, run: int, tasks: int) -> list[tuple[str, str, str, str]]:
    http = httpx.Client(base_url=base, timeout=120)

    def ours() -> None:
        assert len(http.get(f"/flows/{FLOW}/runs/{run}/failures").json()) == 3

    ours_ms = median_ms(ours, 20)
    session = requests.Session()  # what Metaflow's client uses
    started = time.perf_counter()
    listed = session.get(f"{base}/flows/{FLOW}/runs/{run}/steps/fan/tasks").json()
    count = 1
    failed = []
    for task in listed:
        artifact = session.get(f"{base}/flows/{FLOW}/runs/{run}/steps/fan/tasks/{task['task_id']}/artifacts/_success")
        count += 1
        if artifact.status_code != 200:
            failed.append(task)
    stock_ms = (time.perf_counter() - started) * 1000
    return [
        (
            f"find the failed tasks of a {tasks:,}-task foreach",
            f"1 request, {ours_ms:.1f} ms",
            f"{count:,} requests, {stock_ms:,.0f} ms (metadata only)",
            "1 request, < 50 ms",
        )
    ]


# -- logs -------------------------------------------------------------------------


def write_log(path: Path, megabytes: int) -> int:
    """A ``megabytes`` MB mflog file, as Metaflow's runtime writes one; returns its line count."""
    from datetime import datetime, timedelta

    from metaflow.mflog.mflog import decorate

    path.parent.mkdir(parents=True, exist_ok=True)
    start, lines, written = datetime(2026, 11, 23), 0, 0
    with path.open("wb") as out:
        while written < megabytes * 1024 * 1024:
            block = b"".join(
                decorate(
                    b"runtime",
                    b"step output line %09d: loss=0.%06d" % (lines + i, i),
                    now=start + timedelta(microseconds=lines + i),
                )
                + b"\n"
                for i in range(1000)
            )
            out.write(block)
            written += len(block)
            lines += 1000
    return lines


def _client_tail(base: str, pathspec: str, queue) -> None:
    """Metaflow's Client API in a process of its own: the last 100 lines of the task's stdout."""
    from metaflow import Task, metadata, namespace

    metadata(f"service@{base}")
    namespace(None)
    started = time.perf_counter()
    last = list(Task(pathspec, attempt=0).loglines("stdout"))[-100:]
    queue.put(((time.perf_counter() - started) * 1000, last[-1][1]))


def logs(base: str, run: int, log_root: Path, megabytes: int) -> list[tuple[str, str, str, str]]:
    http = httpx.Client(base_url=base, timeout=600)
    task = http.get(f"/flows/{FLOW}/runs/{run}/steps/fan/tasks", params={"_limit": 1}).json()[0]["task_id"]
    where = [
        {"field_name": name, "value": value, "type": name, "tags": ["attempt_id:0"]}
        for name, value in (("ds-type", "local"), ("ds-root", str(log_root)))
    ]
    assert http.post(f"/flows/{FLOW}/runs/{run}/steps/fan/tasks/{task}/metadata", json=where).status_code == 200
    lines = write_log(log_root / FLOW / str(run) / "fan" / str(task) / "0.runtime_stdout.log", megabytes)
    route = f"/flows/{FLOW}/runs/{run}/steps/fan/tasks/{task}/logs/stdout"
    answers = []

    def tail() -> None:
        answers.append(http.get(route, params={"tail": 100}).json())

    ours_ms = median_ms(tail, 20)
    last = answers[-1]
    assert len(last["lines"]) == 100 and last["lines"][-1]["text"].startswith(f"step output line {lines - 1:09d}")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    client = context.Process(target=_client_tail, args=(base, f"{FLOW}/{run}/fan/{task}", queue))
    client.start()
    stock_ms, stock_last = queue.get()
    client.join()
    assert stock_last == last["lines"][-1]["text"], (stock_last, last["lines"][-1])
    return [
        (
            f"last 100 lines of a {megabytes:,} MB task log",
            f"{ours_ms:.1f} ms, {last['bytes_read'] / 1024:.0f} KiB read",
            f"{stock_ms:,.0f} ms, {last['size'] / 1e6:,.0f} MB read (Task.loglines)",
            "≤ 1 MB read, < 500 ms",
        )
    ]


# -- writes with events ---------------------------------------------------------


#: One metadata row, as Metaflow's client writes it when a task attempt starts.
_ROW = (
    "(flow_id, run_number, step_name, task_id, field_name, value, type, user_name, ts_epoch, tags, system_tags) "
    "VALUES ('{flow}', {run}, 'fan', {task}, 'attempt', '0', 'attempt', 'bench', 0, '[\"attempt_id:0\"]', '[]')"
)
WRITES = {
    # The reference service's insert; the UI backend's trigger NOTIFYs in the same transaction.
    "notify": "INSERT INTO metadata_v3 " + _ROW,
    # This service: the row is its own event, numbered in the log by the column's default (migration 0007).
    "events": "INSERT INTO metadata " + _ROW,
    # The same write with the relay held back until the slice has ended: what numbering costs the write alone.
    "numbered": "INSERT INTO metadata " + _ROW,
    # The same row with no event at all, the ceiling: no number, so not in the log nor in its index.
    "plain": "INSERT INTO metadata " + _ROW.replace(") VALUES", ", seq) VALUES").removesuffix(")") + ", NULL)",
}


def _writer(urls: dict[str, str], run: int, task: int, commands, results) -> None:
    """One writer process for a whole width: connected once, it writes ``mode``'s row from ``start`` for
    ``seconds`` on each command (so no slice pays for starting processes), until told to stop."""
    statements = {mode: statement.format(flow=FLOW, run=run, task=task) for mode, statement in WRITES.items()}
    connections = {mode: psycopg.connect(url, autocommit=True) for mode, url in urls.items()}
    try:
        while (command := commands.get()) is not None:
            mode, start, seconds = command
            conn, statement, done = connections[mode], statements[mode], 0
            time.sleep(max(start - time.monotonic(), 0))
            deadline = start + seconds
            while time.monotonic() < deadline:
                conn.execute(statement)
                done += 1
            results.put(done)
    finally:
        for conn in connections.values():
            conn.close()


class Writers:
    """``count`` writer processes, started once for every slice of one width."""

    def __init__(self, urls: dict[str, str], count: int, run: int, task: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(count)]
        self.processes = [
            context.Process(target=_writer, args=(urls, run, task, commands, self.results))
            for commands in self.commands
        ]

    def __enter__(self) -> Writers:
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join()

    def rate(self, mode: str, seconds: float) -> float:
        """Rows per second of ``mode`` by all of them at once, over ``seconds``."""
        start = time.monotonic() + 0.1  # every writer begins together
        for commands in self.commands:
            commands.put((mode, start, seconds))
        return sum(self.results.get() for _ in self.commands) / seconds


def _listen(url: str, stop: threading.Event) -> None:
    """What the reference UI backend does: LISTEN and drain notifications."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN notify")
        while not stop.is_set():
            for _ in conn.notifies(timeout=0.2):
                pass


class Relay:
    """The service's relay, running for the whole write comparison as it runs for a service's life, except
    while held back (``held_back``: stopped, since an idle relay still reads the log every second).

    The writers are other processes, so the relay cannot be woken by their
    commits as the service wakes it after its own: while events are being
    written it is woken every 10 ms (it gathers for longer than that after a
    wake-up); between those slices it idles, as it does when nothing writes.
    """

    def __init__(self, url: str, nats_url: str | None) -> None:
        self.url, self.nats_url = url, nats_url
        self.active, self.stopping, self.held = threading.Event(), threading.Event(), threading.Event()
        self.running = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        database, hub = connect(self.url), None
        while not self.stopping.is_set():
            if self.held.is_set() and hub is not None:
                await hub.stop()
                hub = None
                self.running.clear()
            elif not self.held.is_set() and hub is None:
                hub = EventHub(database, self.nats_url)
                await hub.start()  # its first round starts after the relay's 50 ms of gathering
                self.running.set()
            if hub is not None and self.active.is_set():
                hub.wake()
            await asyncio.sleep(0.01)
        if hub is not None:
            await hub.stop()

    @contextlib.contextmanager
    def held_back(self) -> Iterator[None]:
        """No relay at all for the block (not timed: stopping and starting it); it is running again after."""
        self.held.set()
        while self.running.is_set():
            time.sleep(0.01)
        try:
            yield
        finally:
            self.held.clear()
            self.running.wait()

    def __enter__(self) -> Relay:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()

    def catch_up(self) -> None:
        """Wake the relay until it has published everything written (its work for a slice's events is done
        before the next slice starts, instead of taking that slice's CPU), then let it idle."""
        self.active.set()
        try:
            self._settle()
        finally:
            self.active.clear()

    def _settle(self, timeout_s: float = 60.0) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                published, written = conn.execute(
                    "SELECT (SELECT published_seq FROM relay_state), (SELECT max(seq) FROM metadata)"
                ).fetchone()
                if written is None or published >= written:
                    return
                time.sleep(0.05)
        raise TimeoutError(f"the relay had not caught up after {timeout_s:.0f}s")


def _slice(writers: Writers, mode: str, seconds: float, relay: Relay, notify_url: str) -> float:
    """One timed slice of ``mode``: the relay woken throughout for ``events`` and stopped throughout for
    ``numbered`` (caught up after both, untimed), a listener draining the trigger's notifications
    throughout for ``notify``."""
    if mode in ("events", "numbered"):
        try:
            if mode == "numbered":
                with relay.held_back():
                    return writers.rate(mode, seconds)
            relay.active.set()
            return writers.rate(mode, seconds)
        finally:
            relay.catch_up()
    if mode == "plain":
        return writers.rate(mode, seconds)
    stop = threading.Event()
    listener = threading.Thread(target=_listen, args=(notify_url, stop), daemon=True)
    listener.start()
    try:
        return writers.rate(mode, seconds)
    finally:
        stop.set()
        listener.join()


def writes(
    pg: PostgresServer, ours_url: str, broker: NatsServer | None, seconds: float, run: int, rounds: int
) -> list[tuple[str, str, str, str]]:
    """Each width in ``rounds`` rounds of four slices side by side (the tables grow and PostgreSQL
    checkpoints as the run goes on, so slices taken far apart are not comparable), each round in another
    order of the four (whatever a slice leaves behind, such as dead rows to vacuum, falls on each in
    turn); the ratios are medians of each round's own ratio."""
    notify_url = pg.create_database()
    with psycopg.connect(notify_url, autocommit=True) as conn:
        conn.execute(NOTIFY_SCHEMA)
    with psycopg.connect(ours_url) as conn:
        task = conn.execute("SELECT min(task_id) FROM tasks WHERE run_number = %s", (run,)).fetchone()[0]
    urls = {"notify": notify_url, "events": ours_url, "numbered": ours_url, "plain": ours_url}
    modes = list(urls)
    rows = []
    bus = "NATS JetStream" if broker else "in-process bus"
    with Relay(ours_url, broker.url if broker else None) as relay:
        for count in (1, 8):
            rates: dict[str, list[float]] = {mode: [] for mode in modes}
            with Writers(urls, count, run, task) as writers:
                _slice(writers, "events", 1.0, relay, notify_url)  # connected and warm; the stream declared
                for number in range(rounds):
                    turn = number % len(modes)
                    for mode in modes[turn:] + modes[:turn]:
                        rates[mode].append(_slice(writers, mode, seconds, relay, notify_url))
            rows += _write_rows(count, rounds, rates, bus)
        # ``rates`` are the 8 writers' now: what the event path's CPU is set against.
        rows.append(_cost_row(_event_path_cpu(pg, ours_url, relay, broker, run, task), rates, bus))
    return rows


def _of(rates: dict[str, list[float]], mode: str, base: str) -> float:
    """``mode``'s rate as a share of ``base``'s, the median of each round's own ratio (the slices of one
    round ran side by side, under the same conditions)."""
    return statistics.median(m / b for m, b in zip(rates[mode], rates[base], strict=True))


def _write_rows(writers: int, rounds: int, rates: dict[str, list[float]], bus: str) -> list[tuple[str, str, str, str]]:
    notify, ours, numbered, plain = (
        statistics.median(rates[mode]) for mode in ("notify", "events", "numbered", "plain")
    )
    return [
        (
            f"writes with events, {writers} writer(s), rows/s (medians of {rounds} rounds)",
            f"{ours:,.0f} (event log, relay to {bus} running): {_of(rates, 'events', 'plain'):.0%} of no events"
            f" ({plain:,.0f})",
            f"{notify:,.0f} (pg_notify trigger, a listener draining)",
            f"{_of(rates, 'events', 'notify'):.2f}x the trigger; goal: "
            + ("≥ 90% of no events" if writers > 1 else "≥ 1x the trigger"),
        ),
        (
            f"  the same, relay held back until each slice ended, {writers} writer(s)",
            f"{numbered:,.0f}: {_of(rates, 'numbered', 'plain'):.0%} of no events (the write's own share)",
            "",
            "",
        ),
    ]


#: Events written at once, then published by the relay while its CPU (and the database's, the broker's) is read;
#: as many times, the median of each part kept (a catch-up now and then shares the cores with other work).
COST_EVENTS, COST_REPEATS = 50_000, 5


def _event_path_cpu(
    pg: PostgresServer, url: str, relay: Relay, broker: NatsServer | None, run: int, task: int
) -> dict[str, float]:
    """CPU seconds per event the event path spends publishing ``COST_EVENTS`` metadata rows written at once,
    in full pages (its cheapest case; rounds under load are nearly as large): the relay's process (this one,
    with the script's own 10 ms wake-ups, polling and progress display, well under a µs an event),
    PostgreSQL (every process: the write, its vacuum and a checkpoint are done before, with the relay
    stopped), the broker."""
    postmaster = psutil.Process(int((pg.data / "postmaster.pid").read_text().split()[0]))
    parts = {
        "relay's process": lambda: [psutil.Process()],
        "PostgreSQL": lambda: [postmaster, *postmaster.children(recursive=True)],
        "broker": lambda: [psutil.Process(broker.process.pid)] if broker else [],
    }
    write = (
        "INSERT INTO metadata "
        + _ROW.format(flow=FLOW, run=run, task=task).replace("VALUES (", "SELECT ").removesuffix(")")
        + f" FROM generate_series(1, {COST_EVENTS})"
    )
    spent: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(COST_REPEATS):
        with relay.held_back(), psycopg.connect(url, autocommit=True) as conn:
            conn.execute(write)
            conn.execute("VACUUM metadata")
            conn.execute("CHECKPOINT")
        before = {name: _cpu(processes()) for name, processes in parts.items()}  # its first read is 50 ms off
        relay.catch_up()
        for name, processes in parts.items():
            spent[name].append(_spent(before[name], _cpu(processes())) / COST_EVENTS)
    return {name: statistics.median(seconds) for name, seconds in spent.items()}


def _cpu(processes: list[psutil.Process]) -> dict[int, float]:
    """CPU seconds so far of each process still running, by pid."""
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots: a process gone since (a closed connection's backend) took none of it."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def _cost_row(cost: dict[str, float], rates: dict[str, list[float]], bus: str) -> tuple[str, str, str, str]:
    """The event path's CPU per event, and what it comes to at the 8-writer rate on this machine's cores."""
    per_event = sum(cost.values())
    cores = len(os.sched_getaffinity(0))
    share = statistics.median(rates["events"]) * per_event / cores
    parts = ", ".join(f"{name} {seconds * 1e6:.1f}" for name, seconds in cost.items())
    return (
        f"event path CPU per event, {COST_EVENTS:,} events caught up (medians of {COST_REPEATS}; relay to {bus})",
        f"{per_event * 1e6:.1f} µs ({parts})",
        "",
        f"at the 8-writer rate, {share:.0%} of the {cores} cores",
    )


# -- fan-out --------------------------------------------------------------------


def fan_out(url: str, base: str, events: int, subscribers: int) -> list[tuple[str, str, str, str]]:
    """Events put in the log at once, timed until every subscriber has read them all."""
    import aiohttp

    async def run() -> tuple[int, float]:
        counts = [0] * subscribers
        connected = asyncio.Event()
        opened = 0

        async def read(session: aiohttp.ClientSession, i: int) -> None:
            nonlocal opened
            async with session.get(f"{base}/events") as response:
                opened += 1
                if opened == subscribers:
                    connected.set()
                async for line in response.content:
                    if line.startswith(b"data: "):
                        counts[i] += 1
                        if counts[i] >= events:
                            return

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            readers = [asyncio.create_task(read(session, i)) for i in range(subscribers)]
            await connected.wait()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(_fill_log, url, events)
            started = time.perf_counter()
            async with session.post(f"{base}/flows/FanOut", json={}):  # a write wakes the relay at once
                pass
            await asyncio.gather(*readers)
            return sum(counts), time.perf_counter() - started

    delivered, elapsed = asyncio.run(run())
    return [
        (
            f"event fan-out to {subscribers} SSE subscribers",
            f"{delivered / elapsed:,.0f} events/s delivered ({events / elapsed:,.0f}/s each)",
            "(no stream: the UI backend reloads each row from the database)",
            "",
        )
    ]


def _fill_log(url: str, events: int) -> None:
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        copy_rows(cur, "events", "flow_id, kind, body, ts_epoch", ((FLOW, "metadata", "{}", 0) for _ in range(events)))


#: What the script measures, each runnable alone (``--only``).
SECTIONS = ("pages", "failures", "fan-out", "logs", "writes")


@contextlib.contextmanager
def _broker(workdir: Path) -> Iterator[NatsServer | None]:
    """NATS JetStream for the relay, when installed; else None (the in-process bus)."""
    if not shutil.which("nats-server"):
        yield None
        return
    with nats_server(workdir) as nats:
        yield nats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one write slice")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of write slices per width")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--log-mb", type=int, default=1024, help="size of the task log whose tail is read")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"the sections to run, comma-separated (of {', '.join(SECTIONS)})"
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"--only: {', '.join(sorted(only - set(SECTIONS)))} is not one of {', '.join(SECTIONS)}")
    table = Table(title="metadata service (PostgreSQL, same machine, same run)")
    for column in ("measurement", "this service", "stock Metaflow service / client", "goal"):
        table.add_column(column)
    workdir = Path(tempfile.mkdtemp(prefix="bench-metadata-"))
    try:
        with postgres_cluster() as pg:
            url = pg.create_database()
            migrate(connect(url))
            with console.status(f"loading {args.runs:,} runs and a {args.tasks:,}-task run"):
                run = load(url, args.runs, args.tasks)
            process, base = start_service(url, workdir / "service.log", workdir / "datastore")
            rows = []
            try:
                sections = {
                    "pages": lambda: pages(url, base, args.runs),
                    "failures": lambda: failures(base, run, args.tasks),
                    "fan-out": lambda: fan_out(url, base, args.events, 8),
                    "logs": lambda: logs(base, run, workdir / "datastore", args.log_mb),
                }
                doing = {"logs": f"logs: writing a {args.log_mb:,} MB log, then reading its tail"}
                for name, section in sections.items():
                    if name in only:
                        with console.status(doing.get(name, name)):
                            rows += section()
            finally:
                process.terminate()
                process.wait(timeout=30)
            if "writes" in only:
                with console.status("writes"), _broker(workdir) as broker:
                    rows += writes(pg, url, broker, args.seconds, run, args.rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    print(f"(cpus: {os.cpu_count()})", file=sys.stderr)


if __name__ == "__main__":
    main()
