"""Events: the relay that publishes the outbox, and the SSE stream subscribers read.

The relay moves committed outbox rows into the event log, numbered in the
order it sees them (``seq`` across everything, ``run_seq`` within a run:
writes that depend on each other commit one after the other, so a run's
events keep their causal order), publishes them, then records how far it
published. A broker that is down only delays events: they wait in the log and
go out, in order, when it is back. Published events older than the retention
are pruned from the log.

Two buses. Embedded: subscribers in this process get events straight from the
relay. Production: NATS JetStream, stream ``METAFLOW_EVENTS`` on subjects
``metaflow.events.<flow>.<run>`` (durable, replayable by any consumer). A
message is a JSON array of up to ``MESSAGE_EVENTS`` consecutive events of one
run, its ``Nats-Msg-Id`` the ``first-last`` seq range: publishing per event
cost the relay more CPU than the writes it follows. Delivery is at least
once (a retried batch may regroup its tail), so consumers skip any ``seq``
they have seen, as the streams here do; every service replica feeds its
subscribers from the subject, so a client may connect to any replica.

``GET /events?flow=&run=&since=`` streams as server-sent events (``id`` is the
``seq``, so a browser's ``Last-Event-ID`` resumes). Replay after ``since``
comes from the database the service reads (a replica, perhaps); when a live
event shows a gap the reader has not caught up with, the stream waits until
the reader's newest ``seq`` (the watermark) covers it, then fills the gap:
nothing is dropped, nothing repeats. Memory per stream is bounded: replay
and gap fills are read in pages of ``REPLAY_PAGE``, and a stream buffers at
most ``STREAM_BUFFER`` live events; a consumer too slow for that gets a
``resume`` event naming its last ``seq`` and the stream ends, so it
reconnects from there (a browser's EventSource does so by itself) and reads
the rest from the log instead of from this process's memory.

An event the broker refuses outright (over its payload limit, say) is
parked: recorded with the broker's answer in ``parked_events``, counted, and
listed at ``/admin/parked-events``; the relay moves on, so one bad event
never holds back the ones after it. A broker that is down is not a refusal:
that still waits.

Subjects are made of tokens NATS accepts whatever the ids: a flow name made
only of ``[A-Za-z0-9_-]`` (every ASCII Python identifier) is its own token,
anything else is ``~`` and its UTF-8 in URL-safe base64 (``subject_token``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import bindparam, delete, func, insert, select, text, update

from metaflow_stack.api_errors import ApiError, bad_parameter
from metaflow_stack.service import schema as s
from metaflow_stack.service.database import Database
from metaflow_stack.service.store import now_ms

log = logging.getLogger("metaflow_stack.service.events")

STREAM = "METAFLOW_EVENTS"
SUBJECT_PREFIX = "metaflow.events"
_RELAY_LOCK = 7_300_002
_BATCH = 2000
PUBLISH_TIMEOUT_S = 5.0
#: Events of one run per NATS message, at most (a message stays well under NATS's 1 MB default).
MESSAGE_EVENTS = 256
#: A comment line on an idle stream, so proxies keep it open and a gone client is noticed.
KEEP_ALIVE_S = 15.0
#: How long a stream waits for a lagging reader before ending (the client resumes with Last-Event-ID).
WATERMARK_TIMEOUT_S = 30.0
DEFAULT_RETENTION_S = 30 * 86400.0
#: Queued to a stream to end it.
_CLOSE: Any = object()
#: Queued to a stream whose buffer overflowed: it tells the client where to resume, and ends.
_OVERFLOW: Any = object()
PRUNE_EVERY_S = 3600.0
#: Events read from the log per query when replaying or filling a gap.
REPLAY_PAGE = 1000
#: Live events one stream may hold while its client has not read them.
STREAM_BUFFER = 10_000
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Subscription:
    """One ``/events`` client: its bounded buffer of live events, its scope and where it resumes."""

    queue: asyncio.Queue
    scope: tuple[str | None, int | None]
    since: int | None


def subject_token(value: str) -> str:
    """``value`` as one NATS subject token (never empty, and never with ``.``, ``*``, ``>`` or spaces)."""
    if _TOKEN.fullmatch(value):
        return value
    return "~" + base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def subject(flow_id: str, run_number: int | None) -> str:
    return f"{SUBJECT_PREFIX}.{subject_token(flow_id)}.{run_number if run_number is not None else '_'}"


def _refused(error: BaseException) -> bool:
    """Whether the broker refused this message for good (resending it would be refused again)."""
    from nats.errors import MaxPayloadError
    from nats.js.errors import APIError

    if isinstance(error, MaxPayloadError):
        return True
    code = getattr(error, "code", None) if isinstance(error, APIError) else None
    return isinstance(code, int) and 400 <= code < 500 and code != 408


def _event(row: Any) -> dict[str, Any]:
    return {
        "seq": row["seq"],
        "run_seq": row["run_seq"],
        "kind": row["kind"],
        "flow_id": row["flow_id"],
        "run_number": row["run_number"],
        "ts_epoch": row["ts_epoch"],
        "body": row["body"],
    }


class EventHub:
    """Relays the outbox to the bus and fans events out to this process's streams."""

    def __init__(self, database: Database, nats_url: str | None, retention_s: float = DEFAULT_RETENTION_S) -> None:
        self.db = database
        self.nats_url = nats_url
        #: Published events older than this leave the log (and the JetStream stream).
        self.retention_s = retention_s
        self._next_prune = 0.0
        self._subscribers: set[asyncio.Queue] = set()
        self.parked = 0
        self.overflows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._nats: Any = None
        #: The NATS subscription feeding this process's streams, held only while some stream is open.
        self._live: Any = None
        self._jetstream: Any = None
        self.published = 0
        self.last_error: str | None = None

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._relay(), name="outbox-relay")

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._nats is not None:
            with contextlib.suppress(Exception):
                await self._nats.close()

    def wake(self) -> None:
        """Called after each committed write, from any thread."""
        if self._loop is not None and self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def close_streams(self) -> None:
        """End every open stream (from any thread), so a stopping server is not held up by them."""
        if self._loop is not None:
            for queue in list(self._subscribers):
                self._loop.call_soon_threadsafe(queue.put_nowait, _CLOSE)

    def describe(self) -> dict[str, Any]:
        return {
            "bus": "nats" if self.nats_url else "in-process",
            "published": self.published,
            "parked": self.parked,
            "streams": len(self._subscribers),
            "error": self.last_error,
        }

    # -- relay --------------------------------------------------------------

    async def _relay(self) -> None:
        backoff = 0.1
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # unlike wait_for, never swallows a cancellation
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                while batch := await asyncio.to_thread(self._number):
                    await self._publish(batch)
                    await asyncio.to_thread(self._mark, batch[-1]["seq"])
                    self.published += len(batch)
                if time.monotonic() >= self._next_prune:
                    await asyncio.to_thread(self.prune, self.retention_s)
                    self._next_prune = time.monotonic() + PRUNE_EVERY_S
                self.last_error, backoff = None, 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker or database is down: the outbox keeps the events
                if asyncio.current_task().cancelling():
                    # nats-py turns a cancellation inside publish_async into its own error.
                    raise asyncio.CancelledError from exc
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("event relay paused: %s (retrying in %.1fs)", self.last_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wakeup.set()

    def _number(self) -> list[dict[str, Any]]:
        """Move committed outbox rows into the event log, numbered; return what is unpublished, in order.

        Appending (one insert and one delete per batch) rather than numbering
        rows in place keeps the relay's cost off the writers: no event row is
        ever rewritten, and the outbox stays a handful of rows.
        """
        o, e, state = s.outbox.c, s.events.c, s.relay_state.c
        with self.db.writer.begin() as conn:
            if self.db.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _RELAY_LOCK})
            seq, published = conn.execute(select(state.last_seq, state.published_seq)).one()
            fresh = conn.execute(select(s.outbox).order_by(o.id).limit(_BATCH)).mappings().all()
            if fresh:
                runs = {row["run_number"] for row in fresh if row["run_number"] is not None}
                run_seq = dict(
                    conn.execute(
                        select(s.runs.c.run_number, s.runs.c.event_seq).where(s.runs.c.run_number.in_(runs))
                    ).all()
                )
                numbered = []
                for row in fresh:
                    seq += 1
                    number = row["run_number"]
                    if number is not None:
                        run_seq[number] += 1
                    numbered.append(_event({**row, "seq": seq, "run_seq": run_seq.get(number)}))
                conn.execute(insert(s.events), numbered)
                conn.execute(delete(s.outbox).where(o.id.in_([row["id"] for row in fresh])))
                conn.execute(update(s.relay_state).values(last_seq=seq))
                if run_seq:
                    conn.execute(
                        update(s.runs).where(s.runs.c.run_number == bindparam("b_run")),
                        [{"b_run": n, "event_seq": value} for n, value in run_seq.items()],
                    )
                if numbered[0]["seq"] == published + 1:
                    return numbered  # nothing was waiting: this batch is what to publish
            if seq == published:
                return []
            pending = conn.execute(select(s.events).where(e.seq > published).order_by(e.seq).limit(_BATCH))
            return [_event(row) for row in pending.mappings()]

    def _mark(self, upto: int) -> None:
        """Record that every event through ``upto`` is published (never moving backwards)."""
        state = s.relay_state.c
        with self.db.writer.begin() as conn:
            conn.execute(update(s.relay_state).where(state.published_seq < upto).values(published_seq=upto))

    def prune(self, retention_s: float) -> int:
        """Delete published events older than ``retention_s`` from the log; returns how many."""
        cutoff = int((time.time() - retention_s) * 1000)
        e = s.events.c
        with self.db.writer.begin() as conn:
            published = conn.execute(select(s.relay_state.c.published_seq)).scalar_one()
            return conn.execute(delete(s.events).where(e.seq <= published, e.ts_epoch < cutoff)).rowcount

    async def _publish(self, batch: list[dict[str, Any]]) -> None:
        if not self.nats_url:
            for event in batch:
                self._fan_out(event)
            return
        jetstream = await self._connect()
        groups = _runs_of(batch)
        # One message per stretch of a run's events, sent in order on one connection;
        # acknowledgements are awaited together below.
        outcomes = [await self._send(jetstream, group) for group in groups]
        acks = [outcome for outcome in outcomes if isinstance(outcome, asyncio.Future)]
        _, waiting = await asyncio.wait(acks, timeout=PUBLISH_TIMEOUT_S) if acks else (set(), set())
        for ack in waiting:
            ack.cancel()
        if waiting:
            raise TimeoutError(f"{len(waiting)} messages unacknowledged after {PUBLISH_TIMEOUT_S:.0f}s")
        refused = []
        for group, outcome in zip(groups, outcomes, strict=True):
            error = outcome if isinstance(outcome, BaseException) else outcome.exception()
            if error is None:
                continue
            if not _refused(error):
                # The batch stays unpublished: it is sent again, and NATS drops the duplicates.
                raise error
            refused.append(group)
        for group in refused:
            await self._one_by_one(jetstream, group)

    @staticmethod
    async def _send(jetstream: Any, group: list[dict[str, Any]]) -> asyncio.Future | BaseException:
        """Publish ``group`` as one message: its acknowledgement to await, or the client's refusal."""
        from nats.errors import MaxPayloadError

        try:
            return await jetstream.publish_async(
                subject(group[0]["flow_id"], group[0]["run_number"]),
                json.dumps(group).encode(),
                stream=STREAM,
                headers={"Nats-Msg-Id": f"{group[0]['seq']}-{group[-1]['seq']}"},
            )
        except MaxPayloadError as exc:
            return exc

    async def _one_by_one(self, jetstream: Any, group: list[dict[str, Any]]) -> None:
        """Each event of a refused message alone; the ones refused again are parked."""
        for event in group:
            outcome = await self._send(jetstream, [event])
            if isinstance(outcome, asyncio.Future):
                async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                    await asyncio.wait([outcome])
                outcome = outcome.exception()
            if outcome is None:
                continue
            if not _refused(outcome):
                raise outcome
            await asyncio.to_thread(self._park, event, f"{type(outcome).__name__}: {outcome}")

    def _park(self, event: dict[str, Any], reason: str) -> None:
        """Set ``event`` aside with the broker's ``reason`` (once, however often it is refused)."""
        log.error("event %s (%s of %s) parked: %s", event["seq"], event["kind"], event["flow_id"], reason)
        row = {**event, "reason": reason[:2000], "parked_at": now_ms()}
        with self.db.writer.begin() as conn:
            known = conn.execute(select(s.parked_events.c.seq).where(s.parked_events.c.seq == event["seq"])).first()
            if known is None:
                conn.execute(insert(s.parked_events).values(row))
                self.parked += 1

    def parked_events(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Parked events after ``after`` (a ``seq``), oldest first, with why each was refused."""
        p = s.parked_events.c
        query = select(s.parked_events).where(p.seq > after).order_by(p.seq).limit(limit)
        with self.db.reader.connect() as conn:
            return [
                {**_event(row), "reason": row["reason"], "parked_at": row["parked_at"]}
                for row in conn.execute(query).mappings()
            ]

    async def _connect(self) -> Any:
        """The JetStream context, (re)connecting and declaring the stream; raises while NATS is down."""
        import nats
        from nats.js.api import StreamConfig
        from nats.js.errors import BadRequestError

        if self._nats is None or self._nats.is_closed:
            self._nats = await nats.connect(
                self.nats_url, connect_timeout=2, max_reconnect_attempts=-1, allow_reconnect=True
            )
            self._jetstream, self._live = None, None
        if self._jetstream is None:
            jetstream = self._nats.jetstream(timeout=2)
            config = StreamConfig(name=STREAM, subjects=[f"{SUBJECT_PREFIX}.>"], max_age=self.retention_s)
            try:
                await jetstream.add_stream(config)
            except BadRequestError:  # declared before with other settings (another retention)
                await jetstream.update_stream(config)
            self._jetstream = jetstream
        return self._jetstream

    async def _on_message(self, message: Any) -> None:
        for event in json.loads(message.data):
            self._fan_out(event)

    def _fan_out(self, event: dict[str, Any], encoded: str | None = None) -> None:
        """Hand ``event`` to every open stream, encoded once for all of them; a full buffer overflows."""
        if self._subscribers:
            item = (event, _frame(event, encoded))
            for queue in list(self._subscribers):
                try:
                    queue.put_nowait(item)
                except asyncio.QueueFull:
                    self._overflow(queue)

    def _overflow(self, queue: asyncio.Queue) -> None:
        """Drop what a slow stream buffered and end it with where to resume; the log still has it all."""
        self.overflows += 1
        self._subscribers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_OVERFLOW)

    # -- streams ------------------------------------------------------------

    async def subscribe(self, request: Request) -> Subscription:
        """Check ``/events``' parameters (``flow``, ``run`` number, ``since`` seq) and start buffering."""
        query = request.query_params
        unknown = set(query) - {"flow", "run", "since"}
        if unknown:
            raise bad_parameter(sorted(unknown)[0], "unknown parameter; /events accepts flow, run and since")
        run = query.get("run")
        if run is not None and not run.isdigit():
            raise bad_parameter("run", "must be a run number")
        since = query.get("since") or request.headers.get("last-event-id")
        if since is not None and not since.isdigit():
            raise bad_parameter("since", "must be a sequence number")
        if self.nats_url:
            try:
                await self._connect()
                if self._live is None:  # the live subscription feeds this replica's streams
                    self._live = await self._nats.subscribe(f"{SUBJECT_PREFIX}.>", cb=self._on_message)
            except Exception as exc:
                raise ApiError(503, "broker_unavailable", f"NATS is unreachable: {exc}") from None
        subscription = Subscription(
            asyncio.Queue(STREAM_BUFFER),
            (query.get("flow"), int(run) if run else None),
            int(since) if since is not None else None,
        )
        self._subscribers.add(subscription.queue)
        return subscription

    async def events(self, request: Request, subscription: Subscription) -> AsyncIterator[bytes]:
        """Replay after ``since``, then live events, filling any gap from the (possibly lagging) reader."""
        queue, scope = subscription.queue, subscription.scope
        try:
            last = subscription.since
            if last is not None:
                async for page in self._pages(scope, last, None):
                    yield b"".join(_frame(event) for event in page)
                    last = page[-1]["seq"]
            while not await request.is_disconnected():
                try:
                    async with asyncio.timeout(KEEP_ALIVE_S):
                        items = [await queue.get()]
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                while not queue.empty() and len(items) < _BATCH:  # whatever else is queued goes in one write
                    items.append(queue.get_nowait())
                if _OVERFLOW in items:  # too slow to keep up: resume from the log, not from this buffer
                    resume = json.dumps({"since": last, "reason": f"more than {STREAM_BUFFER} events unread"})
                    yield f"event: resume\ndata: {resume}\n\n".encode()
                    return
                closing = _CLOSE in items
                chunk = []
                for event, frame in (item for item in items if item is not _CLOSE):
                    if last is not None and event["seq"] <= last:
                        continue  # already sent, or a duplicate publish
                    if last is not None and event["seq"] > last + 1:
                        async for page in self._pages(scope, last, event["seq"] - 1):
                            yield b"".join(chunk + [_frame(m) for m in page])
                            chunk = []
                    last = event["seq"]
                    if _in_scope(event, scope):
                        chunk.append(frame)
                if chunk:
                    yield b"".join(chunk)
                if closing:  # the server is stopping: the client resumes elsewhere with Last-Event-ID
                    return
        finally:
            self._subscribers.discard(queue)
            if not self._subscribers and self._live is not None:
                live, self._live = self._live, None
                with contextlib.suppress(Exception):
                    await live.unsubscribe()

    def _watermark(self) -> int:
        with self.db.reader.connect() as conn:
            return conn.execute(select(func.coalesce(func.max(s.events.c.seq), 0))).scalar_one()

    async def _pages(
        self, scope: tuple[str | None, int | None], after: int, upto: int | None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The log's events after ``after`` (through ``upto``) in scope, a page at a time."""
        while True:
            page = await asyncio.to_thread(self._replay, scope, after, upto)
            if page:
                yield page
                after = page[-1]["seq"]
            if len(page) < REPLAY_PAGE:
                return

    def _replay(self, scope: tuple[str | None, int | None], after: int, upto: int | None) -> list[dict[str, Any]]:
        """A page of events after ``after`` (through ``upto``, waiting for a lagging reader to show them)."""
        deadline = time.monotonic() + WATERMARK_TIMEOUT_S
        while upto is not None and self._watermark() < upto:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the database replica did not reach event {upto} in {WATERMARK_TIMEOUT_S:.0f}s")
            time.sleep(0.05)
        e = s.events.c
        query = select(s.events).where(e.seq > after)
        if upto is not None:
            query = query.where(e.seq <= upto)
        flow, run = scope
        if flow is not None:
            query = query.where(e.flow_id == flow)
        if run is not None:
            query = query.where(e.run_number == run)
        with self.db.reader.connect() as conn:
            return [_event(r) for r in conn.execute(query.order_by(e.seq).limit(REPLAY_PAGE)).mappings()]


def _runs_of(batch: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive events of one run, at most ``MESSAGE_EVENTS`` together: one NATS message each."""
    groups: list[list[dict[str, Any]]] = []
    for event in batch:
        last = groups[-1][-1] if groups else None
        same = last is not None and (last["flow_id"], last["run_number"]) == (event["flow_id"], event["run_number"])
        if same and len(groups[-1]) < MESSAGE_EVENTS:
            groups[-1].append(event)
        else:
            groups.append([event])
    return groups


def _in_scope(event: dict[str, Any], scope: tuple[str | None, int | None]) -> bool:
    flow, run = scope
    return (flow is None or event["flow_id"] == flow) and (run is None or event["run_number"] == run)


def _frame(event: dict[str, Any], encoded: str | None = None) -> bytes:
    """One server-sent event (``event``, ``id``, ``data`` lines), encoded once for every stream."""
    data = encoded or json.dumps(event)
    return f"event: {event['kind']}\nid: {event['seq']}\ndata: {data}\n\n".encode()
