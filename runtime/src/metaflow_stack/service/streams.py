"""The ``/events`` streams: replay from the log, then live events, in bounded memory per stream.

See ``events`` for the guarantees (order, no gaps, no repeats, resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import select

from metaflow_stack.api_errors import ApiError, bad_parameter
from metaflow_stack.ids import is_number
from metaflow_stack.service import schema as s
from metaflow_stack.service.event_bus import SUBJECT_PREFIX, Bus, Logged, sse_frame, the_log

#: A comment line on an idle stream, so proxies keep it open and a gone client is noticed.
KEEP_ALIVE_S = 15.0
#: How long a stream waits for a lagging reader before ending (the client resumes with Last-Event-ID).
WATERMARK_TIMEOUT_S = 30.0
#: Queued to a stream to end it.
CLOSE: Any = object()
#: Queued to a stream whose buffer overflowed: it tells the client where to resume, and ends.
_OVERFLOW: Any = object()
#: Events read from the log per query when replaying or filling a gap.
REPLAY_PAGE = 1000
#: Live events one stream may hold while its client has not read them.
STREAM_BUFFER = 10_000
#: Queued live events sent in one write to the client, at most.
WRITE_EVENTS = 2000
#: Bytes of replayed events joined into one write, at most (a page of large events is sent in several).
WRITE_BYTES = 1024 * 1024
#: Streams one server holds open; one more is answered 503 (each holds a buffer and, replaying, a page:
#: 2,000 clients that read nothing took 4.7 GB).
MAX_STREAMS = 256


@dataclass
class Subscription:
    """One ``/events`` client: its bounded buffer of live events, its scope and where it resumes."""

    queue: asyncio.Queue
    scope: tuple[str | None, int | None]
    since: int | None


class Streams(Bus):
    """Subscriptions and their streams; live events arrive through ``_fan_out``."""

    async def _on_message(self, message: Any) -> None:
        for event in json.loads(message.data):
            self._fan_out(event)

    def _fan_out(self, event: dict[str, Any], encoded: str | None = None) -> None:
        """Hand ``event`` (its head at least, when ``encoded`` is the whole) to every open stream, framed
        once for all of them; a full buffer overflows."""
        if self._subscribers:
            item = (event, sse_frame(event["seq"], event["kind"], encoded or json.dumps(event)))
            for queue in list(self._subscribers):
                try:
                    queue.put_nowait(item)
                except asyncio.QueueFull:
                    self._overflow(queue)

    def _end(self, queue: asyncio.Queue) -> None:
        """End a stream now: what it buffered is dropped (its client resumes from the log) if it is full."""
        try:
            queue.put_nowait(CLOSE)
        except asyncio.QueueFull:
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(CLOSE)

    def _overflow(self, queue: asyncio.Queue) -> None:
        """Drop what a slow stream buffered and end it with where to resume; the log still has it all."""
        self.overflows += 1
        self._subscribers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_OVERFLOW)

    async def subscribe(self, request: Request) -> Subscription:
        """Check ``/events``' parameters (``flow``, ``run`` number, ``since`` seq) and start buffering."""
        query = request.query_params
        unknown = set(query) - {"flow", "run", "since"}
        if unknown:
            raise bad_parameter(sorted(unknown)[0], "unknown parameter; /events accepts flow, run and since")
        run = query.get("run")
        if run is not None and not (is_number(run) and len(run) <= 18):
            raise bad_parameter("run", "must be a run number")
        since = query.get("since") or request.headers.get("last-event-id")
        if since is not None and not (is_number(since) and len(since) <= 18):
            raise bad_parameter("since", "must be a sequence number")
        if len(self._subscribers) >= MAX_STREAMS:
            raise ApiError(
                503,
                "too_many_streams",
                f"{MAX_STREAMS} event streams are open, the most this server holds; "
                "try again shortly (resume with Last-Event-ID)",
            )
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
                # Only what is settled: past the watermark a number may still be filled in by an open write.
                upto = await asyncio.to_thread(self._watermark)
                async for page in self._pages(scope, last, upto):
                    for written in _writes(page):
                        yield written
                last = max(last, upto)
            while not await request.is_disconnected():
                try:
                    async with asyncio.timeout(KEEP_ALIVE_S):
                        items = [await queue.get()]
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                while not queue.empty() and len(items) < WRITE_EVENTS:  # whatever else is queued goes in one write
                    items.append(queue.get_nowait())
                if _OVERFLOW in items:  # too slow to keep up: resume from the log, not from this buffer
                    resume = json.dumps({"since": last, "reason": f"more than {STREAM_BUFFER} events unread"})
                    yield f"event: resume\ndata: {resume}\n\n".encode()
                    return
                closing = CLOSE in items
                chunk = []
                for event, frame in (item for item in items if item is not CLOSE):
                    if last is not None and event["seq"] <= last:
                        continue  # already sent, or a duplicate publish
                    if last is not None and event["seq"] > last + 1:
                        if chunk:
                            yield b"".join(chunk)
                            chunk = []
                        async for page in self._pages(scope, last, event["seq"] - 1):
                            for written in _writes(page):
                                yield written
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
        """How far the reader shows the log settled: the relay's published mark, committed after the events."""
        with self.db.reader.connect() as conn:
            return conn.execute(select(s.relay_state.c.published_seq)).scalar_one()

    async def _pages(self, scope: tuple[str | None, int | None], after: int, upto: int) -> AsyncIterator[list[Logged]]:
        """The log's events after ``after`` through ``upto`` in scope, a page at a time."""
        while True:
            page = await asyncio.to_thread(self._replay, scope, after, upto)
            if page:
                yield page
                after = page[-1].seq
            if len(page) < REPLAY_PAGE:
                return

    def _replay(self, scope: tuple[str | None, int | None], after: int, upto: int) -> list[Logged]:
        """A page of events after ``after`` through ``upto``, waiting for a lagging reader to show them."""
        deadline = time.monotonic() + WATERMARK_TIMEOUT_S
        while self._watermark() < upto:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the database replica did not reach event {upto} in {WATERMARK_TIMEOUT_S:.0f}s")
            time.sleep(0.05)
        flow, run = scope
        query = the_log(self.db.dialect, after, REPLAY_PAGE, upto=upto, flow=flow, run=run)
        with self.db.reader.connect() as conn:
            return [Logged(*row) for row in conn.execute(query)]


def _writes(page: list[Logged]) -> Iterator[bytes]:
    """``page``'s frames, joined into writes of about ``WRITE_BYTES`` at most."""
    frames, size = [], 0
    for event in page:
        frame = sse_frame(event.seq, event.kind, event.data)
        frames.append(frame)
        size += len(frame)
        if size >= WRITE_BYTES:
            yield b"".join(frames)
            frames, size = [], 0
    if frames:
        yield b"".join(frames)


def _in_scope(event: dict[str, Any], scope: tuple[str | None, int | None]) -> bool:
    flow, run = scope
    return (flow is None or event["flow_id"] == flow) and (run is None or event["run_number"] == run)
