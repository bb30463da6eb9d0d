"""Opt-in reads: cursor pages, server-side filters, run summaries and failures.

A collection asked for with no query parameter is answered whole, as the
reference service does. Any parameter selects this path: ``_limit`` (default
50, at most 1000) rows in a stable keyset order, the next page's opaque
``_cursor`` in the ``X-Next-Cursor`` header (absent on the last page), and
filters written ``field:op=v1,v2`` (values ORed, fields ANDed). An unknown
parameter, a bad value or a foreign cursor is a 400 naming the parameter.

Keyset pages cost the same at any depth: the cursor holds the last row's sort
key and every listing's index ends in that key.
"""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy import ColumnElement, Select, and_, false, func, literal, or_, select, tuple_, type_coerce
from sqlalchemy.dialects.postgresql import JSONB, array

from metaflow_stack.api_errors import bad_parameter
from metaflow_stack.datastore import CONFIDENTIAL_FIELD
from metaflow_stack.datastore.cursors import decode_cursor, encode_cursor
from metaflow_stack.datastore.task_metadata import (
    MESSAGE_CHARS,
    UNREADABLE,
    exception_fields,
    foreach_items,
    parsed,
    verification,
)
from metaflow_stack.ids import check_id, is_number
from metaflow_stack.service import rows
from metaflow_stack.service import schema as s
from metaflow_stack.service.database import Database
from metaflow_stack.service.status import STATUSES, run_status, task_status
from metaflow_stack.service.store import Store

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
#: Values one filter takes (``_tags=a,b,...``): each is a clause of the query, and a thousand made SQLite
#: refuse it (an expression tree too large); Metaflow itself allows a run 50 user tags.
MAX_FILTER_VALUES = 100
#: An integer filter's value: what a 64-bit column holds.
_INTEGER = re.compile(r"-?[0-9]{1,19}\Z")
_RANGE_OPS = {"ge": "__ge__", "gt": "__gt__", "le": "__le__", "lt": "__lt__", "eq": "__eq__"}


@dataclass
class Params:
    """A request's paging and filter parameters, checked against what the route accepts."""

    limit: int = DEFAULT_LIMIT
    cursor: list[Any] | None = None
    filters: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, request: Request, accepted: set[str]) -> Params:
        params = cls()
        for name, value in request.query_params.multi_items():
            if name == "_limit":
                if not is_number(value) or not 1 <= int(value) <= MAX_LIMIT:
                    raise bad_parameter("_limit", f"must be an integer from 1 to {MAX_LIMIT}")
                params.limit = int(value)
            elif name == "_cursor":
                params.cursor = decode_cursor(value)
            elif name in accepted:
                params.filters[name] = [v for v in value.split(",") if v != ""]
                if not params.filters[name]:
                    raise bad_parameter(name, "needs at least one value")
                if len(params.filters[name]) > MAX_FILTER_VALUES:
                    raise bad_parameter(name, f"takes at most {MAX_FILTER_VALUES} values")
            else:
                known = ", ".join(sorted(accepted | {"_limit", "_cursor"}))
                raise bad_parameter(name, f"unknown parameter here; this route accepts {known}")
        return params

    def integers(self, name: str) -> list[int]:
        values = self.filters.get(name, [])
        if not all(_INTEGER.match(v) and -(2**63) <= int(v) < 2**63 for v in values):
            raise bad_parameter(name, "must be integers of 64 bits (epoch milliseconds for ts_epoch)")
        return [int(v) for v in values]


def _ranges(params: Params, column: ColumnElement, name: str) -> list[ColumnElement[bool]]:
    """``name:ge``/``gt``/``le``/``lt``/``eq`` filters on an integer column."""
    found = []
    for op, method in _RANGE_OPS.items():
        values = params.integers(f"{name}:{op}")
        if values and op == "eq":
            found.append(column.in_(values))
        elif values:
            found.append(getattr(column, method)(values[0]))
    return found


def _statuses(params: Params) -> list[str]:
    values = params.filters.get("status:eq", [])
    unknown = sorted(set(values) - set(STATUSES))
    if unknown:
        raise bad_parameter("status:eq", f"unknown status {unknown[0]!r}; use {', '.join(STATUSES)}")
    return values


