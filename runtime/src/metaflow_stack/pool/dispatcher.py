"""The run's end of a pool whose workers are elsewhere (Redis workers, pods, Nomad allocations, Ray actors).

The run's runtime starts one dispatcher per pooled step. It takes the same
hand-over as the local fork server (``handover``) on a Unix socket and
passes each task to its backend's executor (``redis_dispatch``,
``kubernetes_dispatch``, ``nomad_dispatch``, ``ray_dispatch``), which runs it on a worker and hands back what the task
writes; the dispatcher writes that into the task's own stdout and stderr
and answers its exit status. A worker lost mid-task fails that attempt with
the trampoline's ``POOL_LOST`` status, which ``@retry`` retries; a
trampoline that goes away has its task killed. When the runtime's pipe
closes, it stops what is in flight and lets the executor clean up.

    python -c "from metaflow_stack.pool.dispatcher import main; main()" BACKEND ADDRESS ARGS...
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import shutil
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from metaflow_stack.errors import StackError
from metaflow_stack.pool import handover, trampoline
from metaflow_stack.pool.child import Task, other_interpreter
from metaflow_stack.pool.counts import Counts, CountsFile
from metaflow_stack.pool.processes import say_ready

#: Writes one piece of a task's output to its stdout (1) or stderr (2).
Output = Callable[[int, bytes], Awaitable[None]]
#: Once the run is over: how long the tasks in flight have to end after they are cancelled (a Redis round
#: trip or two each), before the pool is closed without them (asyncio.run cancels them again as it ends).
CANCEL_S = 10.0


class Executor(Protocol):
    """A backend's way of running tasks on its workers, under the interpreter ``python`` (the runtime's, or
    a step's own environment's), which a task must ask for."""

    python: str

    async def run(self, task: Task, output: Output, abandoned: asyncio.Future) -> int | None:
        """Run ``task`` on a worker, passing what it writes to ``output``; its exit status (the trampoline's
        ``POOL_LOST`` if the worker was lost), or None if it ended with no status (``abandoned``: its
        trampoline went away, and the task was killed). Cancelled when the pool stops."""

    async def queued(self) -> int:
        """How many tasks wait for a worker."""

    async def close(self) -> None:
        """The pool is stopping, nothing is in flight any more: leave nothing behind."""


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd``: a write a signal interrupts returns having written only part."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Dispatcher:
    def __init__(self, listener: socket.socket, executor: Executor, counts_file: Path) -> None:
        self.listener, self.executor, self.counts_file = listener, executor, CountsFile(counts_file)
        self.in_flight: set[asyncio.Task] = set()
        self.counts = Counts()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        parent = asyncio.ensure_future(loop.run_in_executor(None, sys.stdin.buffer.read))
        accepting = asyncio.ensure_future(self._accept_forever())
        counting = asyncio.ensure_future(self._count_forever())
        await parent  # the runtime's pipe closed: the run is over
        accepting.cancel()
        for task in list(self.in_flight):
            task.cancel()
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=CANCEL_S)
        counting.cancel()
        await self.executor.close()

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            try:
                connection, _ = await loop.sock_accept(self.listener)
            except OSError as exc:  # out of descriptors, say: the trampoline waits in the backlog meanwhile
                if not failing:  # (once while it lasts: ten lines a second would fill the pool's log)
                    print(f"worker pool: could not accept a task: {exc}", file=sys.stderr, flush=True)
                failing = True
                await asyncio.sleep(0.1)
                continue
            failing = False
            job = asyncio.ensure_future(self._handle(connection))
            self.in_flight.add(job)
            job.add_done_callback(self.in_flight.discard)

    async def _count_forever(self) -> None:
        while True:
            try:
                queued = await self.executor.queued()
                self.counts.queued = queued
                self.counts.running = max(len(self.in_flight) - queued, 0)
                self.counts_file.write(self.counts)
            except Exception as exc:  # (Redis away for a moment): the counts wait for the next round
                print(f"worker pool: could not count: {exc}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)

    async def _handle(self, connection: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:  # (in a thread: a slow trampoline holds up no other)
            task, fds = await asyncio.to_thread(handover.receive, connection)
        except ValueError as exc:
            print(f"worker pool: refused a request: {exc}", file=sys.stderr, flush=True)
            connection.close()
            return
        connection.setblocking(False)
        abandoned = asyncio.ensure_future(loop.sock_recv(connection, 1))  # b"": the trampoline is gone

        async def output(fd: int, data: bytes) -> None:
            await asyncio.to_thread(write_all, fds[0 if fd == 1 else 1], data)

        code: int | None = None
        try:
            refusal = other_interpreter(task, self.executor.python)
            if refusal:
                await output(2, refusal.encode() + b"\n")
                code = 1
            else:
                code = await self.executor.run(task, output, abandoned)
        except Exception as exc:  # the backend failed this task (not the task itself): its attempt, as lost
            with contextlib.suppress(OSError):
                os.write(fds[1], f"worker pool: the task could not run: {exc!r}\n".encode())
            code = trampoline.POOL_LOST
        finally:
            for fd in fds:
                os.close(fd)
            abandoned.cancel()
            if code is not None:
                self.counts.done += code == 0
                self.counts.failed += code != 0
                # Written before the reply: the run's last look at the pool, right after its last task, is current.
                self.counts.running = max(len(self.in_flight) - 1 - self.counts.queued, 0)
                self.counts_file.write(self.counts)
                with contextlib.suppress(OSError):
                    connection.sendall(trampoline.reply(code))
            connection.close()


async def _main(backend: str, address: str, args: list[str]) -> None:
    if backend == "ray":
        from metaflow_stack.pool.ray_dispatch import open_executor
    elif backend == "kubernetes":
        from metaflow_stack.pool.kubernetes_dispatch import open_executor
    elif backend == "nomad":
        from metaflow_stack.pool.nomad_dispatch import open_executor
    else:
        from metaflow_stack.pool.redis_dispatch import open_executor
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        executor = await open_executor(Path(address).parent, args)
        listener.bind(address)
        listener.listen(1024)
        listener.setblocking(False)
        dispatcher = Dispatcher(listener, executor, Path(address).with_suffix(".counts"))
        dispatcher.counts_file.write(dispatcher.counts)
        say_ready()
        await dispatcher.serve()
    finally:  # the pool's folder goes with it (a dispatcher that never started leaves its log to be read)
        listener.close()
        if Path(address).exists():
            shutil.rmtree(Path(address).parent, ignore_errors=True)


def main() -> None:
    backend, address, *args = sys.argv[1:]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runtime, which stops the pool
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where it is, in its log
    try:
        asyncio.run(_main(backend, address, args))
    except StackError as exc:  # the last line of its log, which the runtime shows
        print(exc, file=sys.stderr)
        sys.exit(1)
