"""What the two halves of the event hub share: subjects, an event's shape and frame, the NATS connection.

The relay (``relay``) publishes; the streams (``streams``) deliver to
``/events`` clients; ``events`` states the guarantees and joins them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    ColumnElement,
    CompoundSelect,
    Connection,
    Integer,
    String,
    Text,
    case,
    cast,
    func,
    literal_column,
    select,
    type_coerce,
    union_all,
)
from sqlalchemy.sql.base import ReadOnlyColumnCollection

from metaflow_stack.service import schema as s
from metaflow_stack.service.database import Database

log = logging.getLogger("metaflow_stack.service.events")

STREAM = "METAFLOW_EVENTS"
SUBJECT_PREFIX = "metaflow.events"
DEFAULT_RETENTION_S = 30 * 86400.0
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
#: What a JSON member's name built into the log's SQL may be (``_object``).
_MEMBER = re.compile(r"[a-z_]+")


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


#: The NATS client's errors already said since it last connected (``_said_once``).
_SAID: set[str] = set()


async def _said_once(exc: Exception) -> None:
    """NATS's client would log each connection error with its traceback, at every try to reconnect, for as
    long as NATS is away: each kind is said once, in one line."""
    said = f"{type(exc).__name__}: {exc}"
    if said not in _SAID:
        _SAID.add(said)
        log.warning("NATS: %s (events wait in the database until it answers)", said)


async def _connected_again() -> None:
    """A later outage is said again (``_said_once``)."""
    if _SAID:
        _SAID.clear()
        log.warning("NATS: connected again")


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


def the_log(
    dialect: str,
    after: int | ColumnElement,
    limit: int,
    *,
    upto: int | None = None,
    flow: str | None = None,
    run: int | None = None,
) -> CompoundSelect:
    """The log's first ``limit`` events after ``after`` (through ``upto``, of ``flow`` and ``run`` when
    given), in ``seq`` order, as ``Logged`` columns.

    The log is two tables merged: event rows, and metadata rows numbered as
    their own events (``event_log``). A page of each is read in ``seq``
    order through its own index, then the two are merged and cut to a page,
    so a page costs about what two pages of one table do, however long the
    log. It starts after the last number pruned, read in the same statement:
    read apart, a prune between the two reads could leave a page with the
    metadata rows of a stretch whose event rows were gone.
    """
    e, m = s.events.c, s.metadata_rows.c
    rows = select(e.seq, e.kind, e.flow_id, e.run_number, _event(dialect, e, e.kind, e.body))
    # Typed as ``events.kind`` is, so the two tables' rows are of one type.
    kind = cast(literal_column("'metadata'"), e.kind.type)
    numbered = select(
        m.seq, kind.label("kind"), m.flow_id, m.run_number, _event(dialect, m, kind, _metadatum(dialect, m))
    )

    pruned = select(s.relay_state.c.pruned_seq).scalar_subquery()

    def where(c: ReadOnlyColumnCollection) -> list[ColumnElement[bool]]:
        # SQLite, with no statistics, would read a run's metadata through its index by run and sort all of
        # it for each page; a unary + keeps it on the index by seq (its documented way to disqualify a term).
        run_number = c.run_number if dialect == "postgresql" or c is e else literal_column("+metadata.run_number")
        return [
            c.seq > after,
            c.seq > pruned,
            *([c.seq <= upto] if upto is not None else []),
            *([c.flow_id == flow] if flow is not None else []),
            *([run_number == run] if run is not None else []),
        ]

    # Each table's page alone first: given the two merged, PostgreSQL sorted every row after ``seq`` to take a page.
    pages = [
        rows.where(*where(e)).order_by(e.seq).limit(limit).subquery(),
        numbered.where(m.seq.is_not(None), *where(m)).order_by(m.seq).limit(limit).subquery(),
    ]
    return union_all(*(select(*page.c) for page in pages)).order_by("seq").limit(limit)


def _object(dialect: str, fields: dict[str, ColumnElement]) -> ColumnElement:
    """A JSON object built by the database, its members' values encoded by their columns' types.

    On PostgreSQL it is the members' JSON texts joined, each encoded for its
    type: a number's digits and a JSON column's text as they are, a string
    through ``to_json`` (which escapes it). That halved the log read's
    database time against ``json_build_object``, whose variadic call works
    out every argument's type and encoding on every row; the log is read
    once per event by the relay, on the cores the writes run on
    (``docs/benchmarks.md``). On SQLite, ``json_object``, with JSON columns
    read as JSON (SQLite keeps them as text, which would go out quoted).
    Member names are written into the SQL, so only plain names are taken.
    """
    if dialect != "postgresql":
        values = (func.json(value) if isinstance(value.type, JSON) else value for value in fields.values())
        return func.json_object(*(item for pair in zip(fields, values, strict=True) for item in pair))
    text: ColumnElement | None = None
    for number, (name, value) in enumerate(fields.items()):
        if not _MEMBER.fullmatch(name):
            raise ValueError(f"{name!r} is not a plain member name")
        start = literal_column(f"'{'{' if number == 0 else ','}{json.dumps(name)}:'", Text)
        member = start + func.coalesce(_json_text(value), literal_column("'null'", Text))
        text = member if text is None else text + member
    return type_coerce(text + literal_column("'}'", Text), JSON)


def _json_text(value: ColumnElement) -> ColumnElement:
    """``value`` as JSON text on PostgreSQL (NULL stays NULL): a JSON value (a column, or one built here) as
    its text, a number as its digits, a string through ``to_json``."""
    if isinstance(value.type, JSON | Integer):
        return cast(value, Text)
    if isinstance(value.type, String):
        return cast(func.to_json(value), Text)
    raise TypeError(f"no JSON encoding for {value.type!r}")


def _event(dialect: str, c: ReadOnlyColumnCollection, kind: ColumnElement, body: ColumnElement) -> ColumnElement:
    """An event's JSON text (the ``data`` column): what routes it, and its body."""
    fields = {"seq": c.seq, "kind": kind, "flow_id": c.flow_id, "run_number": c.run_number, "ts_epoch": c.ts_epoch}
    event = _object(dialect, fields | {"body": body})
    return (cast(event, Text) if dialect == "postgresql" else event).label("data")


