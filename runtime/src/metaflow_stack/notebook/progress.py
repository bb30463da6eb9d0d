"""A run's progress as it happens, read from what Metaflow's runtime prints.

The runtime announces every task as it goes (``[run/step/task (pid N)]
Task is starting.``, ``... finished successfully.``, ``Task failed.``,
``(retry)``, ``[KILLED BY ORCHESTRATOR]``, a resumed run's ``Cloning
previously run task ...``), whatever backend runs the task, and the Runner
streams those lines into the cell as they come. Reading them costs nothing
and is never late, so the widget follows a run without polling; at the end
the states are replaced by what the metadata recorded (the agent's
queries), the last word on every task.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

#: A task's line from the runtime: its pathspec within the run, and the message.
_TASK_LINE = re.compile(r"\[(?P<run>[^/\]\s]+)/(?P<step>[^/\]\s]+)/(?P<task>[^/\]\s]+)(?: \(pid \d+\))?\] (?P<msg>.*)")
#: The runtime's messages about a task: its state after each, and whether it starts another attempt.
_STATES = {
    "Task is starting.": ("running", False),
    "Task is starting (retry).": ("running", True),
    "Task fallback is starting to handle the failure.": ("running", True),
    "Task finished successfully.": ("completed", False),
    "Task failed.": ("failed", False),
    "Task failed with a segmentation fault.": ("failed", False),
    "[KILLED BY ORCHESTRATOR]": ("killed", False),
}

#: Seconds between two updates of the front end at most (a foreach of thousands moves it a few times a second).
FLUSH_SECONDS = 0.25
#: A step's tasks the front end is sent at most: the widget draws 400 items a step (``ui/src/dag.ts``'s
#: ``MAX_ITEM_CELLS``), and a foreach of 50,000 sent whole would be megabytes of JSON on every update.
SHOWN_PER_STEP = 400
#: Which of a bigger step's tasks are shown: a failure first (a click shows its error), then what runs now,
#: then what ended.
_SHOWN_FIRST = {"failed": 0, "running": 1, "killed": 2, "completed": 3}
#: What a step's counts say: its tasks by status, all of them, and their retries.
COUNTED = ("total", "running", "completed", "failed", "killed", "retried")


def shown(tasks: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """What the front end is sent of a run's ``tasks`` (in the order they began): at most ``SHOWN_PER_STEP``
    of each step's, copied, and each step's counts of all its tasks, so its "n/N done" stays right. The tasks
    shown keep their order, so an item keeps its place in the grid while it stays shown."""
    by_step: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        by_step.setdefault(task["step_name"], []).append(task)
    sent: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    for step, own in by_step.items():
        count = dict.fromkeys(COUNTED, 0)
        for task in own:
            count[task["status"]] += 1
            count["retried"] += task["attempt"]
        count["total"] = len(own)
        counts[step] = count
        if len(own) > SHOWN_PER_STEP:
            # sorted is stable: the tasks of one status stay in their order
            ranked = sorted(range(len(own)), key=lambda i: _SHOWN_FIRST[own[i]["status"]])
            own = [own[i] for i in sorted(ranked[:SHOWN_PER_STEP])]
        sent += [dict(task) for task in own]
    return sent, counts


def graph_of(flow_file: str) -> dict[str, Any]:
    """The flow's steps in the order they run (type, next steps, whether they run once per foreach item), as
    Metaflow's graph reads the file the Runner loaded."""
    from metaflow.graph import FlowGraph
    from metaflow.runner.click_api import extract_flow_class_from_file

    graph = FlowGraph(extract_flow_class_from_file(flow_file))
    steps, _ = graph.output_steps()
    return {
        "steps": {
            node.name: {
                "type": steps[node.name]["type"],
                "next": list(steps[node.name]["next"]),
                "inside_foreach": node.is_inside_foreach,
            }
            for node in (graph[name] for name in graph.sorted_nodes)
        }
    }


#: Told what the front end is to show: ``shown``'s tasks and counts.
Changed = Callable[[list[dict[str, Any]], dict[str, dict[str, int]]], None]


