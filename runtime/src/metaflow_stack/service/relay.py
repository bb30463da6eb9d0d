"""The relay: publishes the event log in ``seq`` order, as far as it is settled.

In process, or to NATS JetStream in messages of up to ``MESSAGE_EVENTS``
consecutive events of one run; what the broker refuses outright is parked;
a broker that is down only delays. See ``events`` for the guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Select, Update, bindparam, delete, func, insert, literal_column, select, update

from metaflow_stack.service import schema as s
from metaflow_stack.service.access import now_ms
from metaflow_stack.service.event_bus import STREAM, Bus, Logged, event_of, subject, the_log

log = logging.getLogger("metaflow_stack.service.events")

_BATCH = 2000
#: The bounds of the reading statement's snapshot (subqueries, so worked out once, not per row): every
#: transaction below ``xmin`` has ended, and every one the snapshot could list as open is below ``xmax``.
_SNAPSHOT_BOUNDS = tuple(
    select(literal_column(f"pg_snapshot_{bound}(pg_current_snapshot())::text::bigint")).scalar_subquery()
    for bound in ("xmin", "xmax")
)
PUBLISH_TIMEOUT_S = 5.0
#: Events of one run per NATS message, at most (a message stays well under NATS's 1 MB default).
MESSAGE_EVENTS = 256
PRUNE_EVERY_S = 3600.0
#: After a wake-up, how long the relay lets further commits gather before it reads. Without it, a
#: steady stream of writes kept the relay reading a few events at a time as fast as it could: a
#: quarter of a 2-core machine spent on per-round costs. Events wait this long at most.
GATHER_S = 0.05
#: The same while writes are heavy (the last round published at least ``BUSY_EVENTS``, about 1,300 events
#: a second): a round costs the relay's process a millisecond or more of CPU whatever its size (plus the
#: database's and the broker's share), taken from the writers it follows. Fewer, larger rounds cut its
#: CPU per event at 8 writers by a fifth, and a lone writer at full speed (about 150 events a round at
#: 50 ms) went from 20 rounds a second to 4 (``docs/benchmarks.md``). Events wait this long at most then:
#: from about 1,300 events a second, and for as long as they keep up 256 a second (64 a round of 250 ms).
GATHER_BUSY_S = 0.25
BUSY_EVENTS = 64


@functools.cache
def _pending_query(dialect: str) -> Select:
    """The relay's read, built once: it has no parameters, and SQLAlchemy then keys its cache on the object."""
    published = select(s.relay_state.c.published_seq).scalar_subquery()
    log = the_log(dialect, published, _BATCH).subquery()
    query = select(*log.c).order_by(log.c.seq)
    if dialect == "postgresql":
        query = query.add_columns(published, *_SNAPSHOT_BOUNDS)
    return query


