"""Answers from the metadata service's opt-in routes: one request per question.

``requests`` counts what the answers cost, for tests and the benchmark.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from metaflow_stack.agent.models import (
    ArtifactInfo,
    ConfidentialInfo,
    Failure,
    FlowInfo,
    LogLine,
    LogWindow,
    RunInfo,
    RunSummary,
    StepCounts,
    TaskInfo,
)
from metaflow_stack.agent.source import AgentError, ArtifactScope
from metaflow_stack.datastore.task_metadata import exception_fields, foreach_items

#: What the service must advertise on ``/ping`` for these answers.
NEEDED = ("pagination", "filters", "summary", "failures", "artifact-search", "logs")
#: Search filters, by the service's parameter names.
_FILTERS = {
    "name": "name:eq",
    "name_contains": "name:co",
    "python_type": "type:eq",
    "min_size": "size:ge",
    "max_size": "size:le",
    "sha": "sha:eq",
}


def _failure(row: dict[str, Any]) -> Failure:
    """A failed task as the service lists it; its exception, recorded by the run, read by the same bounded rule
    as the service applies (a service of another version may send it as stored)."""
    return Failure(
        pathspec=row["pathspec"],
        step_name=row["step_name"],
        attempt=row["attempt"],
        finished_at=row["finished_at"],
        **exception_fields(row.get("exception")),
    )


class ServiceSource:
    """The metadata service at ``url``."""

    def __init__(self, url: str, auth_key: str | None = None, timeout_s: float = 30) -> None:
        self.url = url.rstrip("/")
        headers = {"x-api-key": auth_key} if auth_key else {}
        try:
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        except httpx.InvalidURL as exc:  # (a port like 8o80, a bracket left open)
            raise AgentError(
                "bad_parameter", f"the metadata service's URL {url!r} is not a URL: {exc}", "e.g. http://127.0.0.1:8080"
            ) from None
        self.requests = 0

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str, params: dict[str, Any] | None = None, what: str = "") -> httpx.Response:
        self.requests += 1
        try:
            # Ids never hold "/" (``ids``), so quoting everything else keeps a "?", "#" or "%" in a run id
            # inside its own path segment.
            quoted = quote(path, safe="/")
            response = self._http.get(quoted, params={k: v for k, v in (params or {}).items() if v is not None})
        except httpx.HTTPError as exc:
            raise AgentError(
                "service_unavailable",
                f"the metadata service at {self.url} did not answer: {exc}",
                "start it (`just up`) or point METAFLOW_SERVICE_URL at a running one",
            ) from None
        if response.status_code == 404:
            fix = "check the pathspec (flow, run, step, task)"
            raise AgentError("not_found", f"{what or path} does not exist", fix)
        if response.status_code >= 400:
            try:
                detail = response.json()
            except ValueError:
                detail = {"message": response.text[:300]}
            code = "bad_parameter" if response.status_code == 400 else detail.get("code", "service_error")
            raise AgentError(code, f"{what or path}: {detail.get('message')}")
        return response

    def check(self) -> None:
        """Refuse a service that lacks the routes these answers use (one request)."""
        advertised = set(self._get("/ping").headers.get("X-Capabilities", "").split(","))
        missing = [c for c in NEEDED if c not in advertised]
        if missing:
            raise AgentError(
                "service_too_old",
                f"the metadata service at {self.url} lacks {', '.join(missing)}",
                "run this project's metadata service (`metaflow service serve`)",
            )

    def flows(self, limit: int, cursor: str | None) -> tuple[list[FlowInfo], str | None]:
        response = self._get("/flows", {"_limit": limit, "_cursor": cursor}, "flows")
        flows = [FlowInfo(name=row["flow_id"], created_at=row["ts_epoch"]) for row in response.json()]
        return flows, response.headers.get("X-Next-Cursor")

    def runs(
        self,
        flow: str,
        status: str | None,
        low: int | None,
        high: int | None,
        tags: list[str],
        user: str | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[RunInfo], str | None]:
        params = {
            "_limit": limit,
            "_cursor": cursor,
            "status:eq": status,
            "ts_epoch:ge": low,
            "ts_epoch:le": high,
            "_tags:all": ",".join(tags) or None,
            "user:eq": user,
        }
        response = self._get(f"/flows/{flow}/runs", params, f"flow {flow}")
        runs = [
            RunInfo(
                pathspec=f"{row['flow_id']}/{row['run_number']}",
                status=row["status"],
                user=row["user_name"],
                tags=row["tags"] or [],
                system_tags=row["system_tags"] or [],
                started_at=row["ts_epoch"],
                finished_at=row["finished_at"],
            )
            for row in response.json()
        ]
        return runs, response.headers.get("X-Next-Cursor")

    def summary(self, flow: str, run: str) -> RunSummary:
        body = self._get(f"/flows/{flow}/runs/{run}/summary", what=f"run {flow}/{run}").json()
        return RunSummary(
            pathspec=f"{flow}/{body['run_number']}",
            status=body["status"],
            started_at=body["ts_epoch"],
            finished_at=body["finished_at"],
            duration_ms=body["duration_ms"],
            steps=[StepCounts(**step) for step in body["steps"]],
            first_failure=_failure(body["first_failure"]) if body["first_failure"] else None,
        )

    def failures(self, flow: str, run: str, limit: int, cursor: str | None) -> tuple[list[Failure], str | None]:
        params = {"_limit": limit, "_cursor": cursor}
        response = self._get(f"/flows/{flow}/runs/{run}/failures", params, f"run {flow}/{run}")
        return [_failure(row) for row in response.json()], response.headers.get("X-Next-Cursor")

    def tasks(
        self, flow: str, run: str, step: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[TaskInfo], str | None]:
        params = {"_limit": limit, "_cursor": cursor, "step:eq": step, "status:eq": status}
        response = self._get(f"/flows/{flow}/runs/{run}/tasks", params, f"run {flow}/{run}")
        tasks = [
            TaskInfo(
                pathspec=f"{row['flow_id']}/{row['run_number']}/{row['step_name']}/{row['task_id']}",
                step_name=row["step_name"],
                attempt=row["attempt"],
                status=row["status"],
                started_at=row["ts_epoch"],
                finished_at=row["finished_at"],
                foreach=foreach_items(row.get("foreach")),
                confidential=ConfidentialInfo.recorded(row.get("confidential")),
            )
            for row in response.json()
        ]
        return tasks, response.headers.get("X-Next-Cursor")

    def artifacts(
        self, scope: ArtifactScope, filters: dict[str, Any], limit: int, cursor: str | None
    ) -> tuple[list[ArtifactInfo], str | None]:
        path = f"/flows/{scope.flow}"
        if scope.run is not None:
            path += f"/runs/{scope.run}"
        if scope.task is not None:
            path += f"/steps/{scope.step}/tasks/{scope.task}"
        params = {"_limit": limit, "_cursor": cursor, **{_FILTERS[k]: v for k, v in filters.items()}}
        if scope.task is None and scope.step is not None:
            params["step:eq"] = scope.step
        response = self._get(f"{path}/artifacts", params, path.removeprefix("/flows/"))
        artifacts = [
            ArtifactInfo(
                pathspec=f"{row['flow_id']}/{row['run_number']}/{row['step_name']}/{row['task_id']}",
                name=row["name"],
                attempt=row["attempt_id"],
                size=row["size"],
                python_type=row["python_type"],
                sha=row["sha"],
            )
            for row in response.json()
        ]
        return artifacts, response.headers.get("X-Next-Cursor")

    def logs(self, parts: list[str], stream: str, window: dict[str, Any]) -> LogWindow:
        flow, run, step, task = parts
        path = f"/flows/{flow}/runs/{run}/steps/{step}/tasks/{task}/logs/{stream}"
        response = self._get(path, window, "/".join(parts))
        body = response.json()
        after = response.headers.get("X-Next-Cursor")
        return LogWindow(
            pathspec=body["pathspec"],
            stream=stream,
            attempt=body["attempt"],
            lines=[LogLine(**line) for line in body["lines"]],
            size=body["size"],
            bytes_read=body["bytes_read"],
            truncated=body["truncated"] or after is not None,
            next_cursor=after,
        )
