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
from collections.abc import Iterator

from metaflow_stack.errors import StackError
from metaflow_stack.pool import trampoline
from metaflow_stack.pool.child import Task
from metaflow_stack.pool.local import LocalPool

#: After a task's exit status: how long its output may take to close (a process it left could hold it).
DRAIN_S = 1.0


class PoolActor:
    """One worker of a Ray pool (made a Ray actor by ``ray_dispatch``)."""

    def __init__(self, flow_file: str, name: str, parent: str | None) -> None:
        self.pool = LocalPool(flow_file, 1, name, parent)
        self.pool.start()
        self.connection: socket.socket | None = None
        try:
            self.address = str(self.pool.address())
            self.error: str | None = None
        except StackError as exc:  # told by ``ready``: an actor whose constructor raised would restart forever
            self.error = exc.message

    def ready(self) -> str | None:
        """None once warm, or why it cannot run tasks."""
        return self.error

    def run(self, task: Task) -> Iterator[tuple[int, bytes] | int]:
        """Run ``task``: ``(fd, data)`` for what it writes to stdout (1) or stderr (2), then its exit status
        (none if it was cancelled). The task runs under this node's interpreter (the dispatcher checked
        that the runtime's is the one the task asked for)."""
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        self.connection = connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(self.address)
            request = trampoline.encode(sys.executable, task.argv, task.env, task.cwd)
            sent = socket.send_fds(connection, [request], [out_write, err_write])
            connection.sendall(request[sent:])
        finally:
            os.close(out_write)
            os.close(err_write)
        streams, reply = {out_read: 1, err_read: 2}, b""
        try:
            while streams or not reply.endswith(b"\n"):
                ended = reply.endswith(b"\n")
                ready = select.select(
                    [*streams] if ended else [*streams, connection], [], [], DRAIN_S if ended else None
                )
                if not ready[0]:
                    break  # the task ended and something it left running holds its output open
                for fd in ready[0]:
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
            self.connection = None
            connection.close()

    def stop(self) -> None:
        """Stop the fork server, its task and its folder (Ray kills an actor's children outright when it
        kills the actor)."""
        self.pool.stop()

    def cancel(self) -> None:
        """Kill the task ``run`` runs, if any."""
        connection = self.connection
        if connection is not None:
            with contextlib.suppress(OSError):  # it ended meanwhile
                connection.shutdown(socket.SHUT_RDWR)
