"""Bounded queries of Metaflow runs for scripts and agents.

Metaflow's Client API answers "which tasks of this run failed, and why" by
visiting every task (two metadata requests each, then unpickling
``_exception``), and shows a log by downloading all of it. ``Queries`` asks
the same questions of a source that can answer them cheaply: the metadata
service's opt-in routes (``service_source``: one request each, whatever the
run's size) or, without a service, the local datastore's small metadata
files (``local_source``). Nothing is ever unpickled.

``Queries`` checks and bounds every parameter once, for both sources; bounds
over the maximum are lowered and reported in ``clamped``. Errors are
``AgentError``: a stable ``code`` (``not_found``, ``bad_parameter``,
``service_unavailable``, ``service_too_old``), a message naming the path or
parameter, and the fix.
"""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from metaflow_stack.agent.models import (
    ArtifactList,
    Clamp,
    FailureList,
    FlowList,
    LogWindow,
    RunList,
    RunSummary,
    TaskList,
)
from metaflow_stack.agent.source import STATUSES, AgentError, ArtifactScope, Source, pathspec_parts
from metaflow_stack.datastore.log_windows import MAX_ATTEMPT, log_cursor
from metaflow_stack.ids import check_id
from metaflow_stack.patterns import compile_pattern

MAX_FLOWS = 1000
MAX_RUNS = 1000
MAX_FAILURES = 1000
MAX_TASKS = 1000
MAX_ARTIFACTS = 1000
MAX_LOG_LINES = 10_000
MAX_LOG_BYTES = 16 * 1024 * 1024
_RELATIVE = re.compile(r"([0-9]+)([smhd])")
_EPOCH = re.compile(r"[0-9]+")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: No way of writing a time is longer: nothing past it is parsed, so no value costs more than this to refuse.
_TIME_CHARS = 64
#: The times ``datetime`` holds (years 1 to 9999, UTC) in epoch ms; a bound outside them is a mistake, and
#: one inside them fits every integer column it is compared with.
_EARLIEST_MS = int(datetime(1, 1, 1, tzinfo=UTC).timestamp() * 1000)
_LATEST_MS = int(datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC).timestamp() * 1000)


def bound(name: str, value: int, maximum: int, clamped: list[Clamp]) -> int:
    if value < 1:
        raise AgentError("bad_parameter", f"{name} must be at least 1, not {value}")
    if value > maximum:
        clamped.append(Clamp(parameter=name, requested=value, used=maximum))
        return maximum
    return value


def _check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise AgentError("bad_parameter", f"status {status!r} is not one of {', '.join(STATUSES)}")


def epoch_ms(value: datetime | int | float | str, name: str) -> int:
    """A time bound as epoch milliseconds: a datetime, epoch seconds or ms (a number, or its digits), ISO 8601,
    or ``30m``/``24h``/``7d`` ago; anything else, or a time outside the years 1 to 9999, is refused."""
    ms = _as_ms(value)
    if ms is not None and _EARLIEST_MS <= ms <= _LATEST_MS:
        return ms
    shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:40]}..."
    raise AgentError(
        "bad_parameter",
        f"{name} {shown!r} is {'not a time' if ms is None else 'not between the years 1 and 9999'}",
        "use ISO 8601 (2024-05-01T12:00), epoch seconds or milliseconds, or 30m/24h/7d ago",
    )


def _as_ms(value: object) -> int | None:
    """``value`` in epoch ms, or None where it is no time; raises nothing, whatever a caller sends."""
    if isinstance(value, datetime):
        try:
            return int(value.timestamp() * 1000)
        except (ValueError, OverflowError, OSError):  # a naive time near year 1 or 9999, as local time
            return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if not isinstance(value, str):
        return _epoch(value)
    text = value.strip()
    if len(text) > _TIME_CHARS:
        return None
    relative = _RELATIVE.fullmatch(text)
    if relative:  # in integers: no float to overflow, however many days
        return int(time.time() * 1000) - int(relative[1]) * _UNIT_S[relative[2]] * 1000
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        pass
    # Digits after ISO 8601, which reads eight of them (20240501) as a date.
    return _epoch(int(text)) if _EPOCH.fullmatch(text) else None


