"""Redis pools whose workers a cluster runs (the ``kubernetes`` backend's pods, the ``nomad`` backend's
job): their one life cycle, which each backend fills in with its cluster's calls.

When the run starts the workers are rendered (a bad setting fails the run
before anything starts), the dispatcher is started, and once it has reached
Redis the workers are handed to the cluster (``place``). The first item
waits until they are warm (``wait_workers``), and a pool whose workers
cannot start fails the step there, in one line with the cluster's reason.
Stopping the pool stops the dispatcher, which removes the workers as it
stops (however the run ends: its pipe from the runtime closes even when the
runtime is killed outright); the runtime removes them again in case it
could not (``remove``: finding none is no error).
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from metaflow_stack.errors import StackError
from metaflow_stack.pool import redis_user
from metaflow_stack.pool.processes import PoolProcess
from metaflow_stack.pool.redis_pool import RedisPool
from metaflow_stack.pool.redis_queue import private, readable
from metaflow_stack.pool.redis_user import USER_VARIABLE, PoolUser

#: Seconds a cluster's workers have to be placed, pull their image, start and import the flow before the
#: step fails.
READY_TIMEOUT_S = 300
#: How often the workers are looked at while the first item waits for them (at most).
POLL_S = 2.0


class ClusterPool(RedisPool, ABC):
    """A dispatcher here and ``size`` workers on a cluster, sharing one Redis queue."""

    #: What the workers are, in the errors: "pods", "Nomad workers".
    workers_kind: ClassVar[str]

    def __init__(self, flow_file: str, size: int, name: str, url: str, prefix: str) -> None:
        super().__init__(flow_file, size, name, url, prefix)
        self.placed = False
        self.warm = False
        self.user: PoolUser | None = PoolUser(self.workers_name, prefix)  # (None: a Redis that takes none)
        self.env[USER_VARIABLE] = self.user.to_json()  # (the dispatcher's: it makes the user again, removes it)

    @abstractmethod
    def render(self) -> Any:
        """What the cluster is given for the workers, checked (``StackError`` for a bad setting)."""

    @abstractmethod
    def place(self, rendered: Any) -> None:
        """Hand the workers to the cluster."""

    @abstractmethod
    def wait_workers(self) -> None:
        """Until the workers are warm; ``StackError`` with the cluster's reason if they cannot start."""

    @abstractmethod
    def remove(self) -> None:
        """Remove whatever of the workers reached the cluster, and say it if that fails (stopping goes on)."""

    @abstractmethod
    def advice(self) -> str:
        """How to see why the workers did not start."""

    def workers_url(self, variable: str) -> str:
        """The queue's URL for the workers: the Redis at ``variable`` where they reach it at another
        address, else the run's, as the pool's own user (``redis_user``) where Redis takes one."""
        url = private(readable(os.environ.get(variable) or self.url))
        return self.user.url(url) if self.user is not None else url

    def start(self) -> None:
        """Render the workers, start the dispatcher, make the pool's Redis user and place the workers once
        it answers (Redis must, before anything reaches the cluster): a bad setting or no Redis fails the
        run here."""
        rendered = self.render()
        super().start()
        try:
            self.wait_dispatcher()
            self.placed = True  # (from here on, stopping removes whatever of it reached the cluster)
            if self.user is not None and (refused := self.user.make(self.url)):
                self.user, rendered = None, None
                print(
                    f"worker pool: this Redis takes no user of the pool's own ({refused}): the {self.workers_kind} "
                    "connect with the run's URL, which reaches every pool's keys there",
                    file=sys.stderr,
                    flush=True,
                )
            self.place(rendered or self.render())
        except StackError:
            self.stop()
            raise

    def start_workers(self) -> list[PoolProcess]:
        return []  # started by the cluster

    def command(self, entrypoint: list[str]) -> list[str]:
        line = super().command(entrypoint)
        if not self.warm:
            try:
                self.wait_workers()
            except StackError as exc:
                self.stop()
                raise StackError(
                    f"the pool's {self.workers_kind} did not become ready: {exc.message}", fix=exc.fix or self.advice()
                ) from None
            self.warm = True
        return line

    def release(self) -> None:
        # The dispatcher removed the workers as it stopped; if it could not (it was killed), this does (else it
        # finds none), before the keys are swept.
        self.warm = False
        if self.placed:
            self.placed = False
            self.remove()
            if self.user is not None:
                redis_user.remove(self.url, self.user.name)
