"""Reads and writes with the semantics of Metaflow's service 2.5.x.

Every write is one transaction that also appends its event to the outbox
(``outbox.add``), so a write and its event commit or roll back together; a
failed request leaves nothing behind. Creation conflicts answer 409 (the
client then reads the row), a missing parent 404, a body of the wrong shape
400 naming the field.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from packaging.version import InvalidVersion, Version
from sqlalchemy import Connection, RowMapping, and_, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError

from metaflow_stack.api_errors import ApiError, bad_parameter
from metaflow_stack.ids import check_id
from metaflow_stack.patterns import compile_pattern
from metaflow_stack.service import outbox, rows
from metaflow_stack.service import schema as s
from metaflow_stack.service.bodies import (
    ArtifactBody,
    Created,
    Metadatum,
    RunBody,
    RunHeartbeat,
    TagMutation,
    TaskBody,
)
from metaflow_stack.service.database import Database
from metaflow_stack.service.status import failed_task_exists

#: Seconds between heartbeats the service asks clients for.
HEARTBEAT_INTERVAL_S = 10
#: How long PostgreSQL may match one ``filtered_tasks`` pattern.
PATTERN_TIMEOUT_MS = 5000

_ATTEMPT_TAG = re.compile(r"^attempt_id:(\d+)$")
#: The fields of a creation body stored as they are.
_OWNER = {"user_name", "tags", "system_tags"}


def now_ms() -> int:
    return int(time.time() * 1000)


def heartbeat_capable(system_tags: list[str] | None) -> bool:
    """Whether the client's ``metaflow_version:`` system tag is one that sends heartbeats."""
    tags = [t for t in system_tags or [] if t.startswith("metaflow_version:")]
    if not tags:
        return False
    match = re.match(r"\d+(\.\d+)*", tags[0][len("metaflow_version:") :])
    try:
        version = Version(match[0]) if match else None
    except InvalidVersion:
        version = None
    if version is None:
        return True  # non-standard versions are treated as capable, as the reference service does
    return version >= Version("1.14.0") if version.major == 1 else version >= Version("2.2.12")


def _attempt_of(tags: list[str] | None) -> int | None:
    for tag in tags or []:
        match = _ATTEMPT_TAG.match(tag)
        if match:
            return int(match.group(1))
    return None


def _under(run: RowMapping, step_name: str) -> dict[str, Any]:
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