class Queries:
    """The opt-in read paths, on the reader engine."""

    def __init__(
        self, database: Database, heartbeat_cutoff_s: int, store: Store, clock: Callable[[], float] = time.time
    ) -> None:
        self.db = database
        self.cutoff_s = heartbeat_cutoff_s
        self.store = store
        #: The time statuses are judged at (a heartbeat older than the cutoff then is a killed run).
        self.clock = clock

    def _cutoff_ms(self) -> int:
        return int((self.clock() - self.cutoff_s) * 1000)

    def ping(self) -> str:
        with self.db.reader.connect() as conn:
            conn.execute(select(literal(1)))
        return "UP"

    # -- paging -------------------------------------------------------------

    def _page(
        self,
        query: Select,
        keys: list[ColumnElement],
        params: Params,
        shape: Callable[[Any], dict[str, Any]],
        descending: bool = False,
    ) -> JSONResponse:
        """One page of ``query`` in ``keys`` order, after the cursor; the next cursor in a header."""
        if params.cursor is not None:
            if len(params.cursor) != len(keys):
                raise bad_parameter("_cursor", "belongs to another listing")
            after = tuple_(*keys) < tuple_(*params.cursor) if descending else tuple_(*keys) > tuple_(*params.cursor)
            query = query.where(after)
        query = query.order_by(*[k.desc() if descending else k.asc() for k in keys]).limit(params.limit + 1)
        with self.db.reader.connect() as conn:
            found = conn.execute(query).mappings().all()
        headers = {"X-Limit": str(params.limit)}
        if len(found) > params.limit:
            found = found[: params.limit]
            headers["X-Next-Cursor"] = encode_cursor([found[-1][k.key] for k in keys])
        return JSONResponse([shape(r) for r in found], headers=headers)

    def _tags(self, params: Params) -> list[ColumnElement[bool]]:
        """``_tags:any`` / ``_tags:all`` (``_tags`` is all) over a run's user and system tags."""
        found = []
        for name in ("_tags", "_tags:all", "_tags:any"):
            values = params.filters.get(name)
            if not values:
                continue
            any_of = name == "_tags:any"
            if self.db.dialect == "postgresql":
                combined = type_coerce(s.runs.c.tags.op("||")(s.runs.c.system_tags), JSONB)
                found.append(combined.has_any(array(values)) if any_of else combined.has_all(array(values)))
                continue
            per_tag = [
                or_(*[self._json_has(column, [tag]) for column in (s.runs.c.tags, s.runs.c.system_tags)])
                for tag in values
            ]
            found.append(or_(*per_tag) if any_of else and_(*per_tag))
        return found

    @staticmethod
    def _json_has(column: ColumnElement, values: list[str]) -> ColumnElement[bool]:
        each = func.json_each(column).table_valued("value")
        return select(literal(1)).select_from(each).where(each.c.value.in_(values)).exists()

    def collection(self, request: Request, kind: str, whole: Callable, flow_id: str | None, run: str | None = None):
        """Flows, runs or run metadata: whole without parameters, else paged and filtered."""
        if not request.query_params:
            return JSONResponse(whole(kind, flow_id, run))
        if kind == "flows":
            params = Params.parse(request, {f"ts_epoch:{op}" for op in _RANGE_OPS} | {"user:eq"})
            f = s.flows.c
            query = select(s.flows).where(*_ranges(params, f.ts_epoch, "ts_epoch"))
            if "user:eq" in params.filters:
                query = query.where(f.user_name.in_(params.filters["user:eq"]))
            return self._page(query, [f.ts_epoch, f.flow_id], params, rows.flow, descending=True)
        if kind == "runs":
            return self._runs(request, check_id("flow_id", flow_id))
        params = Params.parse(request, {"field_name:eq"})
        with self.db.reader.connect() as conn:
            run_row = Store.find_run(conn, flow_id, run)
        m = s.metadata_rows.c
        query = select(s.metadata_rows).where(m.run_number == run_row["run_number"])
        if "field_name:eq" in params.filters:
            query = query.where(m.field_name.in_(params.filters["field_name:eq"]))
        return self._page(query, [m.id], params, rows.metadatum)

    def _runs(self, request: Request, flow_id: str) -> JSONResponse:
        accepted = {f"ts_epoch:{op}" for op in _RANGE_OPS} | {"user:eq", "status:eq", "_tags", "_tags:all", "_tags:any"}
        params = Params.parse(request, accepted)
        r = s.runs.c
        status = run_status(self._cutoff_ms()).label("status")
        query = select(s.runs, status).where(r.flow_id == flow_id, *_ranges(params, r.ts_epoch, "ts_epoch"))
        query = query.where(*self._tags(params))
        if "user:eq" in params.filters:
            query = query.where(r.user_name.in_(params.filters["user:eq"]))
        if _statuses(params):
            query = query.where(run_status(self._cutoff_ms()).in_(_statuses(params)))
        return self._page(query, [r.ts_epoch, r.run_number], params, _run_with_status, descending=True)

    # -- tasks --------------------------------------------------------------

    def _tasks(self, request: Request, flow_id: str, run: str, step_name: str | None) -> JSONResponse:
        accepted = {f"ts_epoch:{op}" for op in _RANGE_OPS} | {"status:eq"}
        if step_name is None:
            accepted.add("step:eq")
        params = Params.parse(request, accepted)
        with self.db.reader.connect() as conn:
            run_row = Store.find_run(conn, flow_id, run)
        t = s.tasks.c
        status = task_status(self._cutoff_ms())
        m = s.metadata_rows.c

        def latest(field: str) -> Any:  # the task's latest metadatum of ``field``: one index lookup per task
            query = select(m.value).where(m.task_id == t.task_id, m.field_name == field)
            return query.order_by(m.id.desc()).limit(1).scalar_subquery()

        def record(n: int) -> Any:  # the nth verification record of the task's latest attempt: two tell many
            query = select(m.value).where(
                m.task_id == t.task_id, m.field_name == CONFIDENTIAL_FIELD, m.attempt_id == t.attempt
            )
            return query.order_by(m.id).offset(n).limit(1).scalar_subquery()

        query = (
            select(
                s.tasks,
                status.label("status"),
                s.runs.c.tags.label("run_tags"),
                s.runs.c.system_tags.label("run_system_tags"),
                latest("foreach-stack").label("foreach_stack"),
                record(0).label("verification"),
                record(1).label("other_verification"),
            )
            .join(s.runs, s.runs.c.run_number == t.run_number)
            .where(t.run_number == run_row["run_number"], *_ranges(params, t.ts_epoch, "ts_epoch"))
        )
        steps = [step_name] if step_name else params.filters.get("step:eq")
        if steps:
            query = query.where(t.step_name.in_(steps))
        else:  # a run's tasks, as Metaflow's Client API lists them: without its internal steps (``_parameters``)
            query = query.where(~t.step_name.startswith("_", autoescape=True))
        if _statuses(params):
            query = query.where(status.in_(_statuses(params)))
        return self._page(query, [t.task_id], params, _task_with_status)

    def step_tasks(self, request: Request, flow_id: str, run: str, step_name: str):
        if not request.query_params:
            return JSONResponse(self.store.list_all("tasks", flow_id, run, step_name))
        return self._tasks(request, flow_id, run, step_name)

    def run_tasks(self, request: Request, flow_id: str, run: str) -> JSONResponse:
        return self._tasks(request, flow_id, run, None)

    # -- artifacts ----------------------------------------------------------

    def artifacts(
        self, request: Request, flow_id: str, run: str | None, step_name: str | None = None, task: str | None = None
    ):
        """Artifact rows (never their values) by name, type and size; latest attempt of each task."""
        if not request.query_params and run is not None:
            return JSONResponse(self.store.artifacts(flow_id, run, step_name, task))
        accepted = {"name:eq", "name:co", "type:eq", "content_type:eq", "sha:eq"} | {f"size:{op}" for op in _RANGE_OPS}
        if step_name is None:
            accepted.add("step:eq")
        params = Params.parse(request, accepted)
        a = s.artifacts.c
        newer = s.artifacts.alias("newer")
        query = (
            select(s.artifacts, s.runs.c.tags.label("run_tags"), s.runs.c.system_tags.label("run_system_tags"))
            .join(s.runs, s.runs.c.run_number == a.run_number)
            .where(
                a.flow_id == check_id("flow_id", flow_id),
                ~select(literal(1)).where(newer.c.task_id == a.task_id, newer.c.attempt_id > a.attempt_id).exists(),
                *_ranges(params, a.size, "size"),
            )
        )
        with self.db.reader.connect() as conn:
            if run is not None:
                run_row = Store.find_run(conn, flow_id, run)
                query = query.where(a.run_number == run_row["run_number"])
                if task is not None:
                    query = query.where(a.task_id == Store.find_task(conn, run_row, step_name, task)["task_id"])
        steps = [step_name] if step_name else params.filters.get("step:eq")
        if steps:
            query = query.where(a.step_name.in_(steps))
        equal = (
            ("name:eq", a.name),
            ("type:eq", a.python_type),
            ("content_type:eq", a.content_type),
            ("sha:eq", a.sha),
        )
        for name, column in equal:
            if name in params.filters:
                query = query.where(column.in_(params.filters[name]))
        if "name:co" in params.filters:
            query = query.where(or_(*[a.name.contains(v, autoescape=True) for v in params.filters["name:co"]]))
        return self._page(query, [a.id], params, _artifact_with_details)

    # -- run views ----------------------------------------------------------

    def summary(self, flow_id: str, run: str) -> dict[str, Any]:
        """Per-step task counts by status, the first failure and the duration, in one request.

        Metaflow's internal steps (``_parameters``) are left out, as its Client API leaves them out.
        """
        t = s.tasks.c
        status = task_status(self._cutoff_ms()).label("status")
        with self.db.reader.connect() as conn:
            run_row = Store.find_run(conn, flow_id, run)
            number = run_row["run_number"]
            run_state = conn.execute(
                select(run_status(self._cutoff_ms())).where(s.runs.c.run_number == number)
            ).scalar()
            counts = conn.execute(
                select(t.step_name, status, func.count())
                .select_from(s.tasks.join(s.runs, s.runs.c.run_number == t.run_number))
                .where(t.run_number == number, ~t.step_name.startswith("_", autoescape=True))
                .group_by(t.step_name, status)
            ).all()
            order = conn.execute(
                select(s.steps.c.step_name)
                .where(s.steps.c.run_number == number, ~s.steps.c.step_name.startswith("_", autoescape=True))
                .order_by(s.steps.c.ts_epoch)
            ).scalars()
            first = conn.execute(self._failed(number).order_by(t.finished_at, t.task_id).limit(1)).mappings().first()
        per_step: dict[str, dict[str, int]] = {name: dict.fromkeys(("total", *STATUSES), 0) for name in order}
        for step_name, state, count in counts:
            entry = per_step.setdefault(step_name, dict.fromkeys(("total", *STATUSES), 0))
            entry[state] += count
            entry["total"] += count
        finished = run_row["finished_at"]
        return {
            "flow_id": flow_id,
            "run_number": rows.run_key(run_row),
            "status": run_state,
            "ts_epoch": run_row["ts_epoch"],
            "finished_at": finished,
            "duration_ms": (finished or int(self.clock() * 1000)) - run_row["ts_epoch"],
            "steps": [{"step_name": name, **c} for name, c in per_step.items()],
            "first_failure": _failure(first, flow_id, run_row) if first else None,
        }

    @staticmethod
    def _failed(run_number: int) -> Select:
        t, m = s.tasks.c, s.metadata_rows.c
        exception = (
            select(m.value)
            .where(m.task_id == t.task_id, m.field_name == "exception", m.attempt_id == t.attempt)
            .order_by(m.id.desc())
            .limit(1)
            .scalar_subquery()
        )
        return select(s.tasks, exception.label("exception")).where(t.run_number == run_number, t.attempt_ok == false())

    def failures(self, request: Request, flow_id: str, run: str) -> JSONResponse:
        """The run's tasks whose latest attempt failed, each with its exception (from metadata)."""
        params = Params.parse(request, {"step:eq"})
        with self.db.reader.connect() as conn:
            run_row = Store.find_run(conn, flow_id, run)
        query = self._failed(run_row["run_number"])
        if "step:eq" in params.filters:
            query = query.where(s.tasks.c.step_name.in_(params.filters["step:eq"]))
        return self._page(query, [s.tasks.c.task_id], params, lambda r: _failure(r, flow_id, run_row))


