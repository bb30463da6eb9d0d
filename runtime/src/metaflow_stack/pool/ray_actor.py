"""The Ray backend's worker: a Ray actor holding a warm fork server of its own, one task at a time.

A Ray worker process runs threads (Ray's own), and a process with threads
must not fork, so the actor hands each task to a fork server of one slot
(``slot``) and streams back what the task writes as it comes, in batches of
at most a tenth of a second, the last with its exit status. ``cancel``
(called while ``run`` runs: the actor takes two calls at once) has the fork
server kill the task. The actor dying (a node lost, a process killed) ends
the fork server and its task with it; the fork server's folder is under the
pool's own when Ray runs on the runtime's machine, so it goes with the
pool's even then.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from metaflow_stack.pool import trampoline
from metaflow_stack.pool.child import Task, on_this_machine
from metaflow_stack.pool.local import Interpreter
from metaflow_stack.pool.slot import Running, Slot

#: Variables Ray sets in an actor for the accelerators and threads it gave it: a task gets them over its
#: own environment, so each item uses its actor's GPU, not every GPU of the node.
RAY_ASSIGNED = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "NEURON_RT_VISIBLE_CORES")
RAY_ASSIGNED += ("TPU_VISIBLE_CHIPS", "ONEAPI_DEVICE_SELECTOR", "OMP_NUM_THREADS")
#: Seconds a task's output is gathered, from its first piece, before it is sent on (live enough for a log),
#: and the bytes that send it sooner: a flood goes in batches about the size Ray sends inline (100 KiB;
#: a batch is this plus at most one read of each pipe), not all through Ray's object store.
FLUSH_S = 0.1
FLUSH_BYTES = 32 << 10


class PoolActor:
    """One worker of a Ray pool (made a Ray actor by ``ray_dispatch``); its fork server runs ``interpreter``
    where the step has an environment of its own. On a cluster (no ``parent``), ``settings`` are the run's
    Metaflow settings, set before the fork server imports Metaflow, which reads them once, at import."""

    def __init__(
        self,
        flow_file: str,
        name: str,
        parent: str | None,
        interpreter: Interpreter | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        os.environ.update(settings or {})
        self.slot = Slot(flow_file, name, parent, interpreter)
        self.running: dict[str, Running] = {}  # by the dispatcher's token
        self.cancelled: set[str] = set()
        self.error = self.slot.start()  # (``ready`` tells: an actor whose constructor raised would restart forever)

    def ready(self) -> str | None:
        """None once warm, or why it cannot run tasks."""
        return self.error

    def run(self, task: Task, token: str) -> Iterator[tuple[list[tuple[int, bytes]], int | None]]:
        """Run ``task``: what it writes to stdout (1) or stderr (2), as ``(fd, data)`` pieces gathered for up
        to ``FLUSH_S`` from the first (or ``FLUSH_BYTES``), with None; the last with its exit status (None if it
        was cancelled while it ran; nothing at all if before; after what was gathered and why, ``POOL_LOST`` if
        its output could not be read, or its status if it had ended). Each yield is one round trip of Ray's
        stream through the dispatcher, so a short task's output and its status go as one."""
        if error := self.slot.revive():
            yield [(2, f"worker pool: this Ray worker's fork server could not start again: {error}\n".encode())], 1
            return
        if token in self.cancelled:  # cancelled before it started
            self.cancelled.discard(token)
            return
        if self.slot.parent is None:  # a cluster's node: its own environment (as Ray's tasks), the task's over it
            task = on_this_machine(task, self.slot.flow_file)
        env = {**task.env, **{name: os.environ[name] for name in RAY_ASSIGNED if name in os.environ}}
        running = self.slot.submit(task, env)
        self.running[token] = running
        try:
            if token in self.cancelled:  # cancelled while it was handed over
                return
            batch: list[tuple[int, bytes]] = []
            held, due = 0, None  # the batch's bytes; when it goes, once it holds something
            try:
                while not running.ended:
                    pieces = running.read(None if due is None else max(due - time.monotonic(), 0))
                    batch += pieces
                    held += sum(len(data) for _, data in pieces)
                    if batch and due is None:
                        due = time.monotonic() + FLUSH_S
                    if batch and (held >= FLUSH_BYTES or time.monotonic() >= due) and not running.ended:
                        yield batch, None
                        batch, held, due = [], 0, None
            except (OSError, ValueError) as exc:  # its pipes unreadable: the attempt is lost, not what it wrote
                lost = f"worker pool: this Ray worker could not read the task's output: {exc}\n"
                # (and ``close`` has the task killed; one that had ended keeps its status: not run again)
                status = trampoline.POOL_LOST if running.status is None else running.status
                yield [*batch, (2, lost.encode())], status
                return
            yield batch, running.status
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