def _exposed(dialect: str, name: ColumnElement, number: ColumnElement) -> ColumnElement:
    """An id as the API exposes it: its client-chosen name when it has one, else its number (``rows``)."""
    if dialect == "postgresql":
        # Already JSON text: typed as JSON so that ``_object`` embeds it as it is.
        return type_coerce(func.coalesce(_json_text(name), _json_text(number)), JSON)
    return func.coalesce(name, number)


def _metadatum(dialect: str, m: ReadOnlyColumnCollection) -> ColumnElement:
    """A metadata event's body: the metadatum as ``GET .../metadata`` answers it (``rows.metadatum``), with its
    attempt and the status it records (``running`` for ``attempt``, ``completed`` or ``failed`` for
    ``attempt_ok``; null for any other field). That is the recorded attempt's status: an outcome arriving
    late for an earlier attempt says so by its ``attempt_id``, and does not change the task's latest
    attempt (``attempts``)."""
    status = case(
        (m.field_name == "attempt", literal_column("'running'", Text)),
        (
            m.field_name == "attempt_ok",
            case((m.value == "True", literal_column("'completed'", Text)), else_=literal_column("'failed'", Text)),
        ),
    )
    return _object(
        dialect,
        {
            "id": m.id,
            "flow_id": m.flow_id,
            "run_number": _exposed(dialect, m.run_id, m.run_number),
            "step_name": m.step_name,
            "task_id": _exposed(dialect, m.task_name, m.task_id),
            "field_name": m.field_name,
            "value": m.value,
            "type": m.type,
            "user_name": m.user_name,
            "ts_epoch": m.ts_epoch,
            "tags": m.tags,
            "system_tags": m.system_tags,
            "attempt_id": m.attempt_id,
            "status": status,
        },
    )


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
                self.nats_url,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                error_cb=_said_once,
                reconnected_cb=_connected_again,
            )
            await _connected_again()  # (a first connection after failed ones: no reconnection to say it)
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
