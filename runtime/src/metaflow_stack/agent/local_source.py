"""Answers from a local datastore (``.metaflow``), for machines without the service.

Metaflow's local metadata keeps one small JSON file per fact beside the
artifacts (``<run>/<step>/<task>/_meta/sysmeta_attempt_ok_<ms>.json``,
``<attempt>.data.json`` with each artifact's size and type). These answers
read only such files and byte ranges of logs, never an artifact: a task's
status is its latest ``attempt_ok``, a failure's exception is the traceback
at the end of its stderr. Without heartbeats locally, a task that never
reported is ``running``.

Costs grow with the run (one directory listing and a few small files per
task) but stay bounded by what is read: ``files_read`` counts them.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from metaflow_stack.agent.models import (
    ArtifactInfo,
    Failure,
    LogLine,
    LogWindow,
    RunInfo,
    RunSummary,
    StepCounts,
    TaskInfo,
)
from metaflow_stack.agent.queries import STATUSES, AgentError, ArtifactScope
from metaflow_stack.service.log_files import LogFiles, ReadMeter
from metaflow_stack.service.logs import LogQuery, read_window, rendered
from metaflow_stack.service.pages import decode_cursor, encode_cursor
from metaflow_stack.service.provider import type_name

_ATTEMPT_TAG = re.compile(r"^attempt_id:(\d+)$")
#: Lines of a failed attempt's stderr searched for its traceback.
_TRACEBACK_WINDOW = 80


def _offset(cursor: str | None) -> int:
    if cursor is None:
        return 0
    values = decode_cursor(cursor)
    if len(values) != 1 or not isinstance(values[0], int):
        raise AgentError("bad_parameter", "cursor: not one this query issued")
    return values[0]


def _page(items: list[Any], offset: int, limit: int) -> tuple[list[Any], str | None]:
    """One page of ``items`` and the cursor of the next (None on the last)."""
    more = offset + limit < len(items)
    return items[offset : offset + limit], encode_cursor([offset + limit]) if more else None


def _exception(lines: list[str]) -> tuple[str | None, str | None, list[str]]:
    """Type, message and traceback from the last traceback in ``lines`` (Python's own format)."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return None, None, []
    block: list[str] = []
    for line in lines[starts[-1] :]:
        if block and not line.strip():
            break
        block.append(line)
    last = next((line for line in reversed(block) if line and not line.startswith(" ")), "")
    kind, _, message = last.partition(": ")
    return kind or None, message or None, [line[:300] for line in block[-20:]]


class LocalSource:
    """Answers from the files under ``root`` (a ``.metaflow`` folder)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files_read = 0
        self._logs = LogFiles((str(self.root),))

    def close(self) -> None:
        pass

    # -- files --------------------------------------------------------------

    def _json(self, path: Path) -> Any:
        self.files_read += 1
        return json.loads(path.read_text())

    def _folder(self, *parts: str, what: str) -> Path:
        folder = self.root.joinpath(*parts)
        if ".." in parts or not (folder / "_meta" / "_self.json").is_file():
            raise AgentError("not_found", f"{what} does not exist in {self.root}", "check the pathspec")
        return folder

    @staticmethod
    def _children(folder: Path) -> list[Path]:
        return sorted(
            (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_") and p.name != "data"),
            key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
        )

    def _state(self, task: Path) -> tuple[int, bool | None, int | None]:
        """The task's latest attempt, whether it succeeded (None: no outcome yet), and when it ended."""
        latest: tuple[int, bool | None, int | None] = (0, None, None)
        for path in task.glob("_meta/sysmeta_attempt_ok_*.json"):
            datum = self._json(path)
            attempts = [int(m[1]) for tag in datum.get("tags") or [] if (m := _ATTEMPT_TAG.match(tag))]
            attempt = attempts[0] if attempts else 0
            if attempt >= latest[0]:
                latest = (attempt, datum["value"] == "True", datum["ts_epoch"])
        started = [int(p.name.split(".")[0]) for p in task.glob("*.attempt.json")]
        if started and max(started) > latest[0]:
            return max(started), None, None  # a newer attempt has not reported yet
        return latest

    @staticmethod
    def _status(ok: bool | None) -> str:
        return "running" if ok is None else ("completed" if ok else "failed")

    def _tasks(self, run: Path) -> list[tuple[str, Path]]:
        """Every task of the run, steps in the order they started (as the service lists them)."""
        steps = sorted(self._children(run), key=lambda step: self._json(step / "_meta" / "_self.json")["ts_epoch"])
        return [(step.name, task) for step in steps for task in self._children(step)]

    def _scan(self, run: Path) -> list[tuple[str, Path, int, bool | None, int | None]]:
        """Every task of the run: step, folder, latest attempt, outcome, end time."""
        return [(step, task, *self._state(task)) for step, task in self._tasks(run)]

    @staticmethod
    def _run_status(scan: list[tuple[str, Path, int, bool | None, int | None]]) -> str:
        """``completed`` once ``end`` succeeded; ``failed`` if a task failed; else ``running``."""
        if any(step == "end" and ok for step, _, _, ok, _ in scan):
            return "completed"
        return "failed" if any(ok is False for _, _, _, ok, _ in scan) else "running"

    @staticmethod
    def _finished_at(scan: list[tuple[str, Path, int, bool | None, int | None]], state: str) -> int | None:
        """When the run's last task ended; None while it runs."""
        ended = [finished for *_, finished in scan if finished is not None]
        return max(ended) if ended and state != "running" else None

    # -- answers ------------------------------------------------------------

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
        offset = _offset(cursor)
        candidates = []
        for folder in self._children(self._folder(flow, what=f"flow {flow}")):
            meta = folder / "_meta" / "_self.json"
            if not meta.is_file():
                continue
            row = self._json(meta)
            every_tag = set(row.get("tags") or []) | set(row.get("system_tags") or [])
            outside = (low is not None and row["ts_epoch"] < low) or (high is not None and row["ts_epoch"] > high)
            if not outside and set(tags) <= every_tag and user in (None, row.get("user_name")):
                candidates.append((row, folder))
        candidates.sort(key=lambda item: item[0]["ts_epoch"], reverse=True)
        found = []
        for row, folder in candidates:  # statuses cost a scan of the run: only as many as the page needs
            scan = self._scan(folder)
            state = self._run_status(scan)
            if status is None or state == status:
                found.append(
                    RunInfo(
                        pathspec=f"{row['flow_id']}/{row['run_number']}",
                        status=state,
                        user=row.get("user_name"),
                        tags=row.get("tags") or [],
                        system_tags=row.get("system_tags") or [],
                        started_at=row["ts_epoch"],
                        finished_at=self._finished_at(scan, state),
                    )
                )
            if len(found) > offset + limit:
                break
        return _page(found, offset, limit)

    def _failure(self, parts: tuple[str, str, str, str], attempt: int, finished: int | None) -> Failure:
        meter = ReadMeter()
        files = self._logs.open("local", str(self.root), parts, attempt, "stderr", meter)
        window = read_window(files, LogQuery(lines=_TRACEBACK_WINDOW, from_end=True, max_bytes=64 * 1024))
        kind, message, traceback = _exception([line.text.decode(errors="replace") for line in window.lines])
        return Failure(
            pathspec="/".join(parts),
            step_name=parts[2],
            attempt=attempt,
            finished_at=finished,
            type=kind,
            message=message,
            traceback=traceback,
        )

    def summary(self, flow: str, run: str) -> RunSummary:
        folder = self._folder(flow, run, what=f"run {flow}/{run}")
        started = self._json(folder / "_meta" / "_self.json")["ts_epoch"]
        scan = self._scan(folder)
        steps: dict[str, dict[str, int]] = {}
        for step, _, _, ok, _ in scan:
            counts = steps.setdefault(step, dict.fromkeys(("total", *STATUSES), 0))
            counts[self._status(ok)] += 1
            counts["total"] += 1
        failed = [
            (finished or 0, step, task.name, attempt) for step, task, attempt, ok, finished in scan if ok is False
        ]
        first = min(failed, default=None)
        state = self._run_status(scan)
        finished_at = self._finished_at(scan, state)
        return RunSummary(
            pathspec=f"{flow}/{run}",
            status=state,
            started_at=started,
            finished_at=finished_at,
            duration_ms=(finished_at or int(time.time() * 1000)) - started,
            steps=[StepCounts(step_name=name, **counts) for name, counts in steps.items()],
            first_failure=self._failure((flow, run, first[1], first[2]), first[3], first[0]) if first else None,
        )

    def failures(self, flow: str, run: str, limit: int, cursor: str | None) -> tuple[list[Failure], str | None]:
        scan = self._scan(self._folder(flow, run, what=f"run {flow}/{run}"))
        failed = [(step, task.name, attempt, finished) for step, task, attempt, ok, finished in scan if ok is False]
        window, after = _page(failed, _offset(cursor), limit)
        return [self._failure((flow, run, step, task), attempt, end) for step, task, attempt, end in window], after

    def tasks(
        self, flow: str, run: str, step: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[TaskInfo], str | None]:
        scan = self._scan(self._folder(flow, run, what=f"run {flow}/{run}"))
        chosen = [
            (name, task, attempt, ok, finished)
            for name, task, attempt, ok, finished in scan
            if (step is None or name == step) and (status is None or self._status(ok) == status)
        ]
        window, after = _page(chosen, _offset(cursor), limit)
        return [self._task(flow, run, *row) for row in window], after

    def _task(self, flow: str, run: str, step: str, task: Path, attempt: int, ok: bool | None, end: int | None):
        stacks = sorted(task.glob("_meta/sysmeta_foreach-stack_*.json"))
        return TaskInfo(
            pathspec=f"{flow}/{run}/{step}/{task.name}",
            step_name=step,
            attempt=attempt,
            status=self._status(ok),
            started_at=self._json(task / "_meta" / "_self.json")["ts_epoch"],
            finished_at=end,
            foreach=self._json(stacks[-1])["value"] if stacks else [],
        )

    def _described(self, run: str, step: str, task: Path) -> list[ArtifactInfo]:
        """The artifacts of the task's latest finished attempt, from its ``data.json`` (no value is read)."""
        attempts = sorted((int(p.name.split(".")[0]) for p in task.glob("*.data.json")), reverse=True)
        if not attempts:
            return []
        data = self._json(task / f"{attempts[0]}.data.json")
        info = data.get("info") or {}
        return [
            ArtifactInfo(
                pathspec=f"{run}/{step}/{task.name}",
                name=name,
                attempt=attempts[0],
                size=(info.get(name) or {}).get("size"),
                python_type=type_name((info.get(name) or {}).get("type")),
                sha=sha,
            )
            for name, sha in (data.get("objects") or {}).items()
        ]

    def artifacts(
        self, scope: ArtifactScope, filters: dict[str, Any], limit: int, cursor: str | None
    ) -> tuple[list[ArtifactInfo], str | None]:
        offset = _offset(cursor)
        flow, run, step = scope.flow, scope.run, scope.step
        if scope.task is not None:
            folder = self._folder(flow, run, step, scope.task, what=f"task {flow}/{run}/{step}/{scope.task}")
            return _page(self._described(f"{flow}/{run}", step, folder), offset, limit)
        flow_folder = self._folder(flow, what=f"flow {flow}")
        runs = [self._folder(flow, run, what=f"run {flow}/{run}")] if run else self._children(flow_folder)
        found: list[ArtifactInfo] = []
        for folder in runs:
            for step_name, task_folder in self._tasks(folder):
                if step is None or step_name == step:
                    described = self._described(f"{flow}/{folder.name}", step_name, task_folder)
                    found += [artifact for artifact in described if _keep(artifact, filters)]
                if len(found) > offset + limit:
                    return _page(found, offset, limit)
        return _page(found, offset, limit)

    def logs(self, parts: list[str], stream: str, window: dict[str, Any]) -> LogWindow:
        folder = self._folder(*parts, what=f"task {'/'.join(parts)}")
        cursor = decode_cursor(window["_cursor"]) if window["_cursor"] else None
        attempt = window["attempt"]
        if attempt is None:
            attempt = cursor[0] if cursor else self._state(folder)[0]
        grep = window["grep"]
        query = LogQuery(
            lines=window.get("head") or window.get("tail"),
            from_end="tail" in window,
            grep=re.compile(grep.encode()) if grep is not None else None,
            max_bytes=window["max_bytes"],
            cursor=cursor,
        )
        meter = ReadMeter()
        files = self._logs.open("local", str(self.root), tuple(parts), attempt, stream, meter)
        read = read_window(files, query)
        after = encode_cursor([attempt, *read.offsets]) if read.more else None
        return LogWindow(
            pathspec="/".join(parts),
            stream=stream,
            attempt=attempt,
            lines=[LogLine(**line) for line in rendered(read.lines)],
            size=sum(f.size() for f in files),
            bytes_read=meter.bytes_read,
            truncated=read.truncated or read.more,
            next_cursor=after,
        )


def _keep(artifact: ArtifactInfo, filters: dict[str, Any]) -> bool:
    size = artifact.size if artifact.size is not None else -1
    return (
        filters.get("name", artifact.name) == artifact.name
        and filters.get("name_contains", "") in artifact.name
        and filters.get("python_type", artifact.python_type) == artifact.python_type
        and size >= filters.get("min_size", -1)
        and ("max_size" not in filters or 0 <= size <= filters["max_size"])
    )
