"""A cluster pool's own Redis user: what its workers (pods, Nomad allocations) connect as, which opens
that pool's keys to the commands a worker sends and nothing else.

A worker runs each item's code in a child of its own, which can read the worker's memory and
environment, and so the URL it connects with. With the run's URL, an item's code on a cluster's machine
could read every other pool's queued tasks on that Redis (each carries its task's environment,
credentials included), put tasks of its own in their queues (their workers run them as their users), or
empty the Redis. With the pool's user it reaches its own pool's keys: its own run's step.

The runtime makes the user once the dispatcher has reached Redis, before the workers exist, and it goes
with the pool (``remove``: by the dispatcher as it stops, and again by the runtime). Redis neither saves
nor replicates such users, nor the scripts it runs: the dispatcher makes both again (``make_again``)
whenever Redis may have restarted (a command of its failed) or no worker has said it lives (it could not
log in), and the workers, which try again every second, find them. A Redis that takes no such user
(before 6, or a managed one whose users are set elsewhere, or a URL whose own user may not make users)
gives the workers the run's URL: ``make`` says why, for the run to say once.

The user may run the queue's scripts, never load its own: a script Redis runs holds every other client
(every pool on that Redis) until it ends, and only an administrator may kill it.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from metaflow_stack.errors import StackError
from metaflow_stack.pool.redis_queue import CLAIM, LIVE, connect

#: Where the dispatcher finds the pool's user (``to_json``), to make it again.
USER_VARIABLE = "METAFLOW_STACK_POOL_REDIS_USER"
#: Every command a worker sends (``redis_queue``'s worker side, its scripts' ``redis.call``s included, which
#: Redis checks against the user too; the scripts loaded by ``make``, not by the user); nothing that lists,
#: scans or removes keys it was not given, nor loads a script. (What else redis-py sends as it connects,
#: ``CLIENT SETINFO`` say, is refused, and redis-py goes on.)
WORKER_COMMANDS = (
    "ping",
    "select",
    "multi",
    "exec",
    "discard",
    "evalsha",
    "blmove",
    "hgetall",
    "hset",
    "lrem",
    "rpush",
    "set",
    "exists",
    "expire",
    "xadd",
)


def key_pattern(prefix: str) -> str:
    """Redis's glob for the keys that start with ``prefix``, its own glob characters escaped."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", prefix) + "*"


@dataclass(frozen=True)
class PoolUser:
    """The pool's user: named as its workers are (``workers_name``: one per run and step, which the
    dispatcher knows too), with a password of its own."""

    name: str
    prefix: str
    password: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)

    def rules(self) -> list[str]:
        """``ACL SETUSER``'s rules, from nothing (``reset``), so that making it again changes nothing."""
        commands = [f"+{command}" for command in WORKER_COMMANDS]
        return ["reset", "on", f">{self.password}", f"~{key_pattern(self.prefix)}", "resetchannels", *commands]

    def commands(self) -> list[tuple[str, ...]]:
        """What makes the user (again: from ``reset``, it changes nothing, and its connections stay) and
        loads the queue's scripts, which it may run and not load."""
        return [("ACL", "SETUSER", self.name, *self.rules()), ("SCRIPT", "LOAD", CLAIM), ("SCRIPT", "LOAD", LIVE)]

    def make(self, url: str) -> str | None:
        """Make (or make again) the user on the Redis at ``url`` (the run's); why not, if that Redis
        takes no such user."""
        client = connect(url)
        try:
            for command in self.commands():
                client.execute_command(*command)
        except redis.ResponseError as exc:
            with contextlib.suppress(redis.RedisError):  # (made, its scripts refused: none is left half-made)
                client.acl_deluser(self.name)
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        except redis.RedisError as exc:
            raise StackError(f"Redis did not answer as the pool's user was made: {exc}") from None
        finally:
            client.close()
        return None

    async def make_again(self, client: Any) -> None:
        """Make the user again with the dispatcher's ``client`` (``redis.asyncio``), where Redis lost it; a
        refusal or a failure changes nothing (the pool goes on as it can: its workers keep trying)."""
        with contextlib.suppress(redis.RedisError, OSError):
            for command in self.commands():
                await client.execute_command(*command)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PoolUser:
        return cls(**json.loads(text))

    def url(self, base: str) -> str:
        """``base`` (a URL of the same Redis, as the workers reach it) with this user's name and password."""
        parts = urlsplit(base)
        where = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{self.name}:{self.password}@{where}"))


def remove(url: str, name: str) -> None:
    """Remove the user ``name`` from the Redis at ``url``, if it is there (else nothing: a Redis that took
    none, or removed already); a Redis that does not answer keeps it, with access to keys that expire."""
    client = connect(url)
    with contextlib.suppress(redis.RedisError):
        client.acl_deluser(name)
    client.close()
