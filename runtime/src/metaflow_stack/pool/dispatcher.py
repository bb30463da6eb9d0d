"""The Redis backend's end of the trampoline: tasks in through the queue, their output back.

The run's runtime starts one dispatcher per pooled step. It takes the same
hand-over as the local fork server (``handover``) on a Unix socket, puts
each task on the pool's queue (``redis_queue``), writes what the task's
worker relays into the task's own stdout and stderr, and answers its exit
status. A worker lost mid-task (its lease expired) fails that attempt with
the trampoline's ``POOL_LOST`` status; a trampoline that goes away has its
task cancelled. When the runtime's pipe closes, it cancels what is in
flight and removes every key of the pool.

    python -c "from metaflow_stack.pool.dispatcher import main; main()" ADDRESS URL PREFIX
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import uuid
from pathlib import Path

import redis.asyncio

from metaflow_stack.pool import handover, trampoline
from metaflow_stack.pool.child import Task
from metaflow_stack.pool.counts import Counts
from metaflow_stack.pool.redis_queue import LEASE_S, RedisQueue

#: How long one read of a task's output waits before the dispatcher checks on the task.
POLL_MS = 1000


class Dispatcher:
    def __init__(self, listener: socket.socket, queue: RedisQueue, counts_file: Path) -> None:
        self.listener, self.queue, self.counts_file = listener, queue, counts_file
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
        await asyncio.gather(*self.in_flight, return_exceptions=True)
        counting.cancel()
        await self.queue.purge()

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(self.listener)
            try:
                task, fds = await asyncio.to_thread(handover.receive, connection)
            except ValueError as exc:
                print(f"worker pool: refused a request: {exc}", file=sys.stderr, flush=True)
                connection.close()
                continue
            connection.setblocking(False)
            job = asyncio.ensure_future(self._handle(connection, task, fds))
            self.in_flight.add(job)
            job.add_done_callback(self.in_flight.discard)

    async def _count_forever(self) -> None:
        while True:
            queued = await self.queue.client.llen(self.queue.key("pending"))
            self.counts.queued = queued
            self.counts.running = max(len(self.in_flight) - queued, 0)
            self.counts.write(self.counts_file)
            await asyncio.sleep(0.5)

    async def _handle(self, connection: socket.socket, task: Task, fds: tuple[int, int]) -> None:
        loop = asyncio.get_running_loop()
        task_id = uuid.uuid4().hex
        abandoned = asyncio.ensure_future(loop.sock_recv(connection, 1))  # b"": the trampoline is gone
        code: int | None = None
        try:
            await self.queue.submit(task_id, task)
            after, cancelled_at = "0-0", None
            while code is None:
                for entry_id, fields in await self.queue.read_output(task_id, after, POLL_MS):
                    after = entry_id
                    if b"exit" in fields:
                        code = int(fields[b"exit"])
                        break
                    if b"fd" in fields:  # (the other entry is the claim's)
                        await asyncio.to_thread(os.write, fds[0 if fields[b"fd"] == b"1" else 1], fields[b"data"])
                if code is not None:
                    break
                if abandoned.done() and cancelled_at is None:
                    await self.queue.cancel(task_id)
                    cancelled_at = loop.time()
                if cancelled_at is not None and loop.time() - cancelled_at > LEASE_S:
                    break  # its worker is gone too: nothing is left to wait for
                if await self.queue.lost(task_id):
                    await self.queue.cancel(task_id)  # a worker only stalled must not go on beside the retry
                    message = f"worker pool: the worker running this task stopped answering for {LEASE_S}s\n"
                    await asyncio.to_thread(os.write, fds[1], message.encode())
                    code = trampoline.POOL_LOST
        except asyncio.CancelledError:  # the pool is stopping: its workers see that and kill their tasks
            raise
        finally:
            for fd in fds:
                os.close(fd)
            abandoned.cancel()
            if code is not None:
                with contextlib.suppress(OSError):
                    connection.sendall(trampoline.reply(code))
                self.counts.done += code == 0
                self.counts.failed += code != 0
            connection.close()
            await asyncio.shield(self.queue.forget(task_id))  # (stopping: the purge removes it anyway)


async def _main(address: str, url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    await client.ping()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1024)
    listener.setblocking(False)
    dispatcher = Dispatcher(listener, RedisQueue(client, prefix), Path(address).with_suffix(".counts"))
    dispatcher.counts.write(dispatcher.counts_file)
    print("ready", flush=True)
    try:
        await dispatcher.serve()
    finally:  # the pool's folder goes with it (a dispatcher that never started leaves its log to be read)
        await client.aclose()
        shutil.rmtree(Path(address).parent, ignore_errors=True)


def main() -> None:
    address, url, prefix = sys.argv[1:4]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the runtime, which stops the pool
    asyncio.run(_main(address, url, prefix))
