"""What the two halves of the event hub share: subjects, an event's shape and frame, the NATS connection.

The relay (``relay``) publishes; the streams (``streams``) deliver to
``/events`` clients; ``events`` states the guarantees and joins them.
"""

from __future__ import annotations

import asyncio
import base64
import re
import threading
from typing import Any, NamedTuple

from sqlalchemy import Connection, Select, Text, cast, func, select

from metaflow_stack.service import schema as s
from metaflow_stack.service.database import Database

STREAM = "METAFLOW_EVENTS"
SUBJECT_PREFIX = "metaflow.events"
DEFAULT_RETENTION_S = 30 * 86400.0
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def subject_token(value: str) -> str:
    """``value`` as one NATS subject token (never empty, and never with ``.``, ``*``, ``>`` or spaces)."""
    if _TOKEN.fullmatch(value):
        return value
    return "~" + base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def subject(flow_id: str, run_number: int | None) -> str:
    return f"{SUBJECT_PREFIX}.{subject_token(flow_id)}.{run_number if run_number is not None else '_'}"


def event_of(row: Any) -> dict[str, Any]:
    """An event as a dict, from a row with the event's columns."""
    return {
        "seq": row["seq"],
        "kind": row["kind"],
        "flow_id": row["flow_id"],
        "run_number": row["run_number"],
        "ts_epoch": row["ts_epoch"],
        "body": row["body"],
    }


class Logged(NamedTuple):
    """An event as read from the log: what routes it, and the whole event as the JSON text that goes out.

    The database writes that text, so neither the relay nor a replay decodes
    a body only to encode it again: that was most of the relay's own CPU,
    on the cores the writes it follows run on.
    """

    seq: int
    kind: str
    flow_id: str
    run_number: int | None
    data: str

    def head(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "flow_id": self.flow_id, "run_number": self.run_number}


def logged_events(dialect: str) -> Select:
    """``SELECT`` the log's events as ``Logged`` columns (add the ``WHERE``, order and limit)."""
    e = s.events.c
    fields = ("seq", e.seq, "kind", e.kind, "flow_id", e.flow_id, "run_number", e.run_number, "ts_epoch", e.ts_epoch)
    if dialect == "postgresql":
        data = cast(func.json_build_object(*fields, "body", e.body), Text)
    else:
        data = func.json_object(*fields, "body", func.json(e.body))
    return select(e.seq, e.kind, e.flow_id, e.run_number, data.label("data"))


def sse_frame(seq: int, kind: str, data: str) -> bytes:
    """One server-sent event (``event``, ``id``, ``data`` lines), made once for every stream."""
    return f"event: {kind}\nid: {seq}\ndata: {data}\n\n".encode()


class Bus:
    """The hub's state, shared by its relay and its streams."""

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
        #: A wake-up is on its way to the relay (so further commits need not send one).
        self._wake_due = False
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._nats: Any = None
        #: The NATS subscription feeding this process's streams, held only while some stream is open.
        self._live: Any = None
        self._jetstream: Any = None
        #: The relay's own database connection, and the lock that keeps it to one thread at a time.
        self._conn: Connection | None = None
        self._conn_lock = threading.Lock()
        self.published = 0
        self.last_error: str | None = None

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

    def _fan_out(self, event: dict[str, Any], encoded: str | None = None) -> None:
        """Hand ``event`` to this process's streams (``streams.Streams`` does)."""
        raise NotImplementedError
