"""Bounded task logs: ``GET .../tasks/{task}/logs/{stdout|stderr}``.

Metaflow's client downloads a task's whole log to show any of it; an agent
that wants the last 50 lines of a failed task's stderr, or a UI that follows
a running one, should not pay for gigabytes. This route answers a window:

- ``head=N`` (the default, N=1000): the first N lines, or the N after
  ``_cursor``; ``X-Next-Cursor`` is set while more lines exist.
- ``tail=N``: the last N lines, read backwards from the end of each file.
- ``grep=<regex>``: only lines whose text matches, with ``head`` or ``tail``.
- ``max_bytes`` (default 1 MiB): at most this much text in the answer;
  ``truncated`` says when it cut.
- ``attempt``: the attempt (default: the task's latest).

Both log sources (``runtime`` and ``task``) are merged by their mflog
timestamps, as the client merges them. Files are read in 64 KiB ranges; a
``head``/``tail`` read stops once it has its lines, a ``grep`` scan after 256
MiB per source (the cursor then continues the scan). The answer's
``bytes_read`` reports what the request fetched from the datastore. The body's
``cursor`` always continues after the last line returned (after the end, for
``tail``), so a client can follow a log that is still being written.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from metaflow_stack.api_errors import ApiError, bad_parameter
from metaflow_stack.datastore.cursors import encode_cursor
from metaflow_stack.datastore.log_files import STREAMS, LogFiles, ReadMeter
from metaflow_stack.datastore.log_windows import LogQuery, read_window, rendered
from metaflow_stack.service import rows
from metaflow_stack.service import schema as s
from metaflow_stack.service.store import Store


class TaskLogs:
    """Answers the logs route: finds the task's datastore in its metadata, reads a window."""

    def __init__(self, store: Store, files: LogFiles) -> None:
        self.store = store
        self.files = files

    def answer(self, request: Request, flow_id: str, run: str, step_name: str, task: str, stream: str) -> JSONResponse:
        if stream not in STREAMS:
            raise bad_parameter("stream", f"must be one of {', '.join(STREAMS)}")
        query = LogQuery.parse(request)
        m = s.metadata_rows.c
        with self.store.read() as conn:
            run_row = Store.find_run(conn, flow_id, run)
            task_row = Store.find_task(conn, run_row, step_name, task)
            attempt = query.attempt if query.attempt is not None else (task_row["attempt"] or 0)
            where = dict(
                conn.execute(
                    select(m.field_name, m.value)
                    .where(m.task_id == task_row["task_id"], m.field_name.in_(("ds-type", "ds-root")))
                    .where((m.attempt_id == attempt) | m.attempt_id.is_(None))
                    .order_by(m.id)
                ).all()
            )
        pathspec = f"{flow_id}/{rows.run_key(run_row)}/{step_name}/{rows.task_key(task_row)}"
        if "ds-type" not in where or "ds-root" not in where:
            raise ApiError(404, "not_found", f"{pathspec} attempt {attempt} recorded no datastore, so no logs")
        meter = ReadMeter()
        components = tuple(pathspec.split("/"))
        files = self.files.open(where["ds-type"], where["ds-root"], components, attempt, stream, meter)
        window = read_window(files, query)
        cursor = encode_cursor([attempt, *window.offsets])
        body: dict[str, Any] = {
            "pathspec": pathspec,
            "stream": stream,
            "attempt": attempt,
            "lines": rendered(window.lines),
            "truncated": window.truncated,
            "size": sum(file.size() for file in files),
            "bytes_read": meter.bytes_read,
            "cursor": cursor,
        }
        headers = {"X-Next-Cursor": cursor} if window.more else {}
        return JSONResponse(body, headers=headers)
