"""The one interface every pool backend offers the ``@worker_pool`` decorator."""

from __future__ import annotations

from typing import Protocol

from metaflow_stack.pool.counts import Counts


class Pool(Protocol):
    """A pool of warm workers for one step of one run."""

    def start(self) -> None:
        """Start the workers (or reach them); raise ``StackError`` naming the fix when they cannot start."""

    def alive(self) -> bool:
        """Whether the workers can still take tasks (a pool that died is started again for the next attempt)."""

    def command(self, entrypoint: list[str]) -> list[str]:
        """The command line that runs a task's ``entrypoint ...`` on the pool instead of in a new interpreter."""

    def counts(self) -> Counts:
        """What the pool is doing now, for the run's progress display."""

    def stop(self) -> None:
        """Stop the workers and kill what still runs; leave nothing behind. Safe to call twice."""
