"""The run's view of its pools: items done, running, queued and failed, per pool.

On a terminal, a rich progress bar per pool below Metaflow's own lines; in
a log (CI, a notebook's captured output), one line per pool whenever its
counts changed, at most every ``LINE_EVERY_S``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from metaflow_stack.pool.counts import Counts

#: How often the counts are read.
POLL_S = 0.5
#: Without a terminal: the shortest time between two lines about one pool.
LINE_EVERY_S = 10.0


@dataclass
class _Watched:
    label: str
    total: int
    read: Callable[[], Counts]
    last: Counts | None = None
    said_at: float = 0.0
    bar: TaskID | None = None


def _words(counts: Counts, total: int) -> str:
    queued = max(total - counts.done - counts.running, counts.queued)
    return f"{counts.done}/{total} done, {counts.running} running, {queued} queued, {counts.failed} failed attempts"


class PoolProgress:
    """Watches the run's pools from a thread of the runtime's process until ``stop``."""

    def __init__(self, say: Callable[[str], None], terminal: bool | None = None) -> None:
        self.say = say
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.watched: list[_Watched] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.progress: Progress | None = None
        self.thread: threading.Thread | None = None

    def watch(self, label: str, total: int, read: Callable[[], Counts]) -> None:
        """Show the pool ``label`` of ``total`` items, whose counts ``read`` returns."""
        with self.lock:
            self.watched.append(_Watched(label, total, read))
        if self.thread is None:
            if self.terminal:
                self.progress = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(),
                    console=Console(file=sys.stderr),
                    redirect_stdout=True,
                    redirect_stderr=False,
                )
                self.progress.start()
            self.thread = threading.Thread(target=self._loop, name="worker-pool-progress", daemon=True)
            self.thread.start()

    def more(self, label: str, items: int) -> None:
        """``items`` more for the pool ``label`` (a nested foreach's next outer item)."""
        with self.lock:
            for pool in self.watched:
                if pool.label == label:
                    pool.total += items
                    if self.progress is not None and pool.bar is not None:
                        self.progress.update(pool.bar, total=pool.total)

    def _loop(self) -> None:
        while not self.stopped.wait(POLL_S):
            self.refresh()

    def refresh(self, final: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            for pool in self.watched:
                counts = pool.read()
                if self.progress is not None:
                    if pool.bar is None:
                        pool.bar = self.progress.add_task(pool.label, total=pool.total, detail="")
                    detail = f"{counts.running} running, {counts.failed} failed attempts"
                    self.progress.update(pool.bar, completed=counts.done, detail=detail)
                elif counts != pool.last and (final or now - pool.said_at >= LINE_EVERY_S):
                    self.say(f"worker pool {pool.label}: {_words(counts, pool.total)}")
                    pool.last, pool.said_at = counts, now

    def finish(self, label: str) -> None:
        """One last look at the pool ``label`` before it stops; the display ends with the last pool."""
        self.refresh(final=True)
        with self.lock:
            self.watched = [pool for pool in self.watched if pool.label != label]
            if self.watched:
                return
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        if self.progress is not None:
            self.progress.stop()
