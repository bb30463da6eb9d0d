"""The ``kubernetes`` backend's executor in the dispatcher: the Redis executor, the pool's pods deleted when
it closes (``cluster_pool``: the dispatcher stops however the run ends, so no run leaves pods behind)."""

from __future__ import annotations

import functools
from pathlib import Path

from metaflow_stack.pool import redis_dispatch
from metaflow_stack.pool.kubernetes_pool import delete_pods
from metaflow_stack.pool.redis_dispatch import RedisExecutor


async def open_executor(folder: Path, args: list[str]) -> RedisExecutor:
    """``args``: the pool's key prefix, the pods' namespace, their release's name and kubectl's context (empty:
    the current one)."""
    prefix, namespace, release, context = args
    executor = await redis_dispatch.open_executor(folder, [prefix])
    executor.remove_workers = functools.partial(delete_pods, namespace, release, context or None)
    return executor
