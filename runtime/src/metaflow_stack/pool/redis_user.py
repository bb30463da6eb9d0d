"""A cluster pool's own Redis user: what its workers (pods, Nomad allocations) connect as, which opens
that pool's keys to the commands a worker sends and nothing else.

A worker runs each item's code in a child of its own, which can read the worker's memory and
environment, and so the URL it connects with. With the run's URL, an item's code on a cluster's machine
could read every other pool's queued tasks on that Redis (each carries its task's environment,
credentials included), put tasks of its own in their queues (their workers run them as their users), or
empty the Redis. With the pool's user it reaches its own pool's keys: its own run's step.

The runtime makes the user once the dispatcher has reached Redis, before the workers exist, and it goes
with the pool (``remove``: by the dispatcher as it stops, and again by the runtime). A Redis that takes
no such user (before 6, or a managed one whose users are set elsewhere, or a URL whose own user may not
make users) gives the workers the run's URL: ``make`` says why, for the run to say once.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import redis

from metaflow_stack.errors import StackError
from metaflow_stack.pool.redis_queue import connect

#: Every command a worker sends (``redis_queue``'s worker side, its scripts' ``redis.call``s included, which
#: Redis checks against the user too; ``script|load`` where the server lost a script); nothing that lists,
#: scans or removes keys it was not given. (``client|setinfo``, which redis-py sends as it connects, is
#: refused, and redis-py goes on.)
WORKER_COMMANDS = (
    "ping",
    "select",
    "multi",
    "exec",
    "discard",
    "evalsha",
    "script|load",
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

    def make(self, url: str) -> str | None:
        """Make (or make again) the user on the Redis at ``url`` (the run's); why not, if that Redis
        takes no such user."""
        client = connect(url)
        try:
            client.execute_command("ACL", "SETUSER", self.name, *self.rules())
        except redis.ResponseError as exc:
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        except redis.RedisError as exc:
            raise StackError(f"Redis did not answer as the pool's user was made: {exc}") from None
        finally:
            client.close()
        return None

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
