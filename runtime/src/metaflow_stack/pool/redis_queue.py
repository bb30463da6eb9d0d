"""The Redis backend's queue: tasks in, output and exit statuses out, claims that expire.

Every key of one pool starts with its prefix (``mf-pool:<run>:<step>:``), so
stopping the pool removes them all. A task is a hash (``task:<id>``) and
its id in ``pending``; a worker claims it by moving the id to its own
``claimed:<worker>`` list (``BLMOVE``: one task at a time, prefetch 1, so a
faster worker takes more), and holds ``lease:<id>`` (a key that expires after
``LEASE_S``) while it runs, renewing it every second. The task's output and
its end go to the stream ``out:<id>``, which the claim creates: later
writes never create it again (``NOMKSTREAM``; leases are renewed with
``XX``), so a pool whose keys were purged while a worker still ran gets
none back. The workers say they live (``served``, expiring after
``LEASE_S``) while they wait and while they run, so a queue no worker
serves (its pods crashing, say) fails its items instead of holding them. A task whose lease expired while
claimed lost its worker: the dispatcher fails that attempt (the runtime's
``@retry`` then runs it again, as a new attempt on another worker); a task
whose trampoline went away is marked ``cancel:<id>`` and its worker kills it.
The claim takes the lease and names the worker in one script right after
the move (only if the task is still there), so a task out of ``pending``
without a lease for long lost its worker too.

Every key expires unless someone who needs it renews it (``KEEP_S``): the
dispatcher keeps ``pending`` and each of its tasks' hash and stream, a
worker its ``claimed`` list. When the runtime, its dispatcher and the
workers are all killed at once (a container or a machine lost), nothing is
left to purge the pool, and the task hashes hold the tasks' environments,
credentials and all: they go by themselves ``KEEP_S`` later.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from metaflow_stack.pool.child import Task

#: The variable that says where the queue is, to the run and to the pool's processes (not on their
#: command lines: the URL may hold a password).
URL_VARIABLE = "METAFLOW_STACK_POOL_REDIS_URL"
#: Seconds a claim stays valid without renewal: a worker that has not renewed in this long is gone.
LEASE_S = 10
#: How often a worker renews the leases of what it runs and looks for cancellations.
RENEW_S = 1.0
#: Entries of a task's output the dispatcher has relayed that stay in its stream before it deletes them: the
#: stream holds what the dispatcher has yet to relay (never trimmed: a line is not lost to a dispatcher
#: that fell behind), and this much more at most.
RELAYED_KEPT = 256
#: How long a command may wait for Redis's answer, and a connection for Redis, before it fails (above the
#: longest blocking read any side asks for, a second): a Redis that stopped answering (stopped, its network
#: gone) fails the pool's commands in seconds rather than holding the dispatcher, the workers and the run's
#: end (older redis-py releases wait without limit). Not tried again: a command such as XADD or BLMOVE may
#: have been carried out, and again would write a line twice or strand a task.
TIMEOUT_S = 5.0
#: Seconds a key of the pool outlives the last renewal by whoever needs it (the dispatcher, every ``LEASE_S``;
#: a worker, every ``RENEW_S``): a dispatcher's stall shorter than this loses nothing.
KEEP_S = LEASE_S * 6


#: ``1``: take a Redis URL with no password (a Redis only this user can reach, on a private network).
NO_PASSWORD_VARIABLE = "METAFLOW_STACK_POOL_REDIS_NO_PASSWORD"


def private(url: str) -> str:
    """``url`` (readable), when it asks Redis for a password or is a Unix socket (its file's mode says who may
    connect); else ``StackError``: every task on the queue carries its environment, credentials and all, and
    the workers run what the queue holds, so a Redis any local user reaches lets them read those and run code
    as the run's user. ``NO_PASSWORD_VARIABLE=1`` takes it anyway."""
    from redis.connection import parse_url

    from metaflow_stack.errors import StackError

    found = parse_url(url)
    if found.get("password") or "path" in found or os.environ.get(NO_PASSWORD_VARIABLE) == "1":
        return url
    raise StackError(
        "the pool's Redis URL has no password: whoever reaches that Redis could read the tasks' environment "
        "(credentials included) and run code as you through the queue",
        fix=f"put its password in the URL (redis://:PASSWORD@host:port/db), use the stack's (just up --with "
        f"redis), or set {NO_PASSWORD_VARIABLE}=1 for a Redis only you can reach",
    )


