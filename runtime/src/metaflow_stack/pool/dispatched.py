"""Pools whose tasks go through a dispatcher process (``dispatcher``): the Redis and Ray backends.

The run's runtime starts the dispatcher (and, for Redis on this machine,
the workers) with the step's pool; the first task waits until they are
ready, and a pool that cannot start fails the step there, in one line
naming the fix.
"""

from __future__ import annotations

from typing import ClassVar

from metaflow_stack.errors import StackError
from metaflow_stack.pool.counts import Counts
from metaflow_stack.pool.local import trampoline_command
from metaflow_stack.pool.processes import PoolFolder, PoolProcess, stop_all

DISPATCHER = "from metaflow_stack.pool.dispatcher import main; main()"


class DispatchedPool:
    """A dispatcher for the run's tasks, and the workers the runtime starts beside it (``start_workers``)."""

    #: The backend's name, the dispatcher's first argument.
    backend: ClassVar[str]
    #: What to do when the pool cannot start.
    fix: ClassVar[str]
    #: How long the dispatcher has to clean up when it stops.
    stop_timeout_s: ClassVar[float] = 30

    def __init__(
        self, flow_file: str, size: int, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.flow_file, self.size, self.name, self.args, self.env = flow_file, size, name, args, env
        self.folder: PoolFolder | None = None
        self.dispatcher: PoolProcess | None = None
        self.workers: list[PoolProcess] = []

    def start(self) -> None:
        self.folder = PoolFolder()
        args = [self.backend, str(self.folder.address), *self.args]
        self.dispatcher = PoolProcess(DISPATCHER, args, self.folder.path / "dispatcher.log", self.env)
        self.workers = self.start_workers()

    def start_workers(self) -> list[PoolProcess]:
        """Workers on this machine, if the backend's run here (none: they are started elsewhere)."""
        return []

    def alive(self) -> bool:
        workers = not self.workers or any(worker.alive() for worker in self.workers)
        return self.dispatcher is not None and self.dispatcher.alive() and workers

    def wait_dispatcher(self) -> None:
        """Block until the dispatcher answers; ``StackError`` with its own fix, if it said one, or the
        backend's."""
        assert self.dispatcher is not None
        try:
            self.dispatcher.wait_ready(f"the {self.backend} worker pool did not start")
        except StackError as exc:
            message, said, fix = exc.message.rpartition(" (fix: ")
            raise (StackError(message, fix.removesuffix(")")) if said else StackError(exc.message, self.fix)) from None

    def command(self, entrypoint: list[str]) -> list[str]:
        assert self.dispatcher is not None and self.folder is not None
        try:
            self.wait_dispatcher()
            for worker in self.workers:
                worker.wait_ready(f"a {self.backend} pool worker could not import {self.flow_file}")
        except StackError:
            self.stop()
            raise
        return trampoline_command(self.folder.address, self.dispatcher.pid, entrypoint)

    def counts(self) -> Counts:
        return self.folder.counts() if self.folder else Counts()

    def stop(self) -> None:
        # The dispatcher first: it stops what is in flight and cleans up its backend, then the workers.
        if self.dispatcher is not None:
            self.dispatcher.stop(self.stop_timeout_s)
        stop_all(self.workers)
        self.dispatcher, self.workers = None, []
        if self.folder is not None:
            self.folder.remove()
            self.folder = None
