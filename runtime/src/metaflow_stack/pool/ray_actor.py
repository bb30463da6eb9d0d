"""The Ray backend's worker: a Ray actor holding a warm fork server of its own, one task at a time.

A Ray worker process runs threads (Ray's own), and a process with threads
must not fork, so the actor hands each task to a fork server of one slot
(``slot``) and streams back what the task writes as it comes, then its exit
status. ``cancel`` (called while ``run`` runs: the actor takes two calls at
once) has the fork server kill the task. The actor dying (a node lost, a
process killed) ends the fork server and its task with it; the fork
server's folder is under the pool's own when Ray runs on the runtime's
machine, so it goes with the pool's even then.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from metaflow_stack.pool.child import Task
from metaflow_stack.pool.local import Interpreter
from metaflow_stack.pool.slot import Running, Slot

#: Variables Ray sets in an actor for the accelerators and threads it gave it: a task gets them over its
#: own environment, so each item uses its actor's GPU, not every GPU of the node.
RAY_ASSIGNED = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "NEURON_RT_VISIBLE_CORES")
RAY_ASSIGNED += ("TPU_VISIBLE_CHIPS", "ONEAPI_DEVICE_SELECTOR", "OMP_NUM_THREADS")


class PoolActor:
    """One worker of a Ray pool (made a Ray actor by ``ray_dispatch``); its fork server runs ``interpreter``
    where the step has an environment of its own."""

    def __init__(self, flow_file: str, name: str, parent: str | None, interpreter: Interpreter | None = None) -> None:
        self.slot = Slot(flow_file, name, parent, interpreter)
        self.running: dict[str, Running] = {}  # by the dispatcher's token
        self.cancelled: set[str] = set()
        self.error = self.slot.start()  # (``ready`` tells: an actor whose constructor raised would restart forever)

    def ready(self) -> str | None:
        """None once warm, or why it cannot run tasks."""
        return self.error

    def run(self, task: Task, token: str) -> Iterator[tuple[int, bytes] | int]:
        """Run ``task``: ``(fd, data)`` for what it writes to stdout (1) or stderr (2), then its exit status
        (none if it was cancelled, see ``cancel``)."""
        if error := self.slot.revive():
            yield 2, f"worker pool: this Ray worker's fork server could not start again: {error}\n".encode()
            yield 1
            return
        if token in self.cancelled:  # cancelled before it started
            self.cancelled.discard(token)
            return
        env = {**task.env, **{name: os.environ[name] for name in RAY_ASSIGNED if name in os.environ}}
        running = self.slot.submit(task, env)
        self.running[token] = running
        try:
            if token in self.cancelled:  # cancelled while it was handed over
                return
            while not running.ended:
                for piece in running.read(None):  # noqa: UP028 (not yield from: Ray sends into the generator)
                    yield piece
            if running.status is not None:
                yield running.status
        finally:
            running.close()
            self.running.pop(token, None)
            self.cancelled.discard(token)

    def cancel(self, token: str) -> None:
        """Kill the task of the run ``token`` names, whether it runs yet or not."""
        self.cancelled.add(token)
        running = self.running.get(token)
        if running is not None:
            running.cancel()

    def stop(self) -> None:
        """Stop the fork server, its task and its folder (Ray kills an actor's children outright when it
        kills the actor)."""
        self.slot.stop()
