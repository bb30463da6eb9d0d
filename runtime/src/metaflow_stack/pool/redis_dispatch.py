"""The Redis backend's executor in the dispatcher: each task onto the pool's queue, its output back.

A task goes onto the queue (``redis_queue``) and the executor reads its
output stream until the exit status arrives. It gives the attempt up as
lost (``POOL_LOST``, which ``@retry`` retries) when its worker stopped
renewing the claim, and also when the task left the queue but no worker
holds it for ``TAKEN_S`` (a worker that died between taking it and
taking its lease), and a task still queued when no worker of the pool
has said it lives for ``UNSERVED_S`` (its pods crash, say). A task whose
trampoline went away is cancelled: its worker kills it. The first task, and
each one after a command of Redis's failed (a restart, a stall), waits up to
``UNSERVED_S`` for Redis to answer before it goes onto the queue, rather
than failing at once: a retry is not spent on the outage that failed the
attempt before it. Otherwise no task pays for the look.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from metaflow_stack.errors import StackError
from metaflow_stack.pool import trampoline
from metaflow_stack.pool.child import Task
from metaflow_stack.pool.dispatcher import Output
from metaflow_stack.pool.redis_queue import (
    KEEP_S,
    LEASE_S,
    RELAYED_KEPT,
    TIMEOUT_S,
    URL_VARIABLE,
    RedisQueue,
    connect,
    redacted,
)
from metaflow_stack.pool.redis_user import USER_VARIABLE, PoolUser

#: How long one read of a task's output waits before the executor checks on the task.
POLL_MS = 1000
#: A queued task no worker of the pool served for this long (none alive) is given up.
UNSERVED_S = 30.0
#: A task neither queued nor held by a worker for this long lost the worker that took it: the lease's own
#: time, as a worker stalled between taking a task and taking its lease (a loaded machine) is no more lost
#: than one stalled between renewals.
TAKEN_S = float(LEASE_S)
#: How often the executor renews the keys of a task it waits on (they expire ``KEEP_S`` after the last).
KEEP_EVERY_S = KEEP_S / 6


class RedisExecutor:
    """Tasks through the queue; a cluster backend sets ``remove_workers``, how its workers are removed when
    the dispatcher closes (before the keys: they kill what they run); a cluster pool's Redis user, which
    its workers connect as (``redis_user``), is made again where Redis may have lost it and removed after
    the keys."""

    def __init__(self, queue: RedisQueue, python: str = sys.executable, user: PoolUser | None = None) -> None:
        self.queue, self.python, self.user = queue, python, user
        self.remove_workers: Callable[[], None] | None = None
        self.unsure = True  # (whether Redis may not answer: before the first task, and after any failure)

    async def _answering(self) -> None:
        """Return once Redis answers a ``PING`` (which changes nothing, so asking again is safe, unlike the
        submit itself); its last error after ``UNSERVED_S``. A connection the outage broke fails the first
        ask, and the next takes a new one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UNSERVED_S
        while True:
            try:
                await self.queue.client.ping()
                if self.user is not None:  # (a Redis that restarted forgot it)
                    await self.user.make_again(self.queue.client)
                return
            except redis.RedisError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def run(self, task: Task, output: Output, abandoned: asyncio.Future) -> int | None:
        loop = asyncio.get_running_loop()
        task_id, given_up, keeper = uuid.uuid4().hex, False, None
        try:
            if self.unsure:
                await self._answering()
                self.unsure = False
            await self.queue.submit(task_id, task)
            keeper = asyncio.ensure_future(self._keep(task_id))
            after, cancelled_at, taken_at, unserved_at, relayed = "0-0", None, None, None, []
            while True:
                # A cancel (the pool stopping) that landed as a command's send completed: redis-py sends under
                # asyncio.wait_for, which on Python 3.11 then returns instead of raising (fixed in 3.12).
                if asyncio.current_task().cancelling():
                    raise asyncio.CancelledError
                entries = await self.queue.read_output(task_id, after, POLL_MS)
                for entry_id, fields in entries:
                    after = entry_id
                    if b"exit" in fields:
                        return int(fields[b"exit"])
                    if b"fd" in fields:  # (the other entry is the claim's)
                        await output(int(fields[b"fd"]), fields[b"data"])
                        relayed.append(entry_id)
                if len(relayed) >= RELAYED_KEPT:  # (a chatty task's stream holds what is still to relay)
                    await self.queue.relayed(task_id, relayed)
                    relayed.clear()
                if abandoned.done() and cancelled_at is None:
                    await self.queue.cancel(task_id)
                    cancelled_at = loop.time()
                if cancelled_at is not None and loop.time() - cancelled_at > LEASE_S:
                    return None  # its worker is gone too: nothing is left to wait for
                if entries:
                    continue  # it is being served: where it is needs no look
                state = await self.queue.state(task_id)
                taken_at = (taken_at or loop.time()) if state == "taken" else None
                unserved = state == "queued" and not await self.queue.served()
                if unserved and unserved_at is None and self.user is not None:  # (one the workers cannot log in as)
                    await self.user.make_again(self.queue.client)
                unserved_at = (unserved_at or loop.time()) if unserved else None
                if unserved_at is not None and loop.time() - unserved_at > UNSERVED_S:
                    await output(2, f"worker pool: no worker of this pool answered for {UNSERVED_S:.0f}s\n".encode())
                    return trampoline.POOL_LOST
                if state == "lost" or (taken_at is not None and loop.time() - taken_at > TAKEN_S):
                    await self.queue.cancel(task_id)  # a worker only stalled must not go on beside the retry
                    why = f"stopped answering for {LEASE_S}s" if state == "lost" else "took it, then vanished"
                    await output(2, f"worker pool: the worker running this task {why}\n".encode())
                    return trampoline.POOL_LOST
        except Exception:  # given up (Redis failed a command, say): a worker holding it must not go on beside
            given_up = self.unsure = True  # the retry, if Redis can still be told at all (else the purge clears it)
            with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
                await asyncio.wait_for(self._give_up(task_id), TIMEOUT_S)
            raise
        finally:  # (stopping: the purge removes it anyway)
            if keeper is not None:
                keeper.cancel()
            if not given_up:
                await asyncio.shield(self.queue.forget(task_id))

    async def _keep(self, task_id: str) -> None:
        """Renew ``task_id``'s keys every ``KEEP_EVERY_S`` while it runs: apart from the relay, which waits on
        the task's own output (a runtime busy elsewhere reads none for minutes), so no key expires meanwhile.
        A renewal Redis fails is tried again at the next round (the relay meets the failure too)."""
        while True:
            await asyncio.sleep(KEEP_EVERY_S)
            with contextlib.suppress(redis.RedisError, OSError, TimeoutError):
                await self.queue.keep(task_id)

    async def _give_up(self, task_id: str) -> None:
        await self.queue.cancel(task_id)
        await self.queue.forget(task_id)

    async def queued(self) -> int:
        return await self.queue.client.llen(self.queue.key("pending"))

    async def close(self) -> None:
        try:
            if self.remove_workers is not None:
                await asyncio.to_thread(self.remove_workers)
        finally:
            await self.queue.purge()
            if self.user is not None:  # (none there, where Redis took none: nothing to say)
                with contextlib.suppress(redis.RedisError):
                    await self.queue.client.acl_deluser(self.user.name)
            await self.queue.client.aclose()


async def open_executor(folder: Path, args: list[str]) -> RedisExecutor:
    """``args``: the pool's key prefix and, for a step with an environment of its own, the interpreter its
    workers run the tasks under (else the runtime's); the Redis URL is in the environment (``URL_VARIABLE``),
    and so is a cluster pool's Redis user (``USER_VARIABLE``)."""
    # (out of the environment of what the dispatcher starts: kubectl, its credential plugins)
    url, (prefix, *python) = os.environ.pop(URL_VARIABLE), args
    client = connect(url, asynchronous=True)
    try:
        await client.ping()
    except (redis.RedisError, OSError) as exc:
        raise StackError(f"no Redis at {redacted(url)}: {exc}") from None
    user = os.environ.pop(USER_VARIABLE, None)  # (a cluster pool's)
    return RedisExecutor(RedisQueue(client, prefix), *python, user=PoolUser.from_json(user) if user else None)
