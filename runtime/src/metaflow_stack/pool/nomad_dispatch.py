"""The ``nomad`` backend's executor in the dispatcher: the Redis executor, the workers' job purged when it
closes (``cluster_pool``: the dispatcher stops however the run ends, so no run leaves workers behind)."""

from __future__ import annotations

import functools
from pathlib import Path

from metaflow_stack.engines.nomad.client import Settings
from metaflow_stack.pool import redis_dispatch
from metaflow_stack.pool.nomad_pool import purge
from metaflow_stack.pool.redis_dispatch import RedisExecutor


async def open_executor(folder: Path, args: list[str]) -> RedisExecutor:
    """``args``: the pool's key prefix, the workers' job, its namespace and region (empty: Nomad's
    variables')."""
    prefix, job, namespace, region = args
    executor = await redis_dispatch.open_executor(folder, [prefix])
    executor.remove_workers = functools.partial(purge, Settings.from_env().at(namespace or None, region or None), job)
    return executor
