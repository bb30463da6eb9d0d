"""``metaflow agent``: the bounded run queries of ``metaflow_stack.agent`` on the command line.

Each command prints one JSON document: compact with ``--json`` (for scripts
and agents), indented otherwise. A query that cannot be answered prints
``{"error": {code, message, fix}}`` with ``--json``, else an error line and
its fix; the exit status is 1 either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from metaflow._vendor import click
from rich.console import Console

from metaflow_extensions.stack.cmd.cli_errors import errors_as_json, friendly

_out = Console()


def _answer(query: Callable[..., Any]) -> Callable[..., Any]:
    """Connect, run the query, print its model; errors as JSON or as a line, per ``--json``."""

    @click.option("--json", "as_json", is_flag=True, help="One line of JSON (errors too) for scripts and agents.")
    @click.option("--service-url", envvar="METAFLOW_SERVICE_URL", help="The metadata service [METAFLOW_SERVICE_URL].")
    @functools.wraps(query)
    @friendly
    def command(as_json: bool, service_url: str | None, **kwargs: Any) -> None:
        from metaflow_stack.agent import connect

        with errors_as_json(as_json), connect(service_url) as queries:
            result = query(queries, **kwargs)
        if as_json:
            print(result.model_dump_json())
        else:
            _out.print_json(result.model_dump_json())

    return command


@click.group()
def cli() -> None:
    pass


@cli.group(help="Bounded, structured queries of runs (one request each) for scripts and AI agents.")
def agent() -> None:
    pass


_limit = functools.partial(click.option, "--limit", type=int, show_default=True)
_cursor = click.option("--cursor", help="The next_cursor of the previous answer.")


@agent.command(help="The flows with runs recorded, newest first.")
@_limit(default=100)
@_cursor
@_answer
def flows(queries, limit: int, cursor) -> Any:
    return queries.list_flows(limit=limit, cursor=cursor)


@agent.command(help="A flow's runs, newest first: filter by status, start time (ISO, epoch, 24h/7d ago) and tags.")
@click.argument("flow")
@click.option("--status", type=click.Choice(["running", "completed", "failed", "killed"]))
@click.option("--since", help="Started at or after: ISO 8601, epoch seconds, or 30m/24h/7d ago.")
@click.option("--until", help="Started at or before, in the same forms.")
@click.option("--tag", "tags", multiple=True, help="A tag every run must have (repeat for more).")
@click.option("--user", help="Only runs by this user.")
@_limit(default=20)
@_cursor
@_answer
def runs(queries, flow: str, status, since, until, tags, user, limit: int, cursor) -> Any:
    return queries.list_runs(
        flow, status=status, since=since, until=until, tags=tags, user=user, limit=limit, cursor=cursor
    )


@agent.command(help="A run's status, duration, per-step task counts by status and first failure.")
@click.argument("run")
@_answer
def summary(queries, run: str) -> Any:
    return queries.run_summary(run)


@agent.command(help="A run's failed tasks with exception type, message and traceback tail.")
@click.argument("run")
@_limit(default=20)
@_cursor
@_answer
def failures(queries, run: str, limit: int, cursor) -> Any:
    return queries.failures(run, limit=limit, cursor=cursor)


@agent.command(help="A run's tasks (or one step's) with attempt, status, times and foreach items.")
@click.argument("run")
@click.option("--step", help="Only this step.")
@click.option("--status", type=click.Choice(["running", "completed", "failed", "killed"]))
@_limit(default=100)
@_cursor
@_answer
def tasks(queries, run: str, step, status, limit: int, cursor) -> Any:
    return queries.run_tasks(run, step=step, status=status, limit=limit, cursor=cursor)


@agent.command(help="A task's artifacts: names, sizes and Python types, without loading any.")
@click.argument("task")
@_limit(default=200)
@_cursor
@_answer
def artifacts(queries, task: str, limit: int, cursor) -> Any:
    return queries.artifact_info(task, limit=limit, cursor=cursor)


@agent.command(help="Artifacts across a flow (Flow) or run (Flow/run) by name, type, size or hash; none is loaded.")
@click.argument("scope")
@click.option("--name", help="Exactly this name.")
@click.option("--name-contains", help="Names containing this text.")
@click.option("--type", "python_type", help="A Python type as recorded, e.g. dict or pandas.core.frame.DataFrame.")
@click.option("--min-size", type=int, help="At least this many bytes (as stored).")
@click.option("--max-size", type=int, help="At most this many bytes (as stored).")
@click.option("--step", help="Only this step.")
@click.option("--sha", help="Only this value, by content hash (where else a value went).")
@_limit(default=50)
@_cursor
@_answer
def search(queries, scope: str, **filters: Any) -> Any:
    return queries.search_artifacts(scope, **filters)


@agent.command(help="A window of a task's log: the last lines (default 50 of stderr), the first, or grepped.")
@click.argument("task")
@click.option("--stream", type=click.Choice(["stdout", "stderr"]), default="stderr", show_default=True)
@click.option("--tail", type=int, help="The last N lines [default: 50].")
@click.option("--head", type=int, help="The first N lines (or the N after --cursor).")
@click.option("--grep", help="Only lines matching this regular expression.")
@click.option("--max-bytes", type=int, default=64 * 1024, show_default=True)
@click.option("--attempt", type=int, help="The attempt [default: the latest].")
@_cursor
@_answer
def logs(queries, task: str, **window: Any) -> Any:
    return queries.logs(task, **window)