class Store:
    """The service's data access; ``on_commit`` runs after every committed write."""

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
        column, value = (s.runs.c.run_number, int(run)) if run.isdigit() else (s.runs.c.run_id, run)
        row = conn.execute(select(s.runs).where(s.runs.c.flow_id == flow_id, column == value)).mappings().first()
        if row is None:
            raise ApiError(404, "not_found", f"run {flow_id}/{run} does not exist")
        return row

    @staticmethod
    def find_task(conn: Connection, run: RowMapping, step_name: str, task: str) -> RowMapping:
        check_id("task_id", task)
        t = s.tasks.c
        column, value = (t.task_id, int(task)) if task.isdigit() else (t.task_name, task)
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

    # -- creation -----------------------------------------------------------

    def create_flow(self, flow_id: str, body: Created) -> dict[str, Any]:
        row = {"flow_id": check_id("flow_id", flow_id), "ts_epoch": now_ms(), **body.model_dump(include=_OWNER)}
        with self.write(f"flow {flow_id}") as conn:
            conn.execute(insert(s.flows).values(row))
            outbox.add(conn, flow_id, None, "flow", {"flow_id": flow_id})
        return rows.flow(row)

    def create_run(self, flow_id: str, body: RunBody) -> dict[str, Any]:
        run_id = body.run_number
        if run_id is not None:
            if run_id.isdigit():
                raise bad_parameter("run_number", "a client-chosen run id must be a non-numeric string")
            check_id("run_number", run_id)
        values = {
            "flow_id": check_id("flow_id", flow_id),
            "run_id": run_id,
            "ts_epoch": now_ms(),
            **body.model_dump(include=_OWNER),
            "last_heartbeat_ts": int(time.time()) if heartbeat_capable(body.system_tags) else None,
        }
        with self.write(f"run {flow_id}/{run_id or '(new)'}") as conn:
            number = conn.execute(insert(s.runs).values(values).returning(s.runs.c.run_number)).scalar_one()
            row = {**values, "run_number": number}
            outbox.add(conn, flow_id, number, "run", rows.run(row))
        return rows.run(row)

    def create_step(self, flow_id: str, run: str, step_name: str, body: Created) -> dict[str, Any]:
        check_id("step_name", step_name)
        with self.write(f"step {flow_id}/{run}/{step_name}") as conn:
            run_row = self.find_run(conn, flow_id, run)
            values = _under(run_row, step_name) | {"ts_epoch": now_ms(), **body.model_dump(include=_OWNER)}
            values["user_name"] = values["user_name"] or ""
            conn.execute(insert(s.steps).values(values))
            answer = rows.step(values, run_row)
            outbox.add(conn, flow_id, run_row["run_number"], "step", answer)
        return answer

    def create_task(self, flow_id: str, run: str, step_name: str, body: TaskBody) -> dict[str, Any]:
        check_id("step_name", step_name)
        task_name = body.task_id
        if task_name is not None:
            if task_name.isdigit():
                raise bad_parameter("task_id", "a client-chosen task id must be a non-numeric string")
            check_id("task_id", task_name)
        beats = heartbeat_capable(body.system_tags)
        with self.write(f"task {flow_id}/{run}/{step_name}/{task_name or '(new)'}") as conn:
            run_row = self.find_run(conn, flow_id, run)
            values = _under(run_row, step_name) | {
                "task_name": task_name,
                "ts_epoch": now_ms(),
                **body.model_dump(include=_OWNER),
                "last_heartbeat_ts": int(time.time()) if beats else None,
            }
            task_id = conn.execute(insert(s.tasks).values(values).returning(s.tasks.c.task_id)).scalar_one()
            if beats:
                self._beat_run(conn, run_row["run_number"])
            answer = rows.task({**values, "task_id": task_id}, run_row)
            outbox.add(conn, flow_id, run_row["run_number"], "task", answer)
        return answer

    # -- heartbeats ---------------------------------------------------------

    @staticmethod
    def _beat_run(conn: Connection, run_number: int) -> None:
        conn.execute(update(s.runs).where(s.runs.c.run_number == run_number).values(last_heartbeat_ts=int(time.time())))

    def run_heartbeat(self, flow_id: str, run: str, body: RunHeartbeat) -> dict[str, Any]:
        """A run's heartbeat; ``{"ended": true}`` (sent by this project's client) ends the run."""
        ended = body.ended
        with self.write(f"heartbeat of run {flow_id}/{run}") as conn:
            run_row = self.find_run(conn, flow_id, run)
            self._beat_run(conn, run_row["run_number"])
            if ended and run_row["end_status"] is None:
                status = (
                    "failed" if conn.execute(select(failed_task_exists(run_row["run_number"]))).scalar() else "killed"
                )
                conn.execute(
                    update(s.runs)
                    .where(s.runs.c.run_number == run_row["run_number"])
                    .values(end_status=status, finished_at=now_ms())
                )
                outbox.add(
                    conn,
                    flow_id,
                    run_row["run_number"],
                    "run-status",
                    {"run_number": rows.run_key(run_row), "status": status},
                )
        return {"wait_time_in_seconds": HEARTBEAT_INTERVAL_S}

    def task_heartbeat(self, flow_id: str, run: str, step_name: str, task: str) -> dict[str, Any]:
        with self.write(f"heartbeat of task {flow_id}/{run}/{step_name}/{task}") as conn:
            run_row = self.find_run(conn, flow_id, run)
            task_row = self.find_task(conn, run_row, step_name, task)
            self._beat_run(conn, run_row["run_number"])
            conn.execute(
                update(s.tasks)
                .where(s.tasks.c.task_id == task_row["task_id"])
                .values(last_heartbeat_ts=int(time.time()))
            )
        return {"wait_time_in_seconds": HEARTBEAT_INTERVAL_S}

    # -- task writes --------------------------------------------------------

    def _task_for_write(self, conn: Connection, flow_id: str, run: str, step_name: str, task: str) -> tuple:
        try:
            run_row = self.find_run(conn, flow_id, run)
            return run_row, self.find_task(conn, run_row, step_name, task)
        except ApiError as exc:
            if exc.status == 404:
                raise ApiError(400, "unregistered", "need to register run_id and task_id first") from None
            raise

    def add_metadata(self, flow_id: str, run: str, step_name: str, task: str, body: list[Metadatum]) -> dict[str, int]:
        with self.write(f"metadata of {flow_id}/{run}/{step_name}/{task}") as conn:
            run_row, task_row = self._task_for_write(conn, flow_id, run, step_name, task)
            ids = _under(run_row, step_name) | {"task_id": task_row["task_id"], "task_name": task_row["task_name"]}
            values = []
            for datum in body:
                values.append(ids | datum.model_dump() | {"attempt_id": _attempt_of(datum.tags), "ts_epoch": now_ms()})
            if values:
                conn.execute(insert(s.metadata_rows), values)
            outbox.add(
                conn,
                flow_id,
                run_row["run_number"],
                "metadata",
                {**rows.task(task_row, run_row), "fields": [d["field_name"] for d in values]},
            )
            for datum in values:
                self._track_attempt(conn, run_row, task_row, datum)
        return {"metadata_created": len(values)}

    def _track_attempt(self, conn: Connection, run_row: RowMapping, task_row: RowMapping, datum: dict) -> None:
        """Keep the task's latest attempt and its outcome (and the run's, for ``end``) current."""
        field, t, run_number = datum["field_name"], s.tasks.c, run_row["run_number"]
        if field == "attempt" and datum["value"].isdigit():
            attempt = int(datum["value"])
            conn.execute(
                update(s.tasks)
                .where(t.task_id == task_row["task_id"], t.attempt <= attempt)
                .values(attempt=attempt, attempt_ok=None, finished_at=None)
            )
            status = "running"
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
            if not changed:
                return
            status = "completed" if ok else "failed"
            if task_row["step_name"] == "end":
                conn.execute(
                    update(s.runs)
                    .where(s.runs.c.run_number == run_number)
                    .values(end_status=status, finished_at=datum["ts_epoch"])
                )
                outbox.add(
                    conn,
                    run_row["flow_id"],
                    run_number,
                    "run-status",
                    {"run_number": rows.run_key(run_row), "status": status},
                )
        else:
            return
        outbox.add(
            conn,
            run_row["flow_id"],
            run_number,
            "task-status",
            {**rows.task(task_row, run_row), "status": status, "attempt": datum["attempt_id"]},
        )

    def add_artifacts(
        self, flow_id: str, run: str, step_name: str, task: str, body: list[ArtifactBody]
    ) -> dict[str, int]:
        with self.write(f"artifacts of {flow_id}/{run}/{step_name}/{task}") as conn:
            run_row, task_row = self._task_for_write(conn, flow_id, run, step_name, task)
            ids = _under(run_row, step_name) | {"task_id": task_row["task_id"], "task_name": task_row["task_name"]}
            values = [ids | art.model_dump() | {"ts_epoch": now_ms()} for art in body]
            created = 0
            if values:
                dialect_insert = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
                statement = dialect_insert(s.artifacts).on_conflict_do_nothing()
                created = conn.execute(statement, values).rowcount
            outbox.add(
                conn,
                flow_id,
                run_row["run_number"],
                "artifacts",
                {**rows.task(task_row, run_row), "names": [v["name"] for v in values]},
            )
        return {"artifacts_created": max(created, 0)}

    # -- tags ---------------------------------------------------------------

    def mutate_tags(self, flow_id: str, run: str, body: TagMutation) -> dict[str, list[str]]:
        to_add, to_remove = body.tags_to_add, body.tags_to_remove
        try:
            with self.write(f"tags of run {flow_id}/{run}") as conn:
                query = select(s.runs).where(s.runs.c.run_number == self.find_run(conn, flow_id, run)["run_number"])
                if self.db.dialect == "postgresql":
                    # Another mutation holding the row answers 409 at once; the client retries.
                    query = query.with_for_update(nowait=True)
                run_row = conn.execute(query).mappings().one()
                existing, system = set(run_row["tags"] or []), set(run_row["system_tags"] or [])
                if set(to_remove) & system:
                    raise ApiError(
                        422,
                        "system_tag",
                        f"cannot remove system tags {sorted(set(to_remove) & system)}",
                    )
                tags = (existing - set(to_remove)) | (set(to_add) - system)
                if tags != existing:
                    conn.execute(
                        update(s.runs).where(s.runs.c.run_number == run_row["run_number"]).values(tags=sorted(tags))
                    )
                    outbox.add(
                        conn,
                        flow_id,
                        run_row["run_number"],
                        "tags",
                        {"run_number": rows.run_key(run_row), "tags": sorted(tags)},
                    )
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) == "55P03" or "locked" in str(exc.orig):
                raise ApiError(409, "conflict", "a concurrent tag mutation holds the run; retry") from None
            raise
        return {"tags": sorted(tags)}

    # -- reads (unpaginated, as the reference service answers them) ---------
    # Single objects come from the primary: Metaflow's client reads each one right after
    # creating it (get-or-create, and the GET that follows a 409), which a lagging replica
    # would answer with a 404.

    def get_flow(self, flow_id: str) -> dict[str, Any]:
        with self.read(primary=True) as conn:
            row = (
                conn.execute(select(s.flows).where(s.flows.c.flow_id == check_id("flow_id", flow_id)))
                .mappings()
                .first()
            )
        if row is None:
            raise ApiError(404, "not_found", f"flow {flow_id} does not exist")
        return rows.flow(row)

    def get_run(self, flow_id: str, run: str) -> dict[str, Any]:
        with self.read(primary=True) as conn:
            return rows.run(self.find_run(conn, flow_id, run))

    def get_step(self, flow_id: str, run: str, step_name: str) -> dict[str, Any]:
        with self.read(primary=True) as conn:
            run_row = self.find_run(conn, flow_id, run)
            row = (
                conn.execute(
                    select(s.steps).where(
                        s.steps.c.run_number == run_row["run_number"], s.steps.c.step_name == step_name
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise ApiError(404, "not_found", f"step {flow_id}/{run}/{step_name} does not exist")
        return rows.step(row, run_row)

    def get_task(self, flow_id: str, run: str, step_name: str, task: str) -> dict[str, Any]:
        with self.read(primary=True) as conn:
            run_row = self.find_run(conn, flow_id, run)
            return rows.task(self.find_task(conn, run_row, step_name, task), run_row)

    def list_all(self, kind: str, flow_id: str, run: str | None = None, step_name: str | None = None) -> list[dict]:
        """A whole collection, in creation order: what an old client asks for."""
        with self.read() as conn:
            if kind == "flows":
                return [rows.flow(r) for r in conn.execute(select(s.flows).order_by(s.flows.c.ts_epoch)).mappings()]
            if kind == "runs":
                query = select(s.runs).where(s.runs.c.flow_id == flow_id).order_by(s.runs.c.run_number)
                return [rows.run(r) for r in conn.execute(query).mappings()]
            try:
                run_row = self.find_run(conn, flow_id, run)
            except ApiError as exc:
                if exc.status == 404:
                    return []  # the reference service answers an empty list under a missing run
                raise
            number = run_row["run_number"]
            if kind == "steps":
                query = select(s.steps).where(s.steps.c.run_number == number).order_by(s.steps.c.ts_epoch)
                return [rows.step(r, run_row) for r in conn.execute(query).mappings()]
            if kind == "tasks":
                query = (
                    select(s.tasks)
                    .where(s.tasks.c.run_number == number, s.tasks.c.step_name == step_name)
                    .order_by(s.tasks.c.task_id)
                )
                return [rows.task(r, run_row) for r in conn.execute(query).mappings()]
            if kind == "run-metadata":
                query = (
                    select(s.metadata_rows).where(s.metadata_rows.c.run_number == number).order_by(s.metadata_rows.c.id)
                )
                return [rows.metadatum(r) for r in conn.execute(query).mappings()]
            raise ValueError(kind)

    def task_metadata(self, flow_id: str, run: str, step_name: str, task: str) -> list[dict]:
        with self.read() as conn:
            try:
                run_row = self.find_run(conn, flow_id, run)
                task_row = self.find_task(conn, run_row, step_name, task)
            except ApiError as exc:
                if exc.status == 404:
                    return []
                raise
            m = s.metadata_rows.c
            query = select(s.metadata_rows).where(m.task_id == task_row["task_id"]).order_by(m.id)
            return [rows.metadatum(r) for r in conn.execute(query).mappings()]

    def artifacts(
        self,
        flow_id: str,
        run: str,
        step_name: str | None = None,
        task: str | None = None,
        attempt: int | None = None,
    ) -> list[dict]:
        """Artifacts of a run, step or task: each task's latest attempt, or ``attempt`` of one task."""
        a = s.artifacts.c
        with self.read() as conn:
            try:
                run_row = self.find_run(conn, flow_id, run)
                task_row = self.find_task(conn, run_row, step_name, task) if task is not None else None
            except ApiError as exc:
                if exc.status == 404:
                    return []
                raise
            where = [a.run_number == run_row["run_number"]]
            if step_name is not None:
                where.append(a.step_name == step_name)
            if task_row is not None:
                where.append(a.task_id == task_row["task_id"])
            if attempt is None:
                latest = (
                    select(a.task_id, func.max(a.attempt_id).label("attempt_id"))
                    .where(*where)
                    .group_by(a.task_id)
                    .subquery()
                )
                query = select(s.artifacts).join(
                    latest, and_(a.task_id == latest.c.task_id, a.attempt_id == latest.c.attempt_id)
                )
            else:
                query = select(s.artifacts).where(a.attempt_id == attempt)
            query = query.where(*where).order_by(a.id)
            return [rows.artifact(r, run_row) for r in conn.execute(query).mappings()]

    def artifact(self, flow_id: str, run: str, step_name: str, task: str, name: str, attempt: int | None) -> dict:
        """One artifact: of ``attempt``, or of the latest attempt that saved ``name`` (Metaflow's marker)."""
        a = s.artifacts.c
        with self.read() as conn:
            run_row = self.find_run(conn, flow_id, run)
            task_row = self.find_task(conn, run_row, step_name, task)
            if attempt is None:
                attempt = (
                    conn.execute(
                        select(func.max(a.attempt_id)).where(a.task_id == task_row["task_id"], a.name == "name")
                    ).scalar()
                    or 0
                )
            row = (
                conn.execute(
                    select(s.artifacts).where(a.task_id == task_row["task_id"], a.name == name, a.attempt_id == attempt)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise ApiError(404, "not_found", f"artifact {name} (attempt {attempt}) does not exist")
        return rows.artifact(row, run_row)

    def filtered_tasks(
        self, flow_id: str, run: str, step_name: str, field: str | None, pattern: str | None
    ) -> list[str]:
        """Pathspecs of the step's tasks with a metadata ``field`` whose value matches ``pattern``.

        SQLite matches with RE2 (``database``); PostgreSQL with its own engine, under a statement
        timeout, so no pattern holds a connection for long on either.
        """
        if pattern:
            compile_pattern(pattern, "pattern")  # RE2's syntax, refused here with the reason
        m = s.metadata_rows.c
        with self.read() as conn:
            if pattern and self.db.dialect == "postgresql":
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {PATTERN_TIMEOUT_MS}")
            try:
                run_row = self.find_run(conn, flow_id, run)
            except ApiError as exc:
                if exc.status == 404:
                    return []
                raise
            query = select(m.task_id, m.task_name).where(
                m.run_number == run_row["run_number"], m.step_name == step_name
            )
            if field:
                query = query.where(m.field_name == field)
            if pattern:
                query = query.where(m.value.regexp_match(pattern))
            try:
                found = conn.execute(query.distinct().order_by(m.task_id)).all()
            except OperationalError as exc:
                if getattr(exc.orig, "sqlstate", None) != "57014":  # query_canceled: the timeout above
                    raise
                raise bad_parameter("pattern", f"matching took over {PATTERN_TIMEOUT_MS} ms; simplify it") from None
        prefix = f"{flow_id}/{rows.run_key(run_row)}/{step_name}"
        return [f"{prefix}/{name or task_id}" for task_id, name in found]
