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

Any file there may have been written by a step's own code rather than by
Metaflow, so each is read as a regular file below the root, never through a
link nor waited on as a FIFO (``blobs.open_local``), and at most
``MAX_JSON_BYTES`` of it; one that cannot be read or parsed (nested past the
parser's limit), or is not the shape Metaflow writes, is skipped as absent,
never an error for the whole listing, and the values shown are bounded as
every reader bounds them (``datastore.task_metadata``).
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
from metaflow_stack.datastore.blobs import open_local
from metaflow_stack.datastore.cursors import decode_offset, encode_cursor
from metaflow_stack.datastore.log_files import LogFiles, ReadMeter
from metaflow_stack.datastore.log_windows import LogQuery, log_cursor, read_window, rendered
from metaflow_stack.datastore.task_metadata import exception_fields, foreach_items
from metaflow_stack.datastore.type_names import type_name
from metaflow_stack.errors import DatastoreError
from metaflow_stack.ids import is_number
from metaflow_stack.patterns import compile_pattern

#: Lines of a failed attempt's stderr searched for its traceback.
_TRACEBACK_WINDOW = 80
#: Parsed small files remembered (about a kilobyte each): a few thousand-task runs' worth.
_PARSED_FILES = 100_000
#: The largest file parsed: Metaflow's own (``_self.json``, ``sysmeta_*``, ``<attempt>.data.json``) are kilobytes.
MAX_JSON_BYTES = 1024 * 1024


def _page(items: list[Any], offset: int, limit: int) -> tuple[list[Any], str | None]:
    """One page of ``items`` and the cursor of the next (None on the last)."""
    more = offset + limit < len(items)
    return items[offset : offset + limit], encode_cursor([offset + limit]) if more else None


def _exception(lines: list[str]) -> dict[str, Any]:
    """Type, message and traceback from the last traceback in ``lines`` (Python's own format), bounded as every
    reader bounds a recorded exception."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return exception_fields(None)
    block: list[str] = []
    for line in lines[starts[-1] :]:
        if block and not line.strip():
            break
        block.append(line)
    last = next((line for line in reversed(block) if line and not line.startswith(" ")), "")
    kind, _, message = last.partition(": ")
    return exception_fields({"type": kind or None, "message": message or None, "traceback": block})


def numbered(names: list[str], suffix: str) -> list[int]:
    """The attempts of the files among ``names`` named ``<attempt><suffix>`` (``0.attempt.json``); another
    name ending so (``x.attempt.json``) is none of Metaflow's."""
    return [
        int(name.removesuffix(suffix)) for name in names if name.endswith(suffix) and is_number(name[: -len(suffix)])
    ]


@dataclass(frozen=True)
class _Row:
    """One task of a scanned run: its start, latest attempt, outcome (None: none yet), end time and status."""

    step: str
    folder: Path
    started: int
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

    def _json(self, path: Path) -> Any:
        """The JSON value of the file at ``path`` (below the root); None where there is none to read."""
        key = str(path)
        try:
            stamp = os.lstat(key).st_mtime_ns
        except OSError:
            return None
        known = self._parsed.get(key)
        if known is not None and known[0] == stamp:
            return known[1]
        self.files_read += 1
        try:
            with open_local(str(self.root), *path.relative_to(self.root).parts) as stream:
                # (as large as the file says it is, not a MiB for every few hundred bytes)
                size = min(os.fstat(stream.fileno()).st_size, MAX_JSON_BYTES) if stream is not None else 0
                data = stream.read(size + 1) if stream is not None else None
            value = json.loads(data) if data is not None and len(data) <= MAX_JSON_BYTES else None
        except (DatastoreError, OSError, ValueError, RecursionError, MemoryError):
            value = None  # unreadable, or not JSON this parser reads: as if absent
        _remember(self._parsed, key, (stamp, value))
        return value

    def _object(self, path: Path) -> dict[str, Any]:
        """The file's JSON object; empty where it holds none."""
        value = self._json(path)
        return value if isinstance(value, dict) else {}

    def metadatum(self, path: Path) -> dict[str, Any] | None:
        """A ``sysmeta_*`` file's record as Metaflow writes it (``field_name``, ``value``, ``type``, ``tags``,
        ``ts_epoch``: an int or None) and its ``attempt`` (None without an ``attempt_id`` tag); None when the
        file holds none."""
        datum = self._object(path)
        if not isinstance(datum.get("field_name"), str):
            return None
        tags = _texts(datum.get("tags"))
        stamp = datum.get("ts_epoch")
        return datum | {"tags": tags, "attempt": attempt_of(tags), "ts_epoch": stamp if type(stamp) is int else None}

    def _stamp(self, folder: Path) -> int | None:
        """When Metaflow recorded the flow, run, step or task at ``folder`` (its ``_meta/_self.json``); None
        while it has no readable record (Metaflow writes it after making the folder)."""
        stamp = self._object(folder / "_meta" / "_self.json").get("ts_epoch")
        return stamp if type(stamp) is int else None

    @staticmethod
    def _names(folder: Path) -> list[str]:
        try:
            return os.listdir(folder)
        except FileNotFoundError:
            return []

    def _folder(self, *parts: str, what: str) -> Path:
        folder = self.root.joinpath(*parts)
        if ".." in parts or self._stamp(folder) is None:
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
            datum = self.metadatum(meta / name)
            if datum is not None and (datum["attempt"] or 0) >= latest[0]:
                latest = (datum["attempt"] or 0, datum.get("value") == "True", datum["ts_epoch"])
        started = numbered(self._names(task), ".attempt.json")
        if started and max(started) > latest[0]:
            return max(started), None, None  # a newer attempt has not reported yet
        if latest[1]:
            _remember(self._succeeded, key, latest)
        return latest

    def _status(self, task: Path, ok: bool | None) -> str:
        if ok is not None:
            return "completed" if ok else "failed"
        return "running" if self.liveness.task_alive(task) else "killed"

    def _tasks(self, run: Path) -> list[tuple[str, Path, int]]:
        """Every task of the run and when it started, steps in the order they started (as the service lists
        them). A step or task whose folder Metaflow is still making (it writes ``_self.json`` after the
        folder) is not there yet."""
        steps = [(started, step) for step in self._children(run) if (started := self._stamp(step)) is not None]
        steps.sort(key=lambda found: found[0])
        return [
            (step.name, task, started)
            for _, step in steps
            for task in self._children(step)
            if (started := self._stamp(task)) is not None
        ]

    def _scan(self, run: Path) -> list[_Row]:
        """Every task of the run, with its status."""
        rows = []
        for step, task, started in self._tasks(run):
            attempt, ok, finished = self._state(task)
            rows.append(_Row(step, task, started, attempt, ok, finished, self._status(task, ok)))
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
            stamp = self._stamp(self.root / name)  # None: not a flow (Metaflow's own folders, stray files)
            if stamp is not None:
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
            started = self._stamp(folder)
            if started is None:  # a run folder Metaflow is still creating
                continue
            row = self._object(folder / "_meta" / "_self.json")
            every_tag = set(_texts(row.get("tags"))) | set(_texts(row.get("system_tags")))
            outside = (low is not None and started < low) or (high is not None and started > high)
            user_name = row.get("user_name") if isinstance(row.get("user_name"), str) else None
            if not outside and set(tags) <= every_tag and user in (None, user_name):
                candidates.append((started, folder, row, user_name))
        candidates.sort(key=lambda item: item[0], reverse=True)
        found = []
        for started, folder, row, user_name in candidates:  # statuses cost a scan of the run: only as many as needed
            state, finished_at = self._run_outcome(folder)
            if status is None or state == status:
                found.append(
                    RunInfo(
                        pathspec=f"{flow}/{folder.name}",
                        status=state,
                        user=user_name,
                        tags=_texts(row.get("tags")),
                        system_tags=_texts(row.get("system_tags")),
                        started_at=started,
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
        return Failure(
            pathspec="/".join(parts),
            step_name=parts[2],
            attempt=attempt,
            finished_at=finished,
            **_exception([line.text.decode(errors="replace") for line in window.lines]),
        )

    def summary(self, flow: str, run: str) -> RunSummary:
        folder = self._folder(flow, run, what=f"run {flow}/{run}")
        started = self._stamp(folder) or 0  # (``_folder`` found it)
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
            stack = foreach_items(self._object(found[-1]).get("value")) if found else []
            if row.ok is not None:  # recorded when the task started: final once it has an outcome
                _remember(self._foreach_stacks, str(row.folder), stack)
        data = [self.metadatum(meta / n) for n in names if n.startswith(f"sysmeta_{CONFIDENTIAL_FIELD}_")]
        records = [datum.get("value") for datum in data if datum is not None and datum["attempt"] == row.attempt]
        return TaskInfo(
            pathspec=f"{flow}/{run}/{row.step}/{row.folder.name}",
            step_name=row.step,
            attempt=row.attempt,
            status=row.status,
            started_at=row.started,
            finished_at=row.finished,
            foreach=stack,
            confidential=ConfidentialInfo.of_attempt(records),
        )

    def _described(self, run: str, step: str, task: Path) -> list[ArtifactInfo]:
        """The artifacts of the task's latest finished attempt, from its ``data.json`` (no value is read)."""
        attempts = sorted(numbered(self._names(task), ".data.json"), reverse=True)
        if not attempts:
            return []
        data = self._object(task / f"{attempts[0]}.data.json")
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
            for step_name, task_folder, _ in self._tasks(folder):
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


def _texts(value: Any) -> list[str]:
    """The text items of a recorded list (tags); [] for anything else."""
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


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