def readable(url: str) -> str:
    """``url``, once redis-py can read it; else ``StackError`` saying nothing of why (redis-py's reason would
    quote part of the URL: a password's, say)."""
    from redis.connection import parse_url

    from metaflow_stack.errors import StackError

    try:
        parse_url(url)
    except ValueError:
        raise StackError(
            f"the Redis URL (redis_url= or {URL_VARIABLE}) is not one redis-py can read",
            fix="write it as redis://[:password@]host:port/db (a password's / # ? escaped as %2F %23 %3F), "
            "rediss://... or unix:///path",
        ) from None
    return url


def connect(url: str, asynchronous: bool = False) -> Any:
    """A ``redis.Redis`` (``redis.asyncio.Redis``: the dispatcher's) for ``url`` with the pool's limit."""
    import redis
    import redis.asyncio

    kind = redis.asyncio.Redis if asynchronous else redis.Redis
    return kind.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)


#: A worker takes the task it moved to its list: lease, owner and output stream in one step, and only if
#: the task is still there (its dispatcher may have given it up meanwhile: nothing of it is made again).
#: The stream and the worker's list (which the move made) expire as the task's hash does.
CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('HSET', KEYS[1], 'worker', ARGV[1])
redis.call('XADD', KEYS[3], '*', 'claimed', ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[3])
return 1
"""


#: A worker says it lives, and keeps its ``claimed`` list in being with an expiry: the list holds ``HELD`` when
#: it holds no task, so the ``BLMOVE`` of a claim moves into a list that expires, never makes one that does not
#: (a worker killed between the move and the claim's script would leave it for good).
LIVE = """
redis.call('SET', KEYS[1], 1, 'EX', ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('RPUSH', KEYS[2], ARGV[3]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""
#: What a worker's ``claimed`` list holds besides the id of the task it runs (no task's id: those are hex).
HELD = "-"


def redacted(url: str) -> str:
    """``url`` without its password, for messages."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:(hidden)@", url)


class RedisQueue:
    """One pool's keys on one Redis (``client``: a ``redis.Redis``, or ``redis.asyncio.Redis`` for the
    coroutine methods marked so)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client, self.prefix = client, prefix
        self._claim = client.register_script(CLAIM)
        self._live = client.register_script(LIVE)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- the dispatcher's side (redis.asyncio) ------------------------------------------------

    async def submit(self, task_id: str, task: Task) -> None:
        fields = {"python": task.python, "argv": json.dumps(task.argv), "env": json.dumps(task.env), "cwd": task.cwd}
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self.key("task", task_id), mapping=fields)
            pipe.expire(self.key("task", task_id), KEEP_S)
            pipe.lpush(self.key("pending"), task_id)
            pipe.expire(self.key("pending"), KEEP_S)  # (a list emptied by the workers went: this one is new)
            await pipe.execute()

    async def keep(self, task_id: str) -> None:
        """Renew ``task_id``'s keys and the queue's for ``KEEP_S`` more (the dispatcher, while it waits on it)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for key in (self.key("task", task_id), self.key("out", task_id), self.key("pending")):
                pipe.expire(key, KEEP_S)
            await pipe.execute()

    async def read_output(self, task_id: str, after: str, block_ms: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """Output entries of ``task_id`` after entry ``after``, waiting up to ``block_ms`` for the first."""
        answer = await self.client.xread({self.key("out", task_id): after}, block=block_ms, count=256)
        return [(entry_id.decode(), fields) for _, entries in answer for entry_id, fields in entries]

    async def relayed(self, task_id: str, entry_ids: list[str]) -> None:
        """Delete entries of ``task_id``'s output the dispatcher has passed on."""
        await self.client.xdel(self.key("out", task_id), *entry_ids)

    async def state(self, task_id: str) -> str:
        """Where ``task_id`` is: ``queued``, ``held`` (a worker holds its lease), ``lost`` (a worker claimed
        it and stopped renewing its lease) or ``taken`` (out of the queue, no lease yet: a moment, unless
        the worker that took it died before it took the lease)."""
        async with self.client.pipeline(transaction=True) as pipe:  # (one view: a claim is one transaction)
            pipe.exists(self.key("lease", task_id))
            pipe.hexists(self.key("task", task_id), "worker")
            pipe.lpos(self.key("pending"), task_id)
            leased, claimed, position = await pipe.execute()
        if leased:
            return "held"
        if claimed:
            return "lost"
        return "taken" if position is None else "queued"

    async def served(self) -> bool:
        """Whether any worker of the pool said it lives in the last ``LEASE_S``."""
        return bool(await self.client.exists(self.key("served")))

    async def cancel(self, task_id: str) -> None:
        await self.client.set(self.key("cancel", task_id), 1, ex=LEASE_S * 6)

    async def forget(self, task_id: str) -> None:
        """Remove what the queue holds of ``task_id`` (it ended, or was given up). A cancel mark stays until it
        expires (or the pool's keys are purged): a worker only stalled, not gone, still sees it and stops."""
        await self.client.lrem(self.key("pending"), 0, task_id)
        await self.client.delete(*(self.key(kind, task_id) for kind in ("task", "out", "lease")))

    async def purge(self) -> int:
        """Remove every key of this pool; returns how many."""
        removed = 0
        async for key in self.client.scan_iter(match=self.prefix + "*", count=1000):
            removed += await self.client.delete(key)
        return removed

    # -- a worker's side (redis, blocking) ----------------------------------------------------

    def claim(self, worker: str, timeout_s: float) -> tuple[str, Task] | None:
        """The next task for ``worker`` (waiting up to ``timeout_s``), its lease taken; None if none came."""
        task_id = self.client.blmove(self.key("pending"), self.key("claimed", worker), timeout_s, "RIGHT", "LEFT")
        if task_id is None:
            return None
        task_id = task_id.decode()
        leased = self._claim(
            keys=[
                self.key("task", task_id),
                self.key("lease", task_id),
                self.key("out", task_id),
                self.key("claimed", worker),
            ],
            args=[worker, LEASE_S, KEEP_S],
            client=self.client,
        )
        fields = self.client.hgetall(self.key("task", task_id)) if leased else {}
        if not fields:  # given up by its dispatcher meanwhile
            self.client.lrem(self.key("claimed", worker), 0, task_id)
            return None
        task = Task(
            fields[b"python"].decode(),
            json.loads(fields[b"argv"]),
            json.loads(fields[b"env"]),
            fields[b"cwd"].decode(),
        )
        return task_id, task

    def renew(self, task_id: str, worker: str) -> bool:
        """Keep the claim on ``task_id`` (and say this worker lives); returns whether its dispatcher
        cancelled it."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key("lease", task_id), worker, ex=LEASE_S, xx=True)  # a purged pool's lease stays gone
        pipe.exists(self.key("cancel", task_id))
        pipe.set(self.key("served"), 1, ex=LEASE_S)
        pipe.expire(self.key("claimed", worker), KEEP_S)
        return bool(pipe.execute()[1])

    def live(self, worker: str) -> None:
        """Between claims: say a worker of the pool lives (``served``, for ``LEASE_S``), and keep ``worker``'s
        list for the next claim (``LIVE``)."""
        keys = [self.key("served"), self.key("claimed", worker)]
        self._live(keys=keys, args=[LEASE_S, KEEP_S, HELD], client=self.client)

    def output(self, task_id: str, fd: int, data: bytes) -> None:
        stream = self.key("out", task_id)
        self.client.xadd(stream, {"fd": fd, "data": data}, nomkstream=True)

    def finish(self, task_id: str, worker: str, code: int) -> None:
        """The task ended with ``code``: its status to the dispatcher, its claim released. The lease stays
        until the dispatcher forgets the task: gone before the status is read, it would read as lost."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.key("out", task_id), {"exit": code}, nomkstream=True)
        pipe.lrem(self.key("claimed", worker), 0, task_id)
        pipe.execute()
