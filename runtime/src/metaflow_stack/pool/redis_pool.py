"""The ``redis`` backend: tasks through a Redis queue to warm workers that claim one at a time.

On this machine (``backend="redis"``) the run's runtime starts the
dispatcher and ``size`` workers itself. Redis must answer first: a pool
that cannot reach it fails the step at its first task, in one line naming
the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re

import redis

from metaflow_stack.pool.dispatched import DispatchedPool
from metaflow_stack.pool.local import Interpreter
from metaflow_stack.pool.processes import PoolProcess
from metaflow_stack.pool.redis_queue import URL_VARIABLE, connect

WORKER = "from metaflow_stack.pool.redis_worker import main; main()"
#: How every pool's workers elsewhere are named (``workers_name``).
WORKERS_PREFIX = "mf-pool-"


class RedisPool(DispatchedPool):
    """A dispatcher for the run's tasks and ``size`` workers on this machine, sharing one Redis queue; the
    workers run the tasks under ``interpreter`` where the step has an environment of its own."""

    backend = "redis"
    fix = f"start Redis (just up --with redis) or set {URL_VARIABLE}"

    def __init__(
        self, flow_file: str, size: int, name: str, url: str, prefix: str, interpreter: Interpreter | None = None
    ) -> None:
        args = [prefix, interpreter.python] if interpreter else [prefix]
        super().__init__(flow_file, size, name, args, env={URL_VARIABLE: url})  # (it may hold a password)
        self.url, self.prefix, self.interpreter = url, prefix, interpreter

    @property
    def workers_name(self) -> str:
        """What the pool's workers elsewhere are named by (the ``kubernetes`` backend's release, the
        ``nomad`` backend's job): the step's name in the alphabet both take, and a hash of the run and step."""
        step = re.sub(r"[^a-z0-9-]+", "-", self.name.split("@")[0].lower()).strip("-")[:24] or "step"
        return f"{WORKERS_PREFIX}{step}-{hashlib.sha256(self.prefix.encode()).hexdigest()[:10]}"

    def start_workers(self) -> list[PoolProcess]:
        assert self.folder is not None
        own = []
        if self.interpreter is not None:  # its fork servers' folders in the pool's, to go with it
            own = [f"--interpreter={json.dumps(dataclasses.asdict(self.interpreter))}", f"--folder={self.folder.path}"]
        return [
            PoolProcess(
                WORKER,
                [self.prefix, self.flow_file, f"{self.name}/{slot}", *own],
                self.folder.path / f"worker{slot}.log",
                self.env,
            )
            for slot in range(self.size)
        ]

    def release(self) -> None:
        """What the pool's workers elsewhere hold, let go once the dispatcher has stopped and before the keys
        are swept (workers still running could write some again): nothing, for workers on this machine."""

    def stop(self) -> None:
        started = self.dispatcher is not None
        super().stop()
        self.release()
        if started:  # whatever a worker still wrote after the dispatcher's purge (it ended after its stdin closed)
            client = connect(self.url)
            with contextlib.suppress(redis.RedisError):
                for key in client.scan_iter(match=self.prefix + "*", count=1000):
                    client.delete(key)
            client.close()
