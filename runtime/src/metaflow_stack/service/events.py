"""Events: the relay that publishes the event log, and the SSE stream subscribers read.

Every write puts its events in the log in its own transaction, numbered
there (``seq``, across everything: event rows and metadata rows, each its
own event; ``event_log``). The relay publishes the log in ``seq``
order, as far as it is settled: a number no open transaction can still
commit (a transaction that holds a number takes its id first, so it shows as
open in a snapshot until it ends; one that rolled back leaves a hole that is
skipped once the transactions open at the time are over). Writes that depend
on each other commit one after the other, so a run's events keep their
causal order. The relay then records how far it published. A broker that is
down only delays events: they wait in the log and go out, in order, when it
is back. Published event rows older than the retention are pruned, and the
log then starts after the last of them.

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
comes from the database the service reads (a replica, perhaps), up to what
the relay has published there (the watermark: ``relay_state``, which commits
after the events it covers); when a live event shows a gap the reader has not
caught up with, the stream waits until the watermark covers it, then fills
the gap: nothing is dropped, nothing repeats (a rolled-back write's number
never appears). Memory per stream is bounded: replay
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
import contextlib
from typing import Any

from metaflow_stack.service.relay import Relay
from metaflow_stack.service.streams import Streams


class EventHub(Relay, Streams):
    """Relays the event log to the bus and fans events out to this process's streams."""

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._relay(), name="event-relay")
        self.wake()  # a first round now: it connects to the broker and publishes what waited in the log

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.close_connection)
        if self._nats is not None:
            with contextlib.suppress(Exception):
                await self._nats.close()

    def wake(self) -> None:
        """Called after each committed write, from any thread.

        Only the first call of a round reaches the event loop (one wake-up of
        the loop per call would cost the server a loop iteration per write);
        a call racing the relay's reset costs at most one round more.
        """
        if self._loop is not None and self._wakeup is not None and not self._wake_due:
            self._wake_due = True
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def close_streams(self) -> None:
        """End every open stream (from any thread), so a stopping server is not held up by them."""
        if self._loop is not None:
            for queue in list(self._subscribers):
                self._loop.call_soon_threadsafe(self._end, queue)

    def describe(self) -> dict[str, Any]:
        return {
            "bus": "nats" if self.nats_url else "in-process",
            "published": self.published,
            "parked": self.parked,
            "streams": len(self._subscribers),
            "error": self.last_error,
        }
