"""A run's progress as it happens, read from what Metaflow's runtime prints.

The runtime announces every task as it goes (``[run/step/task (pid N)]
Task is starting.``, ``... finished successfully.``, ``Task failed.``,
``(retry)``, ``Foreach yields N child steps.``, a resumed run's ``Cloning
previously run task ...``), whatever backend runs the task, and the Runner
streams those lines into the cell as they come. Reading them costs nothing
and is never late, so the widget follows a run without polling; at the end
the states are replaced by what the metadata recorded (the agent's
queries), the last word on every task.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: A task's line from the runtime: its pathspec within the run, and the message.
_TASK_LINE = re.compile(r"\[(?P<run>[^/\]\s]+)/(?P<step>[^/\]\s]+)/(?P<task>[^/\]\s]+)(?: \(pid \d+\))?\] (?P<msg>.*)")
_YIELDS = re.compile(r"Foreach yields (\d+) child steps\.")

#: Seconds between two updates of the front end at most (a foreach of thousands moves it a few times a second).
FLUSH_SECONDS = 0.25


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


class Progress:
    """The tasks of the run being watched, as the runtime announces them; ``changed`` is told with the tasks in
    the agent's ``TaskInfo`` shape: at once after a quiet spell, then at most every ``FLUSH_SECONDS``."""

    def __init__(self, flow: str, graph: dict[str, Any], changed: Callable[[list[dict[str, Any]]], None]) -> None:
        self.flow = flow
        self.graph = graph
        self.run_id: str | None = None
        self._tasks: dict[str, dict[str, Any]] = {}
        self._changed = changed
        self._dirty = False
        self._flushed = 0.0
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        """One line of the run's output."""
        found = _TASK_LINE.search(line)
        if not found or found["step"] not in self.graph["steps"]:
            return
        message, now = found["msg"], int(time.time() * 1000)
        pathspec = f"{self.flow}/{found['run']}/{found['step']}/{found['task']}"
        with self._lock:
            self.run_id = found["run"]
            task = self._tasks.setdefault(pathspec, self._new(pathspec, found["step"], now))
            if message.startswith(("Task is starting", "Task fallback is starting")):
                if "(retry)" in message or message.startswith("Task fallback"):
                    task["attempt"] += 1
                task.update(status="running", finished_at=None)
            elif message == "Task finished successfully.":
                task.update(status="completed", finished_at=now)
            elif message.startswith("Task failed"):
                task.update(status="failed", finished_at=now)
            elif message.startswith("Cloning previously run task"):
                task.update(status="completed", finished_at=now)
            elif _YIELDS.match(message):
                task["yields"] = int(_YIELDS.match(message)[1])
            else:
                return
            self._dirty = True
            due = time.monotonic() - self._flushed >= FLUSH_SECONDS
        if due:  # the first change after a quiet spell is shown at once; a burst waits for the flusher
            self.flush()

    def _new(self, pathspec: str, step: str, now: int) -> dict[str, Any]:
        index = sum(1 for task in self._tasks.values() if task["step_name"] == step)
        foreach = [f"item {index}"] if self.graph["steps"][step]["inside_foreach"] else []
        return {
            "pathspec": pathspec,
            "step_name": step,
            "attempt": 0,
            "status": "running",
            "started_at": now,
            "finished_at": None,
            "foreach": foreach,
        }

    def tasks(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(task) for task in self._tasks.values()]

    def flush(self) -> None:
        """Tell ``changed`` if anything changed since the last time."""
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            self._flushed = time.monotonic()
        self._changed(self.tasks())

    @contextmanager
    def watching(self) -> Iterator[None]:
        """While the block runs, every line written to ``sys.stdout`` (where the Runner streams the run's
        output, from its threads) is also read here, and ``changed`` is told every ``FLUSH_SECONDS``."""
        shown = sys.stdout
        tap = _Tap(shown, self.feed)
        stop = threading.Event()

        def flushing() -> None:
            while not stop.wait(FLUSH_SECONDS):
                self.flush()

        flusher = threading.Thread(target=flushing, name="mf-notebook-progress", daemon=True)
        sys.stdout = tap
        flusher.start()
        try:
            yield
        finally:
            sys.stdout = shown
            stop.set()
            flusher.join()
            tap.close()
            self.flush()


class _Tap:
    """``sys.stdout`` as it was, each whole line also handed to ``feed``."""

    def __init__(self, shown: Any, feed: Callable[[str], None]) -> None:
        self._shown = shown
        self._feed = feed
        self._partial = ""

    def write(self, text: str) -> int:
        written = self._shown.write(text)
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._feed(line)
        return written

    def close(self) -> None:
        if self._partial:
            self._feed(self._partial)
            self._partial = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shown, name)