class Progress:
    """The tasks of the run being watched, as the runtime announces them; ``changed`` is told what of them
    to show (``shown``: tasks in the agent's ``TaskInfo`` shape, and each step's counts): at once after a
    quiet spell, then at most every ``FLUSH_SECONDS``."""

    def __init__(self, flow: str, graph: dict[str, Any], changed: Changed) -> None:
        self.flow = flow
        self.graph = graph
        self.run_id: str | None = None
        self._tasks: dict[str, dict[str, Any]] = {}
        self._changed = changed
        self._per_step: dict[str, int] = {}
        self._dirty = False
        self._flushed = 0.0
        self._lock = threading.Lock()
        #: Set to flush now; the flusher is the only thread that tells (so what it tells stays in order, and
        #: the run's output streams never wait on the front end).
        self._wake = threading.Event()

    def feed(self, line: str) -> None:
        """One line of the run's output. A task's own prints carry the same prefix, so only the runtime's
        exact messages count (a task printing one of them word for word would be read as one)."""
        found = _TASK_LINE.search(line)
        if not found or found["step"] not in self.graph["steps"]:
            return
        message = found["msg"].rstrip()
        if message in _STATES:
            status, again = _STATES[message]
        elif message.startswith("Cloning previously run task "):
            status, again = "completed", False
        else:
            return
        now = int(time.time() * 1000)
        pathspec = f"{self.flow}/{found['run']}/{found['step']}/{found['task']}"
        with self._lock:
            self.run_id = found["run"]
            task = self._tasks.get(pathspec) or self._new(pathspec, found["step"], now)
            task["attempt"] += again
            task.update(status=status, finished_at=None if status == "running" else now)
            self._dirty = True
            due = time.monotonic() - self._flushed >= FLUSH_SECONDS
        if due:  # the first change after a quiet spell is shown at once; a burst waits for the next flush
            self._wake.set()

    def _new(self, pathspec: str, step: str, now: int) -> dict[str, Any]:
        index = self._per_step.get(step, 0)
        self._per_step[step] = index + 1
        task = {
            "pathspec": pathspec,
            "step_name": step,
            "attempt": 0,
            "status": "running",
            "started_at": now,
            "finished_at": None,
            "foreach": [f"item {index}"] if self.graph["steps"][step]["inside_foreach"] else [],
        }
        self._tasks[pathspec] = task
        return task

    def settle(self, status: str) -> None:
        """The run is over: a task still announced as running ended as ``status`` (killed with its run)."""
        with self._lock:
            for task in self._tasks.values():
                if task["status"] == "running":
                    task.update(status=status, finished_at=int(time.time() * 1000))
                    self._dirty = True
        self.flush()

    def tasks(self) -> list[dict[str, Any]]:
        """Every task announced so far (copies), in the order they began."""
        with self._lock:
            return [dict(task) for task in self._tasks.values()]

    def flush(self) -> None:
        """Tell ``changed`` if anything changed since the last time."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            self._flushed = time.monotonic()
            tasks, counts = shown(self._tasks.values())
        self._changed(tasks, counts)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """While the block runs, every line written to ``sys.stdout`` (where the Runner streams the run's
        output, from its threads) is also read here, and ``changed`` is told of what changed. Nothing here
        may stop the run: an error in following it only stops the following."""
        shown = sys.stdout
        stop = threading.Event()

        def flushing() -> None:
            while not stop.is_set():
                self._wake.wait(FLUSH_SECONDS)
                self._wake.clear()
                with contextlib.suppress(Exception):
                    self.flush()

        flusher = threading.Thread(target=flushing, name="mf-notebook-progress", daemon=True)
        tap = _Tap(shown, self.feed)
        try:
            sys.stdout = tap
            flusher.start()
            yield
        finally:
            sys.stdout = shown
            stop.set()
            self._wake.set()
            if flusher.is_alive():
                flusher.join()
            with contextlib.suppress(Exception):
                tap.close()
                self.flush()


class _Tap:
    """``sys.stdout`` as it was, each whole line also handed to ``feed``."""

    def __init__(self, shown: Any, feed: Callable[[str], None]) -> None:
        self._shown = shown
        self._feed = feed
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        written = self._shown.write(text)
        with self._lock:  # the Runner streams stdout and stderr from a thread each
            *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            try:
                self._feed(line)
            except Exception:  # the stream is the run's: following it must never break it
                continue
        return written

    def close(self) -> None:
        if self._partial:
            self._feed(self._partial)
            self._partial = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shown, name)
