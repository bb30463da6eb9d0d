"""The ``redis`` backend: tasks through a Redis queue to warm workers that claim one at a time.

On this machine (``backend="redis"``) the run's runtime starts the
dispatcher and ``size`` workers itself; the ``kubernetes`` backend runs the
same workers as pods. Redis must answer first: a pool that cannot reach it
fails the step at its first task, in one line naming the fix.
"""

from __future__ import annotations

import contextlib

import redis

from metaflow_stack.errors import StackError
from metaflow_stack.pool.counts import Counts
from metaflow_stack.pool.local import trampoline_command
from metaflow_stack.pool.processes import PoolFolder, PoolProcess, stop_all

DISPATCHER = "from metaflow_stack.pool.dispatcher import main; main()"
WORKER = "from metaflow_stack.pool.redis_worker import main; main()"
#: Where the pool looks for Redis when neither ``redis_url=`` nor the variable says.
DEFAULT_URL = "redis://127.0.0.1:6379/0"
URL_VARIABLE = "METAFLOW_STACK_POOL_REDIS_URL"


class RedisPool:
    """A dispatcher for the run's tasks and ``size`` workers on this machine, sharing one Redis queue."""

    def __init__(self, flow_file: str, size: int, name: str, url: str, prefix: str) -> None:
        self.flow_file, self.size, self.name, self.url, self.prefix = flow_file, size, name, url, prefix
        self.folder: PoolFolder | None = None
        self.dispatcher: PoolProcess | None = None
        self.workers: list[PoolProcess] = []

    def start(self) -> None:
        self.folder = PoolFolder()
        logs = self.folder.path
        self.dispatcher = PoolProcess(
            DISPATCHER, [str(self.folder.address), self.url, self.prefix], logs / "dispatcher.log"
        )
        self.workers = [
            PoolProcess(
                WORKER, [self.url, self.prefix, self.flow_file, f"{self.name}/{slot}"], logs / f"worker{slot}.log"
            )
            for slot in range(self.size)
        ]

    def alive(self) -> bool:
        return self.dispatcher is not None and self.dispatcher.alive()

    def command(self, entrypoint: list[str]) -> list[str]:
        assert self.dispatcher is not None and self.folder is not None
        try:
            self.dispatcher.wait_ready(f"the worker pool could not reach Redis at {self.url}")
        except StackError as exc:
            self.stop()
            raise StackError(exc.message, fix=f"start Redis (just up --with redis) or set {URL_VARIABLE}") from None
        return trampoline_command(self.folder.address, entrypoint)

    def counts(self) -> Counts:
        return self.folder.counts() if self.folder else Counts()

    def stop(self) -> None:
        # The dispatcher first: it cancels what is in flight (the workers kill those tasks) and removes the keys.
        if self.dispatcher is not None:
            self.dispatcher.stop()
        stop_all(self.workers)
        if self.dispatcher is not None:
            # Whatever a worker still wrote after the dispatcher's purge (it ended only after its stdin closed).
            client = redis.Redis.from_url(self.url)
            with contextlib.suppress(redis.RedisError):
                for key in client.scan_iter(match=self.prefix + "*", count=1000):
                    client.delete(key)
            client.close()
            self.dispatcher = None
        if self.folder is not None:
            self.folder.remove()
            self.folder = None
