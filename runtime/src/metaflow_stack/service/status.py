"""Run and task status as SQL, from the columns writes keep current.

A task is ``completed`` or ``failed`` by its latest attempt's ``attempt_ok``;
without one it is ``running`` while its heartbeat (or, for clients that send
none, its creation) is recent and its run has not ended, else ``killed``.
A run is what its ``end`` step (or the runtime's last heartbeat) said; with
neither, ``running`` while its heartbeat is recent, else ``failed`` if a task
failed and ``killed`` if none did. ``cutoff_ms`` is the epoch in milliseconds
before which a heartbeat counts as stale.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, case, exists, false, func, select, true

from metaflow_stack.service import schema as s

STATUSES = ("running", "completed", "failed", "killed")


def failed_task_exists(run_number: ColumnElement) -> ColumnElement[bool]:
    """Whether any task of the run failed its latest attempt (uses ``ix_tasks_run_status``)."""
    return exists(select(1).where(s.tasks.c.run_number == run_number, s.tasks.c.attempt_ok == false()))


def run_status(cutoff_ms: int) -> ColumnElement[str]:
    r = s.runs.c
    alive = func.coalesce(r.last_heartbeat_ts * 1000, r.ts_epoch) >= cutoff_ms
    return case(
        (r.end_status.is_not(None), r.end_status),
        (alive, "running"),
        (failed_task_exists(r.run_number), "failed"),
        else_="killed",
    )


def task_status(cutoff_ms: int) -> ColumnElement[str]:
    """Needs ``runs`` joined on ``run_number``."""
    t = s.tasks.c
    stale = func.coalesce(t.last_heartbeat_ts * 1000, t.ts_epoch) < cutoff_ms
    return case(
        (t.attempt_ok == true(), "completed"),
        (t.attempt_ok == false(), "failed"),
        (and_(s.runs.c.end_status.is_(None), ~stale), "running"),
        else_="killed",
    )
