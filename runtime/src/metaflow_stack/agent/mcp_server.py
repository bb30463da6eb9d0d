"""The agent queries as an MCP server over stdio (``metaflow-stack-mcp``).

Its own console script, not a ``metaflow`` subcommand: Metaflow's command
line prints a banner on stdout, which would corrupt the JSON-RPC stream. The
service is found as ``metaflow agent`` finds it (``METAFLOW_SERVICE_URL`` or
Metaflow's configuration), on the first tool call, so a client can start the
server before the service is up. A query that cannot be answered is a tool
error whose text is ``{"error": {code, message, fix}}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from metaflow_stack.agent.models import ArtifactList, FailureList, LogWindow, RunList, RunSummary
from metaflow_stack.agent.queries import AgentError, Queries, connect

T = TypeVar("T")

INSTRUCTIONS = """Query Metaflow runs recorded by the Metaflow Stack metadata service.
Pathspecs: a flow is "Flow", a run "Flow/123", a task "Flow/123/step/456".
Start with list_runs (filter by status) or run_summary; failures gives each failed task's
exception and traceback tail; logs reads a bounded window of a task's log. Every answer
is one request to the service and says when it is truncated: pass next_cursor back as cursor."""


def build(service_url: str | None = None) -> MCPServer:
    """The server; each tool is one query on the service at ``service_url`` (or the configured one)."""
    server = MCPServer("metaflow-stack", instructions=INSTRUCTIONS, log_level="WARNING")
    connected: list[Queries] = []

    def ask(query: Callable[[Queries], T]) -> T:
        try:
            if not connected:
                connected.append(connect(service_url))
            return query(connected[0])
        except AgentError as exc:
            raise ToolError(json.dumps(exc.to_dict())) from None

    @server.tool()
    def list_runs(
        flow: str,
        status: str | None = None,
        since: str | None = None,
        until: str | None = None,
        tags: list[str] | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> RunList:
        """A flow's runs, newest first. status: running, completed, failed or killed. since/until: ISO 8601,
        epoch seconds, or "30m"/"24h"/"7d" ago. tags: every one must be on the run. limit: at most 1000."""
        return ask(lambda q: q.list_runs(flow, status, since, until, tags or (), limit, cursor))

    @server.tool()
    def run_summary(run: str) -> RunSummary:
        """A run ("Flow/123"): status, duration, task counts per step by status, and its first failure."""
        return ask(lambda q: q.run_summary(run))

    @server.tool()
    def failures(run: str, limit: int = 20, cursor: str | None = None) -> FailureList:
        """The failed tasks of a run ("Flow/123") with attempt, exception type, message and traceback tail."""
        return ask(lambda q: q.failures(run, limit, cursor))

    @server.tool()
    def artifact_info(task: str, limit: int = 200, cursor: str | None = None) -> ArtifactList:
        """A task's ("Flow/123/step/456") artifacts: names, stored sizes and Python types. Loads no values."""
        return ask(lambda q: q.artifact_info(task, limit, cursor))

    @server.tool()
    def search_artifacts(
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
        """Artifacts across a flow ("Flow") or a run ("Flow/123") by exact name, name fragment, Python type
        (as recorded: "int", "dict", "pandas.core.frame.DataFrame"), stored size in bytes, or step."""
        return ask(
            lambda q: q.search_artifacts(
                scope, name, name_contains, python_type, min_size, max_size, step, limit, cursor
            )
        )

    @server.tool()
    def logs(
        task: str,
        stream: str = "stderr",
        tail: int | None = 50,
        head: int | None = None,
        grep: str | None = None,
        max_bytes: int = 64 * 1024,
        attempt: int | None = None,
        cursor: str | None = None,
    ) -> LogWindow:
        """A window of a task's ("Flow/123/step/456") log: the last `tail` lines (default 50 of stderr),
        or the first `head`; grep keeps lines matching a regular expression; attempt defaults to the latest."""
        return ask(lambda q: q.logs(task, stream, tail, head, grep, max_bytes, attempt, cursor))

    return server


def main() -> None:
    """``metaflow-stack-mcp``: serve the tools on stdin/stdout."""
    build().run("stdio")


if __name__ == "__main__":
    main()
