"""The one interface every pool backend offers the ``@worker_pool`` decorator."""

from __future__ import annotations

from typing import Protocol

from metaflow_stack.pool.counts import Counts


class Pool(Protocol):
    """A pool of warm workers for one step of one run."""

    def start(self) -> None:
        """Start the workers without waiting for them (they warm up while the run's first steps run)."""

    def alive(self) -> bool:
        """Whether the workers can still take tasks (a pool that died is started again for the next attempt)."""

    def command(self, entrypoint: list[str]) -> list[str]:
        """The command line that runs a task's ``entrypoint ...`` on the pool instead of in a new interpreter;
        waits for the workers the first time, and raises ``StackError`` naming the fix if they cannot start."""

    def counts(self) -> Counts:
        """What the pool is doing now, for the run's progress display."""

    def stop(self) -> None:
        """Stop the workers and kill what still runs; leave nothing behind. Safe to call twice."""
