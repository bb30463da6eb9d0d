"""The writes of Metaflow's service 2.5.x: creation, heartbeats, metadata, artifacts and tags.

Every write is one transaction that also puts its event in the event log
(``event_log``: a metadata row is numbered as its own event, other writes
append an event row), so a write and its event commit or roll back together;
a failed request leaves nothing behind. Creation conflicts answer 409 (the
client then reads the row), a missing parent 404; bodies arrive checked
(``bodies``).
"""

from __future__ import annotations

import re
import time
from typing import Any

from packaging.version import InvalidVersion, Version
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from metaflow_stack.api_errors import ApiError, bad_parameter
from metaflow_stack.datastore.attempts import attempt_of
from metaflow_stack.ids import check_id, is_number
from metaflow_stack.service import event_log, rows
from metaflow_stack.service import schema as s
from metaflow_stack.service.access import TableAccess, now_ms, under
from metaflow_stack.service.attempts import track_attempt
from metaflow_stack.service.bodies import (
    ArtifactBody,
    Created,
    Metadatum,
    RunBody,
    RunHeartbeat,
    TagMutation,
    TaskBody,
)
from metaflow_stack.service.status import failed_task_exists

#: Seconds between heartbeats the service asks clients for.
HEARTBEAT_INTERVAL_S = 10

#: The fields of a creation body stored as they are.
_OWNER = {"user_name", "tags", "system_tags"}


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


class Writes(TableAccess):
    """Creation, heartbeats, task metadata and artifacts, tag mutation."""

    # -- creation -----------------------------------------------------------

    def create_flow(self, flow_id: str, body: Created) -> dict[str, Any]:
        row = {"flow_id": check_id("flow_id", flow_id), "ts_epoch": now_ms(), **body.model_dump(include=_OWNER)}
        with self.write(f"flow {flow_id}") as conn:
            conn.execute(insert(s.flows).values(row))
            event_log.append(conn, flow_id, None, "flow", {"flow_id": flow_id})
        return rows.flow(row)

    def create_run(self, flow_id: str, body: RunBody) -> dict[str, Any]:
        run_id = body.run_number
        if run_id is not None:
            if is_number(run_id):
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
            event_log.append(conn, flow_id, number, "run", rows.run(row))
        return rows.run(row)

    def create_step(self, flow_id: str, run: str, step_name: str, body: Created) -> dict[str, Any]:
        check_id("step_name", step_name)
        with self.write(f"step {flow_id}/{run}/{step_name}") as conn:
            run_row = self.find_run(conn, flow_id, run)
            values = under(run_row, step_name) | {"ts_epoch": now_ms(), **body.model_dump(include=_OWNER)}
            values["user_name"] = values["user_name"] or ""
            conn.execute(insert(s.steps).values(values))
            answer = rows.step(values, run_row)
            event_log.append(conn, flow_id, run_row["run_number"], "step", answer)
        return answer

    def create_task(self, flow_id: str, run: str, step_name: str, body: TaskBody) -> dict[str, Any]:
        check_id("step_name", step_name)
        task_name = body.task_id
        if task_name is not None:
            if is_number(task_name):
                raise bad_parameter("task_id", "a client-chosen task id must be a non-numeric string")
            check_id("task_id", task_name)
        beats = heartbeat_capable(body.system_tags)
        with self.write(f"task {flow_id}/{run}/{step_name}/{task_name or '(new)'}") as conn:
            run_row = self.find_run(conn, flow_id, run)
            values = under(run_row, step_name) | {
                "task_name": task_name,
                "ts_epoch": now_ms(),
                **body.model_dump(include=_OWNER),
                "last_heartbeat_ts": int(time.time()) if beats else None,
            }
            task_id = conn.execute(insert(s.tasks).values(values).returning(s.tasks.c.task_id)).scalar_one()
            if beats:
                self._beat_run(conn, run_row["run_number"])
            answer = rows.task({**values, "task_id": task_id}, run_row)
            event_log.append(conn, flow_id, run_row["run_number"], "task", answer)
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
                event_log.append(
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
            ids = under(run_row, step_name) | {"task_id": task_row["task_id"], "task_name": task_row["task_name"]}
            values = []
            for datum in body:
                values.append(ids | datum.model_dump() | {"attempt_id": attempt_of(datum.tags), "ts_epoch": now_ms()})
            if values:
                event_log.number(conn, values)  # each row is its own event: no event row beside it
                conn.execute(insert(s.metadata_rows), values)
            for datum in values:
                track_attempt(conn, run_row, task_row, datum)
        return {"metadata_created": len(values)}

    def add_artifacts(
        self, flow_id: str, run: str, step_name: str, task: str, body: list[ArtifactBody]
    ) -> dict[str, int]:
        with self.write(f"artifacts of {flow_id}/{run}/{step_name}/{task}") as conn:
            run_row, task_row = self._task_for_write(conn, flow_id, run, step_name, task)
            ids = under(run_row, step_name) | {"task_id": task_row["task_id"], "task_name": task_row["task_name"]}
            values = [ids | art.model_dump() | {"ts_epoch": now_ms()} for art in body]
            created = 0
            if values:
                dialect_insert = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
                statement = dialect_insert(s.artifacts).on_conflict_do_nothing()
                created = conn.execute(statement, values).rowcount
            event_log.append(
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
                    event_log.append(
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
