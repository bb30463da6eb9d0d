"""The service's tables, for its writes and reads: transactions, and finding a run or a task by its id.

A write is one transaction; integrity failures become 409 (conflict) or 404
(missing parent), never a partial write, and ``on_commit`` runs after each
committed one (it wakes the event relay). Reads go to the replica unless a
client must read what it just wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, RowMapping, select
from sqlalchemy.exc import IntegrityError

from metaflow_stack.api_errors import ApiError
from metaflow_stack.ids import check_id, is_number
from metaflow_stack.service import rows
from metaflow_stack.service import schema as s
from metaflow_stack.service.database import Database


def now_ms() -> int:
    return int(time.time() * 1000)


def under(run: RowMapping, step_name: str) -> dict[str, Any]:
    """The ids a step's, task's, metadatum's or artifact's row copies from its run."""
    return {"flow_id": run["flow_id"], "run_number": run["run_number"], "run_id": run["run_id"], "step_name": step_name}


def _integrity_error(exc: IntegrityError, what: str) -> ApiError:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    text = str(exc.orig).lower()
    if sqlstate == "23505" or "unique" in text:
        return ApiError(409, "conflict", f"{what} already exists")
    if sqlstate == "23503" or "foreign key" in text:
        return ApiError(404, "not_found", f"the parent of {what} does not exist")
    return ApiError(400, "integrity_error", f"{what} was refused by the database: {exc.orig}")


class TableAccess:
    """Transactions and lookups; ``on_commit`` runs after every committed write."""

    def __init__(self, database: Database, on_commit: Callable[[], None] | None = None) -> None:
        self.db = database
        self.on_commit = on_commit or (lambda: None)

    # -- transactions -------------------------------------------------------

    @contextmanager
    def write(self, what: str) -> Iterator[Connection]:
        """A write transaction; integrity failures become 409/404, never a partial write."""
        try:
            with self.db.writer.begin() as conn:
                yield conn
        except IntegrityError as exc:
            raise _integrity_error(exc, what) from None
        self.on_commit()

    @contextmanager
    def read(self, primary: bool = False) -> Iterator[Connection]:
        """A read on the replica, or on the primary where a client reads what it just wrote."""
        with (self.db.writer if primary else self.db.reader).connect() as conn:
            yield conn

    # -- lookups ------------------------------------------------------------

    @staticmethod
    def find_run(conn: Connection, flow_id: str, run: str) -> RowMapping:
        check_id("run_number", run)
        column, value = (s.runs.c.run_number, int(run)) if is_number(run) else (s.runs.c.run_id, run)
        row = conn.execute(select(s.runs).where(s.runs.c.flow_id == flow_id, column == value)).mappings().first()
        if row is None:
            raise ApiError(404, "not_found", f"run {flow_id}/{run} does not exist")
        return row

    @staticmethod
    def find_task(conn: Connection, run: RowMapping, step_name: str, task: str) -> RowMapping:
        check_id("task_id", task)
        t = s.tasks.c
        column, value = (t.task_id, int(task)) if is_number(task) else (t.task_name, task)
        row = (
            conn.execute(
                select(s.tasks).where(t.run_number == run["run_number"], t.step_name == step_name, column == value)
            )
            .mappings()
            .first()
        )
        if row is None:
            raise ApiError(
                404, "not_found", f"task {run['flow_id']}/{rows.run_key(run)}/{step_name}/{task} does not exist"
            )
        return row
