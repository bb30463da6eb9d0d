"""The relay: publishes the event log in ``seq`` order, as far as it is settled.

In process, or to NATS JetStream in messages of up to ``MESSAGE_EVENTS``
consecutive events of one run; what the broker refuses outright is parked;
a broker that is down only delays. See ``events`` for the guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from sqlalchemy import Connection, delete, insert, select, text, update

from metaflow_stack.service import schema as s
from metaflow_stack.service.access import now_ms
from metaflow_stack.service.event_bus import STREAM, Bus, event_of, subject

log = logging.getLogger("metaflow_stack.service.events")

_BATCH = 2000
#: The bounds of the reading transaction's snapshot: every transaction below ``xmin`` has ended, and
#: every one the snapshot could list as open is below ``xmax``.
_SNAPSHOT_BOUNDS = text(
    "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint FROM pg_current_snapshot() s"
)
PUBLISH_TIMEOUT_S = 5.0
#: Events of one run per NATS message, at most (a message stays well under NATS's 1 MB default).
MESSAGE_EVENTS = 256
PRUNE_EVERY_S = 3600.0


def _refused(error: BaseException) -> bool:
    """Whether the broker refused this message for good (resending it would be refused again)."""
    from nats.errors import MaxPayloadError
    from nats.js.errors import APIError

    if isinstance(error, MaxPayloadError):
        return True
    code = getattr(error, "code", None) if isinstance(error, APIError) else None
    return isinstance(code, int) and 400 <= code < 500 and code != 408


class Relay(Bus):
    """Publishes, parks and prunes."""

    #: While the log has a hole: the ``xmax`` of the snapshot that first saw it, and the highest ``seq``
    #: that snapshot read (holes below it are rolled back once every transaction below ``xmax`` ended).
    _horizon: tuple[int, int] | None = None

    async def _relay(self) -> None:
        backoff = 0.1
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # unlike wait_for, never swallows a cancellation
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                while batch := await asyncio.to_thread(self._pending):
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
                # Declared again on the next try: a broker restarted without its storage, or whose stream was
                # deleted, answers "no stream" to every publish on the connection that outlived it.
                self._jetstream = None
                log.warning("event relay paused: %s (retrying in %.1fs)", self.last_error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wakeup.set()

    def _pending(self) -> list[dict[str, Any]]:
        """The events to publish next: the log after the published watermark, in order, up to the first
        number an open transaction may still commit.

        Reading only, in one snapshot: the writes numbered the events, so the
        relay's own database work is a read and, per batch, one watermark update.
        """
        e = s.events.c
        with self._snapshot() as conn:
            published = conn.execute(select(s.relay_state.c.published_seq)).scalar_one()
            query = select(s.events).where(e.seq > published).order_by(e.seq).limit(_BATCH)
            rows = conn.execute(query).mappings().all()
            if not rows or self.db.dialect != "postgresql":
                # SQLite has one writer at a time: a number not visible now was rolled back.
                return [event_of(row) for row in rows]
            xmin, xmax = conn.execute(_SNAPSHOT_BOUNDS).one()
        return self._settled(published, rows, xmin, xmax)

    def _snapshot(self) -> contextlib.AbstractContextManager[Connection]:
        """A connection whose transaction reads one snapshot (the log and the snapshot's bounds agree)."""
        conn = self.db.writer.connect()
        if self.db.dialect == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        return contextlib.closing(conn)

    def _settled(self, published: int, rows: list[Any], xmin: int, xmax: int) -> list[dict[str, Any]]:
        """The leading events of ``rows`` (read in a snapshot with bounds ``xmin``/``xmax``) that nothing
        can still precede.

        A missing number is held by an open transaction or was rolled back. Its
        holder took its transaction id before the number, and the number was
        handed out before the highest one this snapshot sees, so the holder is
        among the transactions this snapshot lists as open (all below its
        ``xmax``). Once a later snapshot's ``xmin`` passes that ``xmax``, they
        have all ended: a number still missing then was rolled back and is
        skipped. Meanwhile the relay stops at the hole (a commit wakes it).
        """
        settled, expected = [], published + 1
        for row in rows:
            if row["seq"] != expected:
                horizon = self._horizon
                if horizon is None or xmin < horizon[0] or row["seq"] - 1 > horizon[1]:
                    if horizon is None or xmin >= horizon[0]:
                        self._horizon = (xmax, rows[-1]["seq"])
                    break
            settled.append(event_of(row))
            expected = row["seq"] + 1
        return settled

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
                {**event_of(row), "reason": row["reason"], "parked_at": row["parked_at"]}
                for row in conn.execute(query).mappings()
            ]


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
