"""Answers from a local datastore (``.metaflow``), for machines without the service.

Metaflow's local metadata keeps one small JSON file per fact beside the
artifacts (``<run>/<step>/<task>/_meta/sysmeta_attempt_ok_<ms>.json``,
``<attempt>.data.json`` with each artifact's size and type). These answers
read only such files and byte ranges of logs, never an artifact: a task's
status is its latest ``attempt_ok``, a failure's exception is the traceback
at the end of its stderr. Without heartbeats locally, a task that never
reported is ``running`` while ``Liveness`` sees its process or fresh files,
and ``killed`` after that.

Costs grow with the run (two directory listings and a few small files per
task) but stay bounded by what is read: ``files_read`` counts them. Parsed
files are remembered by path and modification time (Metaflow writes each
once, but for a run's ``_self.json`` when its tags change), so pages that
ask again, as a live UI does, pay for listings and new files only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaflow_stack.agent.liveness import Liveness
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
from metaflow_stack.agent.source import STATUSES, AgentError, ArtifactScope
from metaflow_stack.datastore import CONFIDENTIAL_FIELD
from metaflow_stack.datastore.attempts import attempt_of
from metaflow_stack.datastore.cursors import decode_offset, encode_cursor
from metaflow_stack.datastore.log_files import LogFiles, ReadMeter
from metaflow_stack.datastore.log_windows import LogQuery, log_cursor, read_window, rendered
from metaflow_stack.datastore.type_names import type_name
from metaflow_stack.ids import is_number
from metaflow_stack.patterns import compile_pattern

#: Lines of a failed attempt's stderr searched for its traceback.
_TRACEBACK_WINDOW = 80
#: Parsed small files remembered (about a kilobyte each): a few thousand-task runs' worth.
_PARSED_FILES = 100_000


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


@dataclass(frozen=True)
class _Row:
    """One task of a scanned run: its latest attempt, outcome (None: none yet), end time and status."""

    step: str
    folder: Path
    attempt: int
    ok: bool | None
    finished: int | None
    status: str


class LocalSource:
    """Answers from the files under ``root`` (a ``.metaflow`` folder); ``liveness`` tells running from killed."""

    def __init__(self, root: Path, liveness: Liveness | None = None) -> None:
        self.root = Path(root)
        self.files_read = 0
        self.liveness = liveness or Liveness()
        self._logs = LogFiles((str(self.root),))
        self._parsed: dict[str, tuple[int, Any]] = {}
        #: Tasks whose latest attempt succeeded and runs whose end step did: nothing changes them again.
        self._succeeded: dict[str, tuple[int, bool | None, int | None]] = {}
        self._completed: dict[str, int | None] = {}
        self._foreach_stacks: dict[str, list[str]] = {}

    def close(self) -> None:
        pass

    # -- files --------------------------------------------------------------

    def _json(self, path: Path | str) -> Any:
        key = str(path)
        stamp = os.stat(key).st_mtime_ns
        known = self._parsed.get(key)
        if known is not None and known[0] == stamp:
            return known[1]
        self.files_read += 1
        with open(key, encoding="utf-8") as stream:
            value = json.load(stream)
        _remember(self._parsed, key, (stamp, value))
        return value

    @staticmethod
    def _names(folder: Path) -> list[str]:
        try:
            return os.listdir(folder)
        except FileNotFoundError:
            return []

    def _folder(self, *parts: str, what: str) -> Path:
        folder = self.root.joinpath(*parts)
        if ".." in parts or not (folder / "_meta" / "_self.json").is_file():
            raise AgentError("not_found", f"{what} does not exist in {self.root}", "check the pathspec")
        return folder

    @staticmethod
    def _children(folder: Path) -> list[Path]:
        with os.scandir(folder) as entries:  # the directory's own entry types: no stat per child
            names = [e.name for e in entries if e.is_dir() and not e.name.startswith("_") and e.name != "data"]
        names.sort(key=lambda name: (not is_number(name), int(name) if is_number(name) else 0, name))
        return [folder / name for name in names]

    def _state(self, task: Path) -> tuple[int, bool | None, int | None]:
        """The task's latest attempt, whether it succeeded (None: no outcome yet), and when it ended."""
        key = str(task)
        if key in self._succeeded:
            return self._succeeded[key]
        latest: tuple[int, bool | None, int | None] = (0, None, None)
        meta = task / "_meta"
        for name in self._names(meta):
            if not (name.startswith("sysmeta_attempt_ok_") and name.endswith(".json")):
                continue
            datum = self._json(meta / name)
            attempt = attempt_of(datum.get("tags")) or 0
            if attempt >= latest[0]:
                latest = (attempt, datum["value"] == "True", datum["ts_epoch"])
        started = [int(name.split(".")[0]) for name in self._names(task) if name.endswith(".attempt.json")]
        if started and max(started) > latest[0]:
            return max(started), None, None  # a newer attempt has not reported yet
        if latest[1]:
            _remember(self._succeeded, key, latest)
        return latest

    def _status(self, task: Path, ok: bool | None) -> str:
        if ok is not None:
            return "completed" if ok else "failed"
        return "running" if self.liveness.task_alive(task) else "killed"

    def _tasks(self, run: Path) -> list[tuple[str, Path]]:
        """Every task of the run, steps in the order they started (as the service lists them). A step or task
        whose folder Metaflow is still making (it writes ``_self.json`` after the folder) is not there yet."""
        steps = []
        for step in self._children(run):
            try:
                steps.append((self._json(step / "_meta" / "_self.json")["ts_epoch"], step))
            except FileNotFoundError:
                continue
        steps.sort(key=lambda started: started[0])
        return [
            (step.name, task)
            for _, step in steps
            for task in self._children(step)
            if (task / "_meta" / "_self.json").is_file()
        ]

    def _scan(self, run: Path) -> list[_Row]:
        """Every task of the run, with its status."""
        rows = []
        for step, task in self._tasks(run):
            attempt, ok, finished = self._state(task)
            rows.append(_Row(step, task, attempt, ok, finished, self._status(task, ok)))
        return rows

    def _run_status(self, run: Path, scan: list[_Row]) -> str:
        """``completed`` once ``end`` succeeded; ``failed`` if a task failed; ``running`` while a task runs
        or the run's process is alive between steps; else ``killed``."""
        if any(row.step == "end" and row.ok for row in scan):
            return "completed"
        if any(row.ok is False for row in scan):
            return "failed"
        if any(row.status == "running" for row in scan):
            return "running"
        return "running" if self.liveness.run_alive(run, [row.folder for row in scan]) else "killed"

    def _run_outcome(self, run: Path) -> tuple[str, int | None]:
        """The run's status and end time; a completed run's are remembered, never to change."""
        key = str(run)
        if key in self._completed:
            return "completed", self._completed[key]
        scan = self._scan(run)
        state = self._run_status(run, scan)
        finished_at = self._finished_at(scan, state)
        if state == "completed":
            _remember(self._completed, key, finished_at)
        return state, finished_at

    @staticmethod
    def _finished_at(scan: list[_Row], state: str) -> int | None:
        """When the run's last task ended; None while it runs."""
        ended = [row.finished for row in scan if row.finished is not None]
        return max(ended) if ended and state != "running" else None

    # -- answers ------------------------------------------------------------

    def flows(self, limit: int, cursor: str | None) -> tuple[list[FlowInfo], str | None]:
        offset = decode_offset(cursor)
        found = []
        for name in self._names(self.root):
            try:
                row = self._json(self.root / name / "_meta" / "_self.json")
            except (OSError, ValueError):  # not a flow (Metaflow's own folders, stray files), or half-written
                continue
            stamp = row.get("ts_epoch") if isinstance(row, dict) else None
            if isinstance(stamp, int):
                found.append(FlowInfo(name=name, created_at=stamp))
        found.sort(key=lambda flow: (-flow.created_at, flow.name))
        return _page(found, offset, limit)

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
        offset = decode_offset(cursor)
        candidates = []
        for folder in self._children(self._folder(flow, what=f"flow {flow}")):
            try:
                row = self._json(folder / "_meta" / "_self.json")
            except FileNotFoundError:  # a run folder Metaflow is still creating
                continue
            every_tag = set(row.get("tags") or []) | set(row.get("system_tags") or [])
            outside = (low is not None and row["ts_epoch"] < low) or (high is not None and row["ts_epoch"] > high)
            if not outside and set(tags) <= every_tag and user in (None, row.get("user_name")):
                candidates.append((row, folder))
        candidates.sort(key=lambda item: item[0]["ts_epoch"], reverse=True)
        found = []
        for row, folder in candidates:  # statuses cost a scan of the run: only as many as the page needs
            state, finished_at = self._run_outcome(folder)
            if status is None or state == status:
                found.append(
                    RunInfo(
                        pathspec=f"{row['flow_id']}/{row['run_number']}",
                        status=state,
                        user=row.get("user_name"),
                        tags=row.get("tags") or [],
                        system_tags=row.get("system_tags") or [],
                        started_at=row["ts_epoch"],
                        finished_at=finished_at,
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
        for row in scan:
            counts = steps.setdefault(row.step, dict.fromkeys(("total", *STATUSES), 0))
            counts[row.status] += 1
            counts["total"] += 1
        failed = [(row.finished or 0, row.step, row.folder.name, row.attempt) for row in scan if row.ok is False]
        first = min(failed, default=None)
        state = self._run_status(folder, scan)
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
        failed = [row for row in scan if row.ok is False]
        window, after = _page(failed, decode_offset(cursor), limit)
        answers = [self._failure((flow, run, row.step, row.folder.name), row.attempt, row.finished) for row in window]
        return answers, after

    def tasks(
        self, flow: str, run: str, step: str | None, status: str | None, limit: int, cursor: str | None
    ) -> tuple[list[TaskInfo], str | None]:
        scan = self._scan(self._folder(flow, run, what=f"run {flow}/{run}"))
        chosen = [row for row in scan if step in (None, row.step) and status in (None, row.status)]
        window, after = _page(chosen, decode_offset(cursor), limit)
        return [self._task(flow, run, row) for row in window], after

    def _task(self, flow: str, run: str, row: _Row) -> TaskInfo:
        meta = row.folder / "_meta"
        names = self._names(meta)
        stack = self._foreach_stacks.get(str(row.folder))
        if stack is None:
            found = sorted(meta / n for n in names if n.startswith("sysmeta_foreach-stack_"))
            stack = self._json(found[-1])["value"] if found else []
            if row.ok is not None:  # recorded when the task started: final once it has an outcome
                _remember(self._foreach_stacks, str(row.folder), stack)
        verified = sorted(n for n in names if n.startswith(f"sysmeta_{CONFIDENTIAL_FIELD}_"))  # ms: one width
        return TaskInfo(
            pathspec=f"{flow}/{run}/{row.step}/{row.folder.name}",
            step_name=row.step,
            attempt=row.attempt,
            status=row.status,
            started_at=self._json(meta / "_self.json")["ts_epoch"],
            finished_at=row.finished,
            foreach=stack,
            confidential=ConfidentialInfo.recorded(self._json(meta / verified[-1])["value"]) if verified else None,
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
        offset = decode_offset(cursor)
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
        cursor = log_cursor(window["_cursor"]) if window["_cursor"] is not None else None
        attempt = window["attempt"]
        if attempt is None:
            attempt = cursor[0] if cursor else self._state(folder)[0]
        grep = window["grep"]
        query = LogQuery(
            lines=window.get("head") or window.get("tail"),
            from_end="tail" in window,
            grep=compile_pattern(grep) if grep is not None else None,
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


def _remember(cache: dict[str, Any], key: str, value: Any) -> None:
    """``cache[key] = value``, dropping the oldest entry once the cache holds ``_PARSED_FILES``."""
    if len(cache) >= _PARSED_FILES:
        del cache[next(iter(cache))]
    cache[key] = value


def _keep(artifact: ArtifactInfo, filters: dict[str, Any]) -> bool:
    size = artifact.size if artifact.size is not None else -1
    return (
        filters.get("name", artifact.name) == artifact.name
        and filters.get("sha", artifact.sha) == artifact.sha
        and filters.get("name_contains", "") in artifact.name
        and filters.get("python_type", artifact.python_type) == artifact.python_type
        and size >= filters.get("min_size", -1)
        and ("max_size" not in filters or 0 <= size <= filters["max_size"])
    )
