"""The reads of Metaflow's service 2.5.x, unpaginated, as its clients expect them.

The opt-in paged reads are ``pages``'; these answer the routes the stock
client calls, in creation order.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.exc import OperationalError

from metaflow_stack.api_errors import ApiError, bad_parameter
from metaflow_stack.ids import check_id
from metaflow_stack.patterns import compile_pattern
from metaflow_stack.service import rows
from metaflow_stack.service import schema as s
from metaflow_stack.service.access import TableAccess

#: How long PostgreSQL may match one ``filtered_tasks`` pattern.
PATTERN_TIMEOUT_MS = 5000


class Reads(TableAccess):
    """Single objects, whole collections, artifacts, and ``filtered_tasks``."""

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
