"""Rows as the service answers them: the JSON shapes of Metaflow's service 2.5.x.

Ids are "exposed" the way Metaflow's client expects: a run's ``run_number`` is
its string ``run_id`` when it has one (``argo-...``, ``sfn-...``), else the
number; a task's ``task_id`` likewise. Steps, tasks and artifacts carry their
run's tags, since tags are mutated on the run.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import RowMapping


def run_key(run: RowMapping) -> Any:
    return run["run_id"] if run["run_id"] is not None else run["run_number"]


def task_key(task: RowMapping) -> Any:
    return task["task_name"] if task["task_name"] is not None else task["task_id"]


def _task_ids(row: RowMapping) -> dict[str, Any]:
    """The four ids a task-level row answers with, in the reference service's key order."""
    return {
        "flow_id": row["flow_id"],
        "run_number": run_key(row),
        "step_name": row["step_name"],
        "task_id": task_key(row),
    }


def flow(row: RowMapping) -> dict[str, Any]:
    return {k: row[k] for k in ("flow_id", "user_name", "ts_epoch", "tags", "system_tags")}


def run(row: RowMapping) -> dict[str, Any]:
    return {
        "flow_id": row["flow_id"],
        "run_number": run_key(row),
        "user_name": row["user_name"],
        "ts_epoch": row["ts_epoch"],
        "tags": row["tags"],
        "system_tags": row["system_tags"],
        "last_heartbeat_ts": row["last_heartbeat_ts"],
    }


def step(row: RowMapping, tags: RowMapping) -> dict[str, Any]:
    return {
        "flow_id": row["flow_id"],
        "run_number": run_key(row),
        "step_name": row["step_name"],
        "user_name": row["user_name"],
        "ts_epoch": row["ts_epoch"],
        "tags": tags["tags"],
        "system_tags": tags["system_tags"],
    }


def task(row: RowMapping, tags: RowMapping) -> dict[str, Any]:
    return {
        **_task_ids(row),
        "user_name": row["user_name"],
        "ts_epoch": row["ts_epoch"],
        "tags": tags["tags"],
        "system_tags": tags["system_tags"],
        "last_heartbeat_ts": row["last_heartbeat_ts"],
    }


def metadatum(row: RowMapping) -> dict[str, Any]:
    return {
        "id": row["id"],
        **_task_ids(row),
        "field_name": row["field_name"],
        "value": row["value"],
        "type": row["type"],
        "user_name": row["user_name"],
        "ts_epoch": row["ts_epoch"],
        "tags": row["tags"],
        "system_tags": row["system_tags"],
    }


def artifact(row: RowMapping, tags: RowMapping) -> dict[str, Any]:
    return {
        **_task_ids(row),
        "name": row["name"],
        "location": row["location"],
        "ds_type": row["ds_type"],
        "sha": row["sha"],
        "type": row["type"],
        "content_type": row["content_type"],
        "user_name": row["user_name"],
        "attempt_id": row["attempt_id"],
        "ts_epoch": row["ts_epoch"],
        "tags": tags["tags"],
        "system_tags": tags["system_tags"],
    }