def _run_with_status(row: Any) -> dict[str, Any]:
    return rows.run(row) | {"status": row["status"], "finished_at": row["finished_at"]}


def _run_tags(row: Any) -> dict[str, Any]:
    return {"tags": row["run_tags"], "system_tags": row["run_system_tags"]}


def _task_with_status(row: Any) -> dict[str, Any]:
    extra = {k: row[k] for k in ("status", "attempt", "finished_at")}
    records = [value for value in (row["verification"], row["other_verification"]) if value is not None]
    recorded = {"foreach": _foreach(row["foreach_stack"]), "confidential": verification(records)}
    return rows.task(row, _run_tags(row)) | extra | recorded


#: The longest stored foreach stack parsed: Metaflow records at most 256 characters of items, whose repr is under
#: 3 KiB even with every character escaped (``\U0001f600``: 10 each) and each item's quotes and comma, while each
#: item of a literal costs its parse (a 64 KiB list of 32,000 cost 0.1 s, every read).
_FOREACH_MAX = 4096


def _foreach(value: str | None) -> list[str]:
    """A stored ``foreach-stack`` value (the repr of a list of ``var=item``) as that list, bounded."""
    if not value or len(value) > _FOREACH_MAX or not value.startswith("["):
        return []
    try:
        return foreach_items(ast.literal_eval(value))
    except UNREADABLE:
        return []


def _artifact_with_details(row: Any) -> dict[str, Any]:
    return rows.artifact(row, _run_tags(row)) | {"size": row["size"], "python_type": row["python_type"]}


def _failure(row: Any, flow_id: str, run_row: Any) -> dict[str, Any]:
    stored = row["exception"]
    found = parsed(stored) if stored else None
    if stored and found is None:  # not JSON (or too long or deep to parse): the text itself, cut
        found = {"type": None, "message": stored[:MESSAGE_CHARS]}
    task = rows.task_key(row)
    return {
        "pathspec": f"{flow_id}/{rows.run_key(run_row)}/{row['step_name']}/{task}",
        "step_name": row["step_name"],
        "task_id": task,
        "attempt": row["attempt"],
        "finished_at": row["finished_at"],
        "exception": exception_fields(found) if stored else None,
    }
