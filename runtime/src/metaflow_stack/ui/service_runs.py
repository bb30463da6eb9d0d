"""The UI's source on this project's metadata service: the agent's
``ServiceSource`` plus the run's graph, parameters and previews (values read
from the datastore roots the operator allows), a task's attempts and
metadata, and a live feed from the service's event stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from metaflow_stack.agent.service_source import ServiceSource
from metaflow_stack.agent.source import AgentError
from metaflow_stack.datastore.blobs import Blobs
from metaflow_stack.ui.changes import EVERY_RUN, Changes, pause, say_once
from metaflow_stack.ui.details import Details
from metaflow_stack.ui.local_runs import task_detail


class ServiceRuns(Details, ServiceSource):
    """Everything the UI reads, from the service at ``url`` and values under ``datastore_roots``."""

    def __init__(self, url: str, datastore_roots: tuple[str, ...], auth_key: str | None = None) -> None:
        super().__init__(url, auth_key)
        self.blobs = Blobs(datastore_roots)
        self._auth_key = auth_key

    def describe(self) -> dict[str, str]:
        return {"kind": "service", "where": self.url}

    def parameters_artifacts(self, flow: str, run: str) -> dict[str, tuple[str, int | None]]:
        base = f"/flows/{flow}/runs/{run}/steps/_parameters/tasks"
        tasks = self._get(base, what=f"run {flow}/{run}").json()
        if not tasks:
            raise AgentError("not_found", f"run {flow}/{run} has no recorded graph yet")
        rows = self._get(f"{base}/{tasks[-1]['task_id']}/artifacts", what=f"run {flow}/{run}").json()
        return {row["name"]: (row["sha"], row.get("size")) for row in rows}

    def task_detail(self, parts: list[str]) -> dict[str, Any]:
        flow, run, step, task = parts
        path = f"/flows/{flow}/runs/{run}/steps/{step}/tasks/{task}/metadata"
        metadata = self._get(path, what="/".join(parts)).json()
        return task_detail("/".join(parts), {}, metadata)

    async def follow(self, changes: Changes, stop: asyncio.Event) -> None:
        """Publish the runs named by the service's events until ``stop`` (or cancelled), resuming after
        drops from the last event seen. After a drop every run is published too: the service replays only
        what its log still holds."""
        headers = {"x-api-key": self._auth_key} if self._auth_key else {}
        since: str | None = None
        dropped, said = False, set()
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=None) as http:
            while not stop.is_set():
                try:
                    async with aconnect_sse(http, "GET", "/events", params={"since": since} if since else {}) as sse:
                        if dropped:
                            changes.publish([EVERY_RUN])
                        async for event in sse.aiter_sse():
                            since = event.id or since
                            if run := run_of(event.data):
                                changes.publish([run])
                except httpx.HTTPError:
                    pass  # the service restarted or is unreachable: try again shortly
                except Exception as exc:  # (httpx's StreamError is no HTTPError) the page must not go stale for good
                    say_once(said, type(exc).__name__, f"live updates from {self.url} dropped ({exc!r}); resuming")
                dropped = True
                await pause(stop)


def run_of(data: str) -> str | None:
    """``Flow/run`` for an event of a run; None for any other event, and for one that is malformed (skipped:
    raising would end the stream and resume it before the same event, for ever)."""
    try:
        body = json.loads(data)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    flow, run = body.get("flow_id"), body.get("run_number")
    if not isinstance(flow, str) or not flow or type(run) not in (int, str) or run == "":
        return None
    return f"{flow}/{run}"
