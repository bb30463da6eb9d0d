"""Bounded queries of Metaflow runs for scripts and agents, one request each.

Metaflow's Client API answers "which tasks of this run failed, and why" by
visiting every task (two metadata requests each, then unpickling
``_exception``), and shows a log by downloading all of it. These queries ask
the metadata service's opt-in routes instead (``/failures``, ``/summary``,
paged and filtered listings, artifact search, bounded logs), so each costs one
request whatever the run's size, and nothing is ever unpickled.

Errors are ``AgentError``: a stable ``code`` (``not_found``,
``bad_parameter``, ``service_unavailable``, ``service_too_old``), a message
naming the path or parameter, and the fix.
"""

from __future__ import annotations

import os
import re
import time
from datetime import datetime
from typing import Any

import httpx

from metaflow_stack.agent.models import (
    ArtifactInfo,
    ArtifactList,
    Clamp,
    Failure,
    FailureList,
    LogLine,
    LogWindow,
    RunInfo,
    RunList,
    RunSummary,
    StepCounts,
)
from metaflow_stack.errors import StackError

MAX_RUNS = 1000
MAX_FAILURES = 1000
MAX_ARTIFACTS = 1000
MAX_LOG_LINES = 10_000
MAX_LOG_BYTES = 16 * 1024 * 1024
STATUSES = ("running", "completed", "failed", "killed")
#: What the service must advertise on ``/ping`` for these queries.
NEEDED = ("pagination", "filters", "summary", "failures", "artifact-search", "logs")
_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class AgentError(StackError):
    """A query that cannot be answered, said in a way an agent can act on."""

    def __init__(self, code: str, message: str, fix: str | None = None) -> None:
        super().__init__(message, fix)
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "fix": self.fix}}


def _bound(name: str, value: int, maximum: int, clamped: list[Clamp]) -> int:
    if value < 1:
        raise AgentError("bad_parameter", f"{name} must be at least 1, not {value}")
    if value > maximum:
        clamped.append(Clamp(parameter=name, requested=value, used=maximum))
        return maximum
    return value


def _path(pathspec: str, parts: int, what: str) -> list[str]:
    pieces = pathspec.strip("/").split("/")
    if len(pieces) != parts or not all(pieces):
        shape = "/".join(("Flow", "run", "step", "task")[:parts])
        raise AgentError("bad_parameter", f"{what} {pathspec!r} is not a pathspec like {shape}")
    return pieces


