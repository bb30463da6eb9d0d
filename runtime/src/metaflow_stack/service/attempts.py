"""A task's attempts and outcome, kept current as its metadata arrives.

Metaflow records ``attempt`` when an attempt starts and ``attempt_ok`` when
it ends; the service keeps each task's latest attempt and its outcome (and
the run's, through its ``end`` step) in the same transaction as the
metadata, so status filters are indexed columns, and emits ``run-status``
events. A task's own status needs no event row: the metadata row is its
event, and carries the status it sets (``event_bus``).
"""

from __future__ import annotations

from sqlalchemy import Connection, RowMapping, update

from metaflow_stack.ids import is_number
from metaflow_stack.service import event_log, rows
from metaflow_stack.service import schema as s


def track_attempt(conn: Connection, run_row: RowMapping, task_row: RowMapping, datum: dict) -> None:
    """Keep the task's latest attempt and its outcome (and the run's, for ``end``) current."""
    field, t, run_number = datum["field_name"], s.tasks.c, run_row["run_number"]
    if field == "attempt" and is_number(datum["value"]):
        attempt = int(datum["value"])
        conn.execute(
            update(s.tasks)
            .where(t.task_id == task_row["task_id"], t.attempt <= attempt)
            .values(attempt=attempt, attempt_ok=None, finished_at=None)
        )
        if task_row["step_name"] == "end":
            conn.execute(
                update(s.runs).where(s.runs.c.run_number == run_number).values(end_status=None, finished_at=None)
            )
    elif field == "attempt_ok":
        ok = datum["value"] == "True"
        attempt = datum["attempt_id"]
        condition = t.attempt == attempt if attempt is not None else t.task_id.is_not(None)
        changed = conn.execute(
            update(s.tasks)
            .where(t.task_id == task_row["task_id"], condition)
            .values(attempt_ok=ok, finished_at=datum["ts_epoch"])
        ).rowcount
        if changed and task_row["step_name"] == "end":
            status = "completed" if ok else "failed"
            conn.execute(
                update(s.runs)
                .where(s.runs.c.run_number == run_number)
                .values(end_status=status, finished_at=datum["ts_epoch"])
            )
            event_log.append(
                conn,
                run_row["flow_id"],
                run_number,
                "run-status",
                {"run_number": rows.run_key(run_row), "status": status},
            )
