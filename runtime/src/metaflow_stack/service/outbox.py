"""The transactional outbox: events are rows written in the writer's transaction.

``add`` only appends to the ``outbox`` table; nothing here talks to a broker,
so a write succeeds whether or not one is up. The relay (``events``) moves
committed rows into the numbered event log in commit order and publishes them.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection, insert

from metaflow_stack.service import schema as s


def add(conn: Connection, flow_id: str, run_number: int | None, kind: str, body: dict[str, Any]) -> None:
    """Append one event to the outbox inside ``conn``'s transaction."""
    conn.execute(
        insert(s.outbox).values(
            flow_id=flow_id, run_number=run_number, kind=kind, body=body, ts_epoch=int(time.time() * 1000)
        )
    )