@functools.cache
def _mark_statement() -> Update:
    state = s.relay_state.c
    upto = bindparam("upto")
    return update(s.relay_state).where(state.published_seq < upto).values(published_seq=upto)


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
        backoff, last_round = 0.1, 0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # unlike wait_for, never swallows a cancellation
                    await self._wakeup.wait()
            await asyncio.sleep(GATHER_BUSY_S if last_round >= BUSY_EVENTS else GATHER_S)
            last_round = 0
            self._wakeup.clear()
            self._wake_due = False
            try:
                if self.nats_url:
                    await self._connect()  # declares the stream even before the first event, for consumers
                while batch := await asyncio.to_thread(self._pending):
                    await self._publish(batch)
                    await asyncio.to_thread(self._mark, batch[-1].seq)
                    self.published += len(batch)
                    last_round += len(batch)
                    if len(batch) < _BATCH:
                        break  # caught up: the next round waits for a commit
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
                # (the open /healthcheck says only its kind: a driver's text may name the database's host and user)
                self.last_error = type(exc).__name__
                # Declared again on the next try: a broker restarted without its storage, or whose stream was
                # deleted, answers "no stream" to every publish on the connection that outlived it.
                self._jetstream = None
                await asyncio.to_thread(self.close_connection)
                log.warning("event relay paused: %s: %s (retrying in %.1fs)", self.last_error, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wakeup.set()

    def _pending(self) -> list[Logged]:
        """The events to publish next: the log after the published watermark, in order, up to the first
        number an open transaction may still commit.

        One read, in one statement (so one snapshot, whose bounds come with
        the rows): the writes numbered the events, so the relay's own database
        work is this read and, per batch, one watermark update.
        """
        with self._database() as conn, conn.begin():
            rows = conn.execute(_pending_query(self.db.dialect)).all()
        if self.db.dialect != "postgresql":
            # SQLite has one writer at a time: a number not visible now was rolled back.
            return [Logged(*row) for row in rows]
        if not rows:
            return []
        start, xmin, xmax = rows[0][-3:]
        return self._settled(start, [Logged(*row[:-3]) for row in rows], xmin, xmax)

    def _settled(self, published: int, rows: list[Logged], xmin: int, xmax: int) -> list[Logged]:
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
            if row.seq != expected:
                horizon = self._horizon
                if horizon is None or xmin < horizon[0] or row.seq - 1 > horizon[1]:
                    if horizon is None or xmin >= horizon[0]:
                        self._horizon = (xmax, rows[-1].seq)
                    break
            settled.append(row)
            expected = row.seq + 1
        return settled

    def _mark(self, upto: int) -> None:
        """Record that every event through ``upto`` is published (never moving backwards)."""
        with self._database() as conn, conn.begin():
            conn.execute(_mark_statement(), {"upto": upto})

    @contextlib.contextmanager
    def _database(self) -> Iterator[Connection]:
        """The relay's own database connection, kept from one round to the next, used by one thread at a time.

        A connection from the pool each round cost a liveness ping and a reset
        every time, several rounds a second. On PostgreSQL its commits do not
        wait for the disk: it only ever commits the watermark, and a mark lost
        in a crash means those events go out again, which consumers allow for.
        """
        with self._conn_lock:
            if self._conn is None or self._conn.invalidated:
                self._conn = self.db.writer.connect()
                if self.db.dialect == "postgresql":
                    self._conn.exec_driver_sql("SET synchronous_commit TO OFF")
                    self._conn.commit()
            yield self._conn

    def close_connection(self) -> None:
        """Give the relay's connection back (after an error, or when stopping), once a round still using it
        in its thread is done; the next round opens another."""
        with self._conn_lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def prune(self, retention_s: float) -> int:
        """Delete published event rows older than ``retention_s`` from the log; returns how many.

        The log then starts after the last of them (``pruned_seq``): the
        metadata rows numbered among them stay, as data, but leave the log.
        """
        cutoff = int((time.time() - retention_s) * 1000)
        e, state = s.events.c, s.relay_state.c
        with self.db.writer.begin() as conn:
            published = conn.execute(select(state.published_seq)).scalar_one()
            old = [e.seq <= published, e.ts_epoch < cutoff]
            upto = conn.execute(select(func.max(e.seq)).where(*old)).scalar()
            if upto is None:
                return 0
            conn.execute(update(s.relay_state).values(pruned_seq=upto))  # past every number pruned before
            return conn.execute(delete(s.events).where(e.seq <= upto)).rowcount

    async def _publish(self, batch: list[Logged]) -> None:
        if not self.nats_url:
            for event in batch:
                self._fan_out(event.head(), event.data)
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
    async def _send(jetstream: Any, group: list[Logged]) -> asyncio.Future | BaseException:
        """Publish ``group`` as one message (a JSON array of its events): its acknowledgement to await,
        or the client's refusal."""
        from nats.errors import MaxPayloadError

        try:
            return await jetstream.publish_async(
                subject(group[0].flow_id, group[0].run_number),
                f"[{','.join(event.data for event in group)}]".encode(),
                stream=STREAM,
                headers={"Nats-Msg-Id": f"{group[0].seq}-{group[-1].seq}"},
            )
        except MaxPayloadError as exc:
            return exc

    async def _one_by_one(self, jetstream: Any, group: list[Logged]) -> None:
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

    def _park(self, event: Logged, reason: str) -> None:
        """Set ``event`` aside with the broker's ``reason`` (once, however often it is refused)."""
        log.error("event %s (%s of %s) parked: %s", event.seq, event.kind, event.flow_id, reason)
        row = {**json.loads(event.data), "reason": reason[:2000], "parked_at": now_ms()}
        with self.db.writer.begin() as conn:
            known = conn.execute(select(s.parked_events.c.seq).where(s.parked_events.c.seq == event.seq)).first()
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


def _runs_of(batch: list[Logged]) -> list[list[Logged]]:
    """Consecutive events of one run, at most ``MESSAGE_EVENTS`` together: one NATS message each."""
    groups: list[list[Logged]] = []
    for event in batch:
        last = groups[-1][-1] if groups else None
        same = last is not None and (last.flow_id, last.run_number) == (event.flow_id, event.run_number)
        if same and len(groups[-1]) < MESSAGE_EVENTS:
            groups[-1].append(event)
        else:
            groups.append([event])
    return groups