def _epoch(number: int | float) -> int | None:
    """Epoch seconds, or milliseconds when larger than any time in seconds (1e11 s: the year 5138)."""
    if not abs(number) < 1e16:  # also NaN and infinities; larger is no time in either unit
        return None
    return int(number if number > 1e11 else number * 1000)


class Queries:
    """The queries an agent asks, on ``source``."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Queries:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_flows(self, limit: int = 100, cursor: str | None = None) -> FlowList:
        """The flows with runs recorded, newest first: name and when first recorded; limit: at most 1000."""
        clamped: list[Clamp] = []
        found, after = self.source.flows(bound("limit", limit, MAX_FLOWS, clamped), cursor)
        return FlowList(flows=found, truncated=after is not None, next_cursor=after, clamped=clamped)

    def list_runs(
        self,
        flow: str,
        status: str | None = None,
        since: datetime | int | str | None = None,
        until: datetime | int | str | None = None,
        tags: tuple[str, ...] | list[str] = (),
        limit: int = 20,
        cursor: str | None = None,
        user: str | None = None,
    ) -> RunList:
        """A flow's runs, newest first. status: running, completed, failed or killed; since/until (start time):
        ISO 8601, epoch seconds or ms, or "30m"/"24h"/"7d" ago; tags: every one must be on the run; user: who ran it;
        limit: at most 1000."""
        clamped: list[Clamp] = []
        _check_status(status)
        runs, after = self.source.runs(
            pathspec_parts(flow, 1, "flow")[0],
            status,
            epoch_ms(since, "since") if since is not None else None,
            epoch_ms(until, "until") if until is not None else None,
            list(tags),
            user,
            bound("limit", limit, MAX_RUNS, clamped),
            cursor,
        )
        return RunList(runs=runs, truncated=after is not None, next_cursor=after, clamped=clamped)

    def run_summary(self, run: str) -> RunSummary:
        """A run ("Flow/123"): status, duration, task counts per step by status, and its first failure."""
        return self.source.summary(*pathspec_parts(run, 2, "run"))

    def failures(self, run: str, limit: int = 20, cursor: str | None = None) -> FailureList:
        """A run's ("Flow/123") failed tasks: attempt, exception type, message and traceback tail of each."""
        clamped: list[Clamp] = []
        flow, number = pathspec_parts(run, 2, "run")
        found, after = self.source.failures(flow, number, bound("limit", limit, MAX_FAILURES, clamped), cursor)
        return FailureList(run=run, failures=found, truncated=after is not None, next_cursor=after, clamped=clamped)

    def run_tasks(
        self, run: str, step: str | None = None, status: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> TaskList:
        """A run's ("Flow/123") tasks in order, or one step's: latest attempt, status, start and end, and the
        foreach items that led to each ("items=3"); status: running, completed, failed or killed."""
        clamped: list[Clamp] = []
        flow, number = pathspec_parts(run, 2, "run")
        _check_status(status)
        found, after = self.source.tasks(flow, number, step, status, bound("limit", limit, MAX_TASKS, clamped), cursor)
        return TaskList(run=run, tasks=found, truncated=after is not None, next_cursor=after, clamped=clamped)

    def artifact_info(self, task: str, limit: int = 200, cursor: str | None = None) -> ArtifactList:
        """A task's ("Flow/123/step/456") artifacts, latest attempt: names, stored sizes, Python types; loads none."""
        clamped: list[Clamp] = []
        flow, run, step, task_id = pathspec_parts(task, 4, "task")
        found, after = self.source.artifacts(
            ArtifactScope(flow, run, step, task_id), {}, bound("limit", limit, MAX_ARTIFACTS, clamped), cursor
        )
        return ArtifactList(artifacts=found, truncated=after is not None, next_cursor=after, clamped=clamped)

    def search_artifacts(
        self,
        scope: str,
        name: str | None = None,
        name_contains: str | None = None,
        python_type: str | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        step: str | None = None,
        sha: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> ArtifactList:
        """Artifacts across a flow ("Flow") or a run ("Flow/123") by exact name, name fragment, Python type as
        recorded ("int", "dict", "pandas.core.frame.DataFrame"), stored size in bytes, step, or content hash
        (sha: every place the same value was stored); none is loaded."""
        pieces = scope.strip("/").split("/")
        if len(pieces) not in (1, 2) or not all(pieces) or ".." in pieces:
            raise AgentError("bad_parameter", f"scope {scope!r} is not a flow (Flow) or a run (Flow/run)")
        pieces = pathspec_parts(scope, len(pieces), "scope")
        if step is not None:
            check_id("step_name", step)
        clamped: list[Clamp] = []
        filters = {
            "name": name,
            "name_contains": name_contains,
            "python_type": python_type,
            "min_size": min_size,
            "max_size": max_size,
            "sha": sha,
        }
        found, after = self.source.artifacts(
            ArtifactScope(pieces[0], pieces[1] if len(pieces) == 2 else None, step),
            {k: v for k, v in filters.items() if v is not None},
            bound("limit", limit, MAX_ARTIFACTS, clamped),
            cursor,
        )
        return ArtifactList(artifacts=found, truncated=after is not None, next_cursor=after, clamped=clamped)

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
        parts = pathspec_parts(task, 4, "task")
        if stream not in ("stdout", "stderr"):
            raise AgentError("bad_parameter", f"stream {stream!r} is not stdout or stderr")
        if grep is not None:
            compile_pattern(grep)  # refused here, before any request
        if attempt is not None and not 0 <= attempt <= MAX_ATTEMPT:
            raise AgentError("bad_parameter", f"attempt {attempt} is not from 0 to {MAX_ATTEMPT}")
        if cursor is not None:
            log_cursor(cursor, attempt)  # the service's own check, so the local datastore reads no other offsets
        clamped: list[Clamp] = []
        forward = head is not None or cursor is not None
        window = {
            ("head" if forward else "tail"): bound(
                "head" if forward else "tail", (head if forward else tail) or 50, MAX_LOG_LINES, clamped
            ),
            "grep": grep,
            "max_bytes": bound("max_bytes", max_bytes, MAX_LOG_BYTES, clamped),
            "attempt": attempt,
            "_cursor": cursor,
        }
        answer = self.source.logs(parts, stream, window)
        answer.clamped = clamped
        return answer


def connect(service_url: str | None = None) -> Queries:
    """Queries on ``service_url`` or the configured service (its capabilities checked); without one,
    on the local datastore Metaflow would use here (``METAFLOW_DATASTORE_SYSROOT_LOCAL``, or the nearest
    ``.metaflow`` folder up from the working directory)."""
    url = service_url or os.environ.get("METAFLOW_SERVICE_URL")
    if not url:
        from metaflow.metaflow_config import SERVICE_URL

        url = SERVICE_URL
    if url:
        from metaflow_stack.agent.service_source import ServiceSource

        source = ServiceSource(url, os.environ.get("METAFLOW_SERVICE_AUTH_KEY"))
        source.check()
        return Queries(source)
    from metaflow.plugins.datastores.local_storage import LocalStorage

    from metaflow_stack.agent.local_source import LocalSource

    root = LocalStorage.get_datastore_root_from_config(lambda *args, **kwargs: None, create_on_absent=False)
    if root is None or not os.path.isdir(root):
        raise AgentError(
            "service_unavailable",
            "no metadata service is configured and no local datastore (.metaflow) was found here",
            "`just up` starts a service and prints the METAFLOW_SERVICE_URL to export; or run this where "
            "your flows ran",
        )
    return Queries(LocalSource(Path(root)))
