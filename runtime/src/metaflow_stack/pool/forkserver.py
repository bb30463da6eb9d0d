"""The local pool: one warm process that forks a child per task.

It imports Metaflow, the flow's file and what a task needs once; each task
handed over by a trampoline runs in a child forked from it, so a task pays
for no interpreter start and no imports, and still runs in a process of its
own: Metaflow's own ``step`` command, with the task's arguments,
environment and working folder, writing into the trampoline's stdout and
stderr. What one task does to its process (globals, monkeypatching, a
crash) dies with its child; at most ``size`` children run at once, the rest
wait in arrival order.

Single-threaded on purpose (a process with threads must not fork): one
selector watches the listening socket, each running task's trampoline
connection (closed: its task is killed), a socket SIGCHLD writes to (a
child exited: its status goes back) and the launching runtime's pipe
(closed: the pool stops).

    python -c "from metaflow_stack.pool.forkserver import main; main()" ADDRESS FLOW_FILE SIZE NAME

Started with ``-c``, not ``-m``, so that ``__main__`` is a bare module as in
``python flow.py``: each task runs the flow's file in it, beside what
Metaflow puts there for pickling (its ``ForeachFrame``).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaflow_stack.pool import handover, trampoline
from metaflow_stack.pool.child import Task, fork_task, on_this_machine, warm, with_group
from metaflow_stack.pool.counts import Counts, CountsFile
from metaflow_stack.pool.processes import say_ready

#: How long a killed task's process group has to end after SIGTERM before SIGKILL.
KILL_GRACE_S = 5.0
#: The contained server's lifeline, beside its socket: the runtime's connection (closed: the pool stops).
LIFELINE = "lifeline.sock"
#: In a contained pool's task: the names of the task's variables the sandbox passes on (comma-separated).
PASSED_VARIABLE = "METAFLOW_STACK_POOL_PASSED"


@dataclass
class Request:
    """One task handed over by a trampoline, with its connection and its stdout/stderr."""

    connection: socket.socket
    task: Task
    fds: tuple[int, int]
    pid: int = 0
    slot: int = -1
    killed_at: float | None = None
    scratch: str | None = None  # contained: the task's own folder, removed when it ends

    def forget(self) -> None:
        """Close what the pool holds of it (its connection, its folder)."""
        self.connection.close()
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


class ForkServer:
    """The pool's event loop: accept, queue, fork up to ``size``, report, kill what was abandoned."""

    def __init__(
        self, listener: socket.socket, size: int, name: str, counts_file: Path, parent: Any = sys.stdin
    ) -> None:
        self.listener, self.size, self.name, self.parent = listener, size, name, parent
        self.flow_file: str | None = None  # contained: the tasks run this copy of the flow, on this side
        self.selector = selectors.DefaultSelector()
        self.waiting: list[Request] = []
        self.running: dict[int, Request] = {}  # by pid
        self.free_slots = list(range(size))
        self.counts = Counts()
        self.counts_file = CountsFile(counts_file)
        self.stopping = False
        #: Whether accepting fails now (out of descriptors, say): said once while it lasts.
        self.cannot_accept = False
        # SIGCHLD wakes the selector through this pair (portable, unlike pidfds).
        self.wakeup, wakeup_writer = socket.socketpair()
        self.wakeup.setblocking(False)
        wakeup_writer.setblocking(False)
        self._wakeup_writer = wakeup_writer
        signal.set_wakeup_fd(wakeup_writer.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def serve(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.parent, selectors.EVENT_READ, "parent")
        self.selector.register(self.wakeup, selectors.EVENT_READ, "exited")
        while not (self.stopping and not self.running):
            timeout = 0.5 if any(r.killed_at for r in self.running.values()) else None
            for key, _ in self.selector.select(timeout):
                if key.data == "accept":
                    self._accept()
                elif key.data == "parent":
                    if not os.read(self.parent.fileno(), 4096):
                        self._stop()
                elif key.data == "exited":
                    with contextlib.suppress(BlockingIOError):
                        self.wakeup.recv(4096)
                    self._reap()
                else:
                    self._abandoned(key.data)
            self._escalate()

    def _accept(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError as exc:  # out of descriptors, say: the trampoline waits in the backlog
            if not self.cannot_accept:
                print(f"worker pool {self.name}: cannot accept now: {exc}", file=sys.stderr, flush=True)
            self.cannot_accept = True
            time.sleep(0.1)  # (the listener stays readable meanwhile: without a pause this loop would spin)
            return
        self.cannot_accept = False
        fds: tuple[int, ...] = ()
        scratch = None
        try:
            task, fds = handover.receive(connection)
            if self.flow_file is not None:  # contained: the sandbox's terms, a folder of the task's own
                scratch = tempfile.mkdtemp(prefix="mf-task-")
                passed = task.env.get(PASSED_VARIABLE, "").split(",")
                task = on_this_machine(task, self.flow_file, scratch, passed)
            request = Request(connection, task, fds, scratch=scratch)
        except (OSError, ValueError) as exc:
            print(f"worker pool {self.name}: refused a request: {exc}", file=sys.stderr, flush=True)
            for fd in fds:  # (the task's stdout and stderr, received before what failed)
                os.close(fd)
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            connection.close()
            return
        self.waiting.append(request)
        self.counts.queued += 1
        self._start_waiting()

    def _start_waiting(self) -> None:
        while self.waiting and self.free_slots and not self.stopping:
            request = self.waiting.pop(0)
            request.slot = self.free_slots.pop(0)
            try:
                pid = fork_task(request.task, request.fds, f"{self.name}/{request.slot}")
            except OSError as exc:  # no process to be had: this attempt fails, the pool goes on
                with contextlib.suppress(OSError):
                    os.write(request.fds[1], f"worker pool: cannot start the task: {exc}\n".encode())
                    request.connection.sendall(trampoline.reply(1))
                self._release(request)
                continue
            for fd in request.fds:
                os.close(fd)
            request.pid = pid
            self.running[pid] = request
            self.selector.register(request.connection, selectors.EVENT_READ, pid)
            self.counts.queued -= 1
            self.counts.running += 1
        self._write_counts()

    def _release(self, request: Request) -> None:
        """A request that never ran: its descriptors, connection and slot given back."""
        for fd in request.fds:
            os.close(fd)
        request.forget()
        self.free_slots.append(request.slot)
        self.counts.queued -= 1
        self.counts.failed += 1

    def _reap(self) -> None:
        """Every child that has exited: its status to its trampoline, its slot to the next task."""
        while self.running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            request = self.running.pop(pid, None)
            if request is None:
                continue
            if request.killed_at is None:
                self.selector.unregister(request.connection)
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):  # a trampoline gone: the runtime counts the attempt failed already
                request.connection.sendall(trampoline.reply(code))
            request.forget()
            self.free_slots.append(request.slot)
            self.counts.running -= 1
            self.counts.done += code == 0
            self.counts.failed += code != 0
        self._start_waiting()

    def _abandoned(self, pid: int) -> None:
        """A running task's trampoline closed its connection (killed by the runtime): kill the task."""
        request = self.running.get(pid)  # None: reaped earlier in the same round of events
        if request is not None and request.killed_at is None:
            self.selector.unregister(request.connection)
            self._kill(request)

    def _kill(self, request: Request) -> None:
        request.killed_at = time.monotonic()
        with_group(request.pid, signal.SIGTERM)

    def _escalate(self) -> None:
        now = time.monotonic()
        for request in self.running.values():
            if request.killed_at is not None and now - request.killed_at > KILL_GRACE_S:
                with_group(request.pid, signal.SIGKILL)

    def _stop(self) -> None:
        """The runtime is gone or done: refuse what waits, kill what runs, end when all are reaped."""
        self.stopping = True
        self.selector.unregister(self.listener)
        self.selector.unregister(self.parent)
        for request in self.waiting:
            request.forget()
            for fd in request.fds:
                os.close(fd)
        self.waiting.clear()
        for request in self.running.values():
            if request.killed_at is None:
                self.selector.unregister(request.connection)
                self._kill(request)

    def kill_all(self) -> None:
        """Whatever still runs, killed outright: the server is ending and must leave no task behind."""
        for request in self.running.values():
            with_group(request.pid, signal.SIGKILL)

    def _write_counts(self) -> None:
        self.counts_file.write(self.counts)


def main() -> None:
    """``ADDRESS FLOW_FILE SIZE NAME [--contained]``. Contained (in a container of a ``@devcontainer``
    pool), the runtime is no parent: its lifeline is a connection on ``LIFELINE`` in the socket's folder,
    told ``ready`` once the flow is imported, and each task runs on this side's terms (``on_this_machine``:
    this copy of the flow, this interpreter and environment under the task's own variables)."""
    address, flow_file, size, name, *flags = sys.argv[1:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runtime, which stops the pool
    contained = "--contained" in flags
    if contained:  # listening before the (slow) warm-up: the runtime connects as soon as the file is there
        lifeline = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lifeline.bind(str(Path(address).with_name(LIFELINE)))
        lifeline.listen(1)
    warm(flow_file)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1024)
    parent: Any = sys.stdin
    if contained:
        parent, _ = lifeline.accept()
        lifeline.close()
        parent.sendall(b"ready\n")
    server = ForkServer(listener, int(size), name, Path(address).with_suffix(".counts"), parent)
    server.flow_file = flow_file if contained else None
    server._write_counts()
    say_ready()
    try:
        server.serve()
    finally:  # the folder is the pool's, the tasks are its children: nothing of either stays
        server.kill_all()
        if not contained:  # (the runtime's, mounted here: it removes it)
            shutil.rmtree(Path(address).parent, ignore_errors=True)
