"""A worker's own fork server of one slot, for a worker that must not, or cannot, fork its tasks itself.

A Ray actor has threads (Ray's), and a process with threads must not fork.
A Redis worker on this machine runs the runtime's interpreter (it needs
redis-py) where a step with an environment of its own (``@pypi``,
``@conda``) must run under that environment's. Either hands each task to
a ``LocalPool`` of one slot (under the step's ``Interpreter`` where it has
one) exactly as a trampoline does, with pipes of its own for the task's
stdout and stderr: ``Slot.submit`` starts the task, and its ``Running``
gives what the task writes as it comes, then its exit status. Cancelling
closes the connection, and the fork server kills the task as it kills any
task whose trampoline went away (SIGTERM, SIGKILL after its grace).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time

from metaflow_stack.errors import StackError
from metaflow_stack.pool import trampoline
from metaflow_stack.pool.child import DRAIN_S, Task
from metaflow_stack.pool.local import Interpreter, LocalPool, python_of


class Running:
    """One task handed to a slot: its stdout and stderr pipes (by descriptor: 1 or 2) and its connection,
    on which the fork server answers its exit status."""

    def __init__(self, connection: socket.socket, streams: dict[int, int]) -> None:
        self.connection, self.streams = connection, streams
        self.reply = b""
        self.lost = False  # the connection closed with no status: cancelled, or the fork server died
        self.drained_by: float | None = None

    @property
    def status(self) -> int | None:
        """The task's exit status, once the fork server said it."""
        return int(self.reply.split()[0]) if self.reply.endswith(b"\n") else None

    @property
    def ended(self) -> bool:
        """Whether nothing more will come: the status and all output read, or the connection lost."""
        return self.lost or (self.status is not None and not self.streams)

    def read(self, timeout: float | None) -> list[tuple[int, bytes]]:
        """What the task wrote within ``timeout`` seconds (None: until something comes), as ``(1 or 2,
        data)``; reads the status too when it comes. After the status, its output has ``DRAIN_S`` to close:
        something the task left running could otherwise hold it open forever."""
        now = time.monotonic()
        if self.status is not None and self.drained_by is None:
            self.drained_by = now + DRAIN_S
        waiting = [*self.streams] if self.drained_by else [*self.streams, self.connection]
        if self.drained_by is not None:
            left = max(self.drained_by - now, 0)
            timeout = left if timeout is None else min(timeout, left)
        ready = select.select(waiting, [], [], timeout)[0]
        pieces = []
        for fd in ready:
            if fd is self.connection:
                chunk = self.connection.recv(64)
                self.reply += chunk
                self.lost = not chunk
            elif data := os.read(fd, 65536):
                pieces.append((self.streams[fd], data))
            else:
                os.close(fd)
                del self.streams[fd]
        if self.drained_by is not None and time.monotonic() >= self.drained_by:
            self._close_streams()  # (whatever still writes into them: a process the task left running)
        return pieces

    def cancel(self) -> None:
        """Have the fork server kill the task (whether it has started yet or not)."""
        with contextlib.suppress(OSError):  # ended meanwhile
            self.connection.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._close_streams()
        self.connection.close()

    def _close_streams(self) -> None:
        for fd in self.streams:
            os.close(fd)
        self.streams.clear()


class Slot:
    """A fork server of one slot, started by ``start`` and again by whoever finds it dead (``alive``)."""

    def __init__(self, flow_file: str, name: str, parent: str | None, interpreter: Interpreter | None) -> None:
        self.flow_file, self.name, self.parent, self.interpreter = flow_file, name, parent, interpreter
        self.pool: LocalPool | None = None
        self.address = ""

    def start(self) -> str | None:
        """Start the fork server and wait until it is warm; why not, if it cannot start."""
        self.pool = LocalPool(self.flow_file, 1, self.name, self.parent, self.interpreter)
        try:
            self.pool.start()
            self.address = str(self.pool.address())
        except StackError as exc:
            return exc.message
        except OSError as exc:  # (its interpreter gone, say)
            self.pool.stop()
            return f"could not start {python_of(self.interpreter)}: {exc}"
        return None

    def alive(self) -> bool:
        return self.pool is not None and self.pool.alive()

    def revive(self) -> str | None:
        """Start the fork server again if it died (out of memory, say); why not, if it cannot."""
        if self.alive():
            return None
        self.stop()
        return self.start()

    def submit(self, task: Task, env: dict[str, str]) -> Running:
        """Hand ``task`` over with ``env`` as its environment, under the fork server's interpreter (the
        caller checked that it is the one the task asked for)."""
        request = trampoline.encode(python_of(self.interpreter), task.argv, env, task.cwd)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(self.address)
            sent = socket.send_fds(connection, [request], [out_write, err_write])
            connection.sendall(request[sent:])
        except OSError:
            for fd in (out_read, err_read):
                os.close(fd)
            connection.close()
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        return Running(connection, {out_read: 1, err_read: 2})

    def stop(self) -> None:
        """Stop the fork server, its task and its folder."""
        if self.pool is not None:
            self.pool.stop()