def epoch_ms(value: datetime | int | float | str, name: str) -> int:
    """A time bound as epoch milliseconds: a datetime, epoch seconds or ms, ISO 8601, or ``30m``/``24h``/``7d`` ago."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, int | float):
        return int(value if value > 1e11 else value * 1000)
    relative = _RELATIVE.match(value.strip())
    if relative:
        return int((time.time() - int(relative[1]) * _UNIT_S[relative[2]]) * 1000)
    try:
        return int(datetime.fromisoformat(value).timestamp() * 1000)
    except ValueError:
        raise AgentError(
            "bad_parameter", f"{name} {value!r} is not a time", "use ISO 8601, epoch seconds, or 30m/24h/7d ago"
        ) from None


def _failure(row: dict[str, Any]) -> Failure:
    exception = row.get("exception") or {}
    return Failure(
        pathspec=row["pathspec"],
        step_name=row["step_name"],
        attempt=row["attempt"],
        finished_at=row["finished_at"],
        type=exception.get("type"),
        message=exception.get("message"),
        traceback=exception.get("traceback") or [],
    )


class Queries:
    """The queries, against the metadata service at ``url``; ``requests`` counts what they cost."""

    def __init__(self, url: str, auth_key: str | None = None, timeout_s: float = 30) -> None:
        self.url = url.rstrip("/")
        headers = {"x-api-key": auth_key} if auth_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.requests = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Queries:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, params: dict[str, Any] | None = None, what: str = "") -> httpx.Response:
        self.requests += 1
        try:
            response = self._http.get(path, params={k: v for k, v in (params or {}).items() if v is not None})
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
        """Refuse a service that lacks the routes these queries use (one request)."""
        advertised = set(self._get("/ping").headers.get("X-Capabilities", "").split(","))
        missing = [c for c in NEEDED if c not in advertised]
        if missing:
            raise AgentError(
                "service_too_old",
                f"the metadata service at {self.url} lacks {', '.join(missing)}",
                "run this project's metadata service (`metaflow service serve`)",
            )

    # -- runs ---------------------------------------------------------------

    def list_runs(
        self,
        flow: str,
        status: str | None = None,
        since: datetime | int | str | None = None,
        until: datetime | int | str | None = None,
        tags: tuple[str, ...] | list[str] = (),
        limit: int = 20,
        cursor: str | None = None,
    ) -> RunList:
        """A flow's runs, newest first. status: running, completed, failed or killed; since/until (start time):
        ISO 8601, epoch seconds, or "30m"/"24h"/"7d" ago; tags: every one must be on the run; limit: at most 1000."""
        clamped: list[Clamp] = []
        if status is not None and status not in STATUSES:
            raise AgentError("bad_parameter", f"status {status!r} is not one of {', '.join(STATUSES)}")
        params = {
            "_limit": _bound("limit", limit, MAX_RUNS, clamped),
            "_cursor": cursor,
            "status:eq": status,
            "ts_epoch:ge": epoch_ms(since, "since") if since is not None else None,
            "ts_epoch:le": epoch_ms(until, "until") if until is not None else None,
            "_tags:all": ",".join(tags) or None,
        }
        response = self._get(f"/flows/{_path(flow, 1, 'flow')[0]}/runs", params, f"flow {flow}")
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
        after = response.headers.get("X-Next-Cursor")
        return RunList(runs=runs, truncated=after is not None, next_cursor=after, clamped=clamped)

    def run_summary(self, run: str) -> RunSummary:
        """A run ("Flow/123"): status, duration, task counts per step by status, and its first failure."""
        flow, number = _path(run, 2, "run")
        body = self._get(f"/flows/{flow}/runs/{number}/summary", what=f"run {run}").json()
        return RunSummary(
            pathspec=f"{flow}/{body['run_number']}",
            status=body["status"],
            started_at=body["ts_epoch"],
            finished_at=body["finished_at"],
            duration_ms=body["duration_ms"],
            steps=[StepCounts(**step) for step in body["steps"]],
            first_failure=_failure(body["first_failure"]) if body["first_failure"] else None,
        )

    def failures(self, run: str, limit: int = 20, cursor: str | None = None) -> FailureList:
        """A run's ("Flow/123") failed tasks: attempt, exception type, message and traceback tail of each."""
        flow, number = _path(run, 2, "run")
        clamped: list[Clamp] = []
        params = {"_limit": _bound("limit", limit, MAX_FAILURES, clamped), "_cursor": cursor}
        response = self._get(f"/flows/{flow}/runs/{number}/failures", params, f"run {run}")
        after = response.headers.get("X-Next-Cursor")
        return FailureList(
            run=run,
            failures=[_failure(row) for row in response.json()],
            truncated=after is not None,
            next_cursor=after,
            clamped=clamped,
        )

    # -- artifacts ----------------------------------------------------------

    def _artifacts(self, path: str, params: dict[str, Any], what: str) -> ArtifactList:
        response = self._get(path, params, what)
        artifacts = [
            ArtifactInfo(
                pathspec=f"{row['flow_id']}/{row['run_number']}/{row['step_name']}/{row['task_id']}",
                name=row["name"],
                attempt=row["attempt_id"],
                size=row["size"],
                python_type=row["python_type"],
            )
            for row in response.json()
        ]
        after = response.headers.get("X-Next-Cursor")
        return ArtifactList(artifacts=artifacts, truncated=after is not None, next_cursor=after)

    def artifact_info(self, task: str, limit: int = 200, cursor: str | None = None) -> ArtifactList:
        """A task's ("Flow/123/step/456") artifacts, latest attempt: names, stored sizes, Python types; loads none."""
        flow, run, step, task_id = _path(task, 4, "task")
        clamped: list[Clamp] = []
        params = {"_limit": _bound("limit", limit, MAX_ARTIFACTS, clamped), "_cursor": cursor}
        found = self._artifacts(f"/flows/{flow}/runs/{run}/steps/{step}/tasks/{task_id}/artifacts", params, task)
        found.clamped = clamped
        return found

    def search_artifacts(
        self,
        scope: str,
        name: str | None = None,
        name_contains: str | None = None,
        python_type: str | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        step: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> ArtifactList:
        """Artifacts across a flow ("Flow") or a run ("Flow/123") by exact name, name fragment, Python type as
        recorded ("int", "dict", "pandas.core.frame.DataFrame"), stored size in bytes, or step; none is loaded."""
        pieces = scope.strip("/").split("/")
        if len(pieces) not in (1, 2) or not all(pieces):
            raise AgentError("bad_parameter", f"scope {scope!r} is not a flow (Flow) or a run (Flow/run)")
        path = f"/flows/{pieces[0]}" + (f"/runs/{pieces[1]}" if len(pieces) == 2 else "") + "/artifacts"
        clamped: list[Clamp] = []
        params = {
            "_limit": _bound("limit", limit, MAX_ARTIFACTS, clamped),
            "_cursor": cursor,
            "name:eq": name,
            "name:co": name_contains,
            "type:eq": python_type,
            "size:ge": min_size,
            "size:le": max_size,
            "step:eq": step,
        }
        found = self._artifacts(path, params, scope)
        found.clamped = clamped
        return found

    # -- logs ---------------------------------------------------------------

    def logs(
        self,
        task: str,
        stream: str = "stderr",
        tail: int | None = 50,
        head: int | None = None,
        grep: str | None = None,
        max_bytes: int = 64 * 1024,
        attempt: int | None = None,
        cursor: str | None = None,
    ) -> LogWindow:
        """A window of a task's ("Flow/123/step/456") log: the last `tail` lines (default 50 of stderr) or the
        first `head`; grep keeps lines matching a regular expression; attempt defaults to the latest."""
        flow, run, step, task_id = _path(task, 4, "task")
        if stream not in ("stdout", "stderr"):
            raise AgentError("bad_parameter", f"stream {stream!r} is not stdout or stderr")
        clamped: list[Clamp] = []
        window = {"head": head} if head is not None or cursor is not None else {"tail": tail or 50}
        params = {
            **{k: _bound(k, v, MAX_LOG_LINES, clamped) for k, v in window.items() if v is not None},
            "grep": grep,
            "max_bytes": _bound("max_bytes", max_bytes, MAX_LOG_BYTES, clamped),
            "attempt": attempt,
            "_cursor": cursor,
        }
        response = self._get(f"/flows/{flow}/runs/{run}/steps/{step}/tasks/{task_id}/logs/{stream}", params, task)
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
            clamped=clamped,
        )


def connect(service_url: str | None = None) -> Queries:
    """Queries against ``service_url``, else Metaflow's configured service; checks its capabilities."""
    url = service_url or os.environ.get("METAFLOW_SERVICE_URL")
    if not url:
        from metaflow.metaflow_config import SERVICE_URL

        url = SERVICE_URL
    if not url:
        raise AgentError(
            "service_unavailable",
            "no metadata service is configured; these queries read it",
            "`just up` starts one and prints the METAFLOW_SERVICE_URL to export",
        )
    queries = Queries(url, os.environ.get("METAFLOW_SERVICE_AUTH_KEY"))
    queries.check()
    return queries
