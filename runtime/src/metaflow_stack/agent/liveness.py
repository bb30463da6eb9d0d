"""Whether an unfinished local run or task is still alive, or was killed.

Metaflow's local metadata has no heartbeats: a run whose process was
SIGKILLed, or whose machine rebooted, leaves tasks without an outcome that
would read as ``running`` forever. Metaflow's runtime starts every task as a
process whose command line carries ``--run-id R --task-id T`` (the ``step``
and ``init`` commands; compute decorators keep that process waiting on the
remote task), so a task is alive while such a process exists on this
machine. Files that changed within ``stale_after_s`` also count as alive: a
task whose process is still starting, a run between two steps, or a
datastore written from another machine, whose processes cannot be seen from
here. Anything else without an outcome was killed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import psutil

#: Seconds without a process or a file change before an unfinished task counts as killed.
STALE_AFTER_S = 30.0
#: Seconds one look at the process table is reused (a runs page asks for many runs at once).
_PROCESSES_TTL_S = 1.0


def _option(cmdline: list[str], name: str) -> str | None:
    """The value of ``name`` in a command line (``--name V`` or ``--name=V``)."""
    for i, word in enumerate(cmdline):
        if word == name and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if word.startswith(f"{name}="):
            return word.partition("=")[2]
    return None


class Liveness:
    """Tells live runs and tasks from killed ones, by this machine's processes and recent file changes."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self.stale_after_s = stale_after_s
        self._looked_at = float("-inf")
        self._runs: set[str] = set()
        self._tasks: set[tuple[str, str]] = set()

    def _look(self) -> None:
        """The run and task ids of Metaflow task processes now running here (reused for a second)."""
        if time.monotonic() - self._looked_at < _PROCESSES_TTL_S:
            return
        runs, tasks = set(), set()
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info.get("cmdline") or []
            run = _option(cmdline, "--run-id")
            if run is None:
                continue
            runs.add(run)
            task = _option(cmdline, "--task-id")
            if task is not None:
                tasks.add((run, task))
        self._runs, self._tasks, self._looked_at = runs, tasks, time.monotonic()

    def _changed_lately(self, folders: Iterable[Path]) -> bool:
        """Whether any of ``folders`` (or their ``_meta``) gained or lost a file within the window."""
        since = time.time() - self.stale_after_s
        for folder in folders:
            for path in (folder, folder / "_meta"):
                try:
                    if path.stat().st_mtime >= since:
                        return True
                except FileNotFoundError:
                    continue
        return False

    def task_alive(self, task: Path) -> bool:
        """Whether the task in ``task`` (``<run>/<step>/<task>``) may still report an outcome."""
        self._look()
        return (task.parent.parent.name, task.name) in self._tasks or self._changed_lately([task])

    def run_alive(self, run: Path, tasks: Iterable[Path]) -> bool:
        """Whether the run in ``run`` may still start or finish tasks (checked once none of ``tasks`` runs)."""
        self._look()
        return run.name in self._runs or self._changed_lately([run, *tasks])
