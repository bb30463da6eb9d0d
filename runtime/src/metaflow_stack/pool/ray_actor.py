"""The Ray backend's worker: a Ray actor holding a warm fork server of its own, one task at a time.

A Ray worker process runs threads (Ray's own), and a process with threads
must not fork, so the actor starts a local pool of one slot
(``local.LocalPool``: the fork server, single-threaded) and hands each task
to it exactly as a trampoline does, with pipes of its own for the task's
stdout and stderr. ``run`` yields what the task writes as it comes and its
exit status last; ``cancel`` (called while ``run`` runs: the actor takes
two calls at once) closes the connection, and the fork server kills the
task as it kills any task whose trampoline went away. The actor dying (a
node lost, a process killed) ends the fork server and its task with it; the
fork server's folder is under the pool's own when Ray runs on the
runtime's machine, so it goes with the pool's even then.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import time
from collections.abc import Iterator

from metaflow_stack.errors import StackError
from metaflow_stack.pool import trampoline
from metaflow_stack.pool.child import DRAIN_S, Task
from metaflow_stack.pool.local import Interpreter, LocalPool

#: Variables Ray sets in an actor for the accelerators and threads it gave it: a task gets them over its
#: own environment, so each item uses its actor's GPU, not every GPU of the node.
RAY_ASSIGNED = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "NEURON_RT_VISIBLE_CORES")
RAY_ASSIGNED += ("TPU_VISIBLE_CHIPS", "ONEAPI_DEVICE_SELECTOR", "OMP_NUM_THREADS")


class PoolActor:
    """One worker of a Ray pool (made a Ray actor by ``ray_dispatch``)."""

    def __init__(self, flow_file: str, name: str, parent: str | None, interpreter: Interpreter | None = None) -> None:
        self.flow_file, self.name, self.parent, self.interpreter = flow_file, name, parent, interpreter
        self.running: dict[str, socket.socket] = {}  # by the dispatcher's token
        self.cancelled: set[str] = set()
        self.error = self._start_pool()

    def _start_pool(self) -> str | None:
        """A fork server of one slot, warm; why not, if it cannot start (``ready`` tells: an actor whose
        constructor raised would restart forever)."""
        self.pool = LocalPool(self.flow_file, 1, self.name, self.parent, self.interpreter)
        self.pool.start()
        try:
            self.address = str(self.pool.address())
        except StackError as exc:
            return exc.message
        return None

    def ready(self) -> str | None:
        """None once warm, or why it cannot run tasks."""
        return self.error

    def run(self, task: Task, token: str) -> Iterator[tuple[int, bytes] | int]:
        """Run ``task``: ``(fd, data)`` for what it writes to stdout (1) or stderr (2), then its exit status
        (none if it was cancelled, see ``cancel``). The task runs under the fork server's interpreter, this
        node's or the step's own environment's (the dispatcher checked that it is the one the task asked
        for)."""
        if not self.pool.alive():  # its fork server died (out of memory, say): a new one for this task
            self.pool.stop()
            error = self._start_pool()
            if error:
                yield 2, f"worker pool: this Ray worker's fork server could not start again: {error}\n".encode()
                yield 1
                return
        env = {**task.env, **{name: os.environ[name] for name in RAY_ASSIGNED if name in os.environ}}
        python = self.interpreter.python if self.interpreter else sys.executable
        request = trampoline.encode(python, task.argv, env, task.cwd)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        streams, reply = {out_read: 1, err_read: 2}, b""
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.running[token] = connection
        try:
            try:
                connection.connect(self.address)
                sent = socket.send_fds(connection, [request], [out_write, err_write])
                connection.sendall(request[sent:])
            finally:
                os.close(out_write)
                os.close(err_write)
            if token in self.cancelled:  # cancelled before it started
                return
            drained_by = None
            while streams or not reply.endswith(b"\n"):
                if reply.endswith(b"\n") and drained_by is None:
                    drained_by = time.monotonic() + DRAIN_S
                waiting = [*streams] if drained_by else [*streams, connection]
                timeout = max(drained_by - time.monotonic(), 0) if drained_by else None
                ready = select.select(waiting, [], [], timeout)[0]
                if not ready:
                    break  # the task ended and something it left running holds its output open
                for fd in ready:
                    if fd is connection:
                        chunk = connection.recv(64)
                        if not chunk:  # cancelled: the fork server killed the task
                            return
                        reply += chunk
                        continue
                    data = os.read(fd, 65536)
                    if data:
                        yield streams[fd], data
                    else:
                        os.close(fd)
                        del streams[fd]
            yield int(reply.split()[0])
        finally:
            for fd in streams:
                os.close(fd)
            self.running.pop(token, None)
            self.cancelled.discard(token)
            connection.close()

    def cancel(self, token: str) -> None:
        """Kill the task of the run ``token`` names, whether it runs yet or not (the fork server kills a task
        whose connection closes)."""
        self.cancelled.add(token)
        connection = self.running.get(token)
        if connection is not None:
            with contextlib.suppress(OSError):  # not connected yet (it checks the mark), or ended meanwhile
                connection.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Stop the fork server, its task and its folder (Ray kills an actor's children outright when it
        kills the actor)."""
        self.pool.stop()
