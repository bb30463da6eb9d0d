"""The ``kubernetes`` backend's executor in the dispatcher: the Redis executor, and the pool's pods deleted
when it closes.

The dispatcher, not the runtime, deletes them: it stops when its pipe from
the runtime closes, which happens however the run ends (Ctrl-C, SIGTERM,
the runtime killed outright), so no run leaves pods behind.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from metaflow_stack.pool import redis_dispatch
from metaflow_stack.pool.kubernetes_pool import delete_pods
from metaflow_stack.pool.redis_dispatch import RedisExecutor
from metaflow_stack.pool.redis_queue import RedisQueue


class KubernetesExecutor(RedisExecutor):
    def __init__(self, queue: RedisQueue, namespace: str, release: str) -> None:
        super().__init__(queue)
        self.namespace, self.release = namespace, release

    async def close(self) -> None:
        try:  # the pods first: they kill what they run; then the keys
            await asyncio.to_thread(delete_pods, self.namespace, self.release)
        finally:
            await super().close()


async def open_executor(folder: Path, args: list[str]) -> KubernetesExecutor:
    """``args``: the pool's key prefix, the pods' namespace and their release's name."""
    prefix, namespace, release = args
    executor = await redis_dispatch.open_executor(folder, [prefix])
    return KubernetesExecutor(executor.queue, namespace, release)
