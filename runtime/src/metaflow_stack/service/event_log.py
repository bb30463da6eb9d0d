"""The event log, written by the writes themselves: an event commits (or rolls back) with its write.

``append`` inserts into ``events`` inside the writer's transaction, and the
event gets its ``seq`` there (see ``schema.events``): nothing is written again
later and nothing here talks to a broker, so a write succeeds whether or not
one is up. The relay (``relay``) publishes the log in ``seq`` order.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, insert

from metaflow_stack.service import schema as s


def append(conn: Connection, flow_id: str, run_number: int | None, kind: str, body: dict[str, Any]) -> None:
    """Append one event to the log inside ``conn``'s transaction."""
    conn.execute(
        insert(s.events).values(
            flow_id=flow_id, run_number=run_number, kind=kind, body=body, ts_epoch=int(time.time() * 1000)
        )
    )
