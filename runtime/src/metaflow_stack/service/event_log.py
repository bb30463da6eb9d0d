"""The event log, written by the writes themselves: an event commits (or rolls back) with its write.

A metadata row is its own event: it is numbered as it is inserted (``number``
below, or the column's default on PostgreSQL) and nothing else is written;
at 8 concurrent writers an event row beside it cost 5 to 13 points of the
write rate. Every other write (creations, artifacts, tags, a run's status:
a few per task) calls ``append``, which inserts into ``events`` inside the
writer's transaction, numbered there (see ``schema.events``). Nothing is
written again later and nothing here talks to a broker, so a write succeeds
whether or not one is up. The relay (``relay``) publishes the log, the two
tables merged (``event_bus.the_log``), in ``seq`` order.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, insert, text

from metaflow_stack.service import schema as s

#: SQLite's counter behind ``events``' ``AUTOINCREMENT``: the next event row is numbered after its value.
_TAKE_NUMBERS = text("UPDATE sqlite_sequence SET seq = seq + :count WHERE name = 'events' RETURNING seq")


def append(conn: Connection, flow_id: str, run_number: int | None, kind: str, body: dict[str, Any]) -> None:
    """Append one event to the log inside ``conn``'s transaction."""
    conn.execute(
        insert(s.events).values(
            flow_id=flow_id, run_number=run_number, kind=kind, body=body, ts_epoch=int(time.time() * 1000)
        )
    )


def number(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Give metadata ``rows`` about to be inserted in ``conn``'s transaction their numbers in the log.

    On PostgreSQL the column's default does it (``events.seq``'s own). On
    SQLite the numbers are taken from the log's counter here: its one
    writer at a time commits them in order, as it does event rows.
    """
    if conn.dialect.name == "postgresql" or not rows:
        return
    last = conn.execute(_TAKE_NUMBERS, {"count": len(rows)}).scalar_one()
    for seq, row in enumerate(rows, start=last - len(rows) + 1):
        row["seq"] = seq
