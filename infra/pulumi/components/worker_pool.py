"""``WorkerPool``: standing warm workers for one pooled step, pulling its items from Redis.

The ``@worker_pool(backend="kubernetes")`` runtime creates the pods of a
run's pool itself and deletes them when the run ends. This component
installs the same chart (``infra/helm/worker-pool``) with the same values
as a lasting Helm release, for a queue that outlives one run (a scheduled
flow whose items keep coming under one prefix). Its values come from the
runtime and are rendered and validated offline at construction, so a bad
one fails at ``pulumi preview``. The Redis URL stays in a Kubernetes
Secret the component only names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi

from components.release import chart_release
from metaflow_stack.pool.kubernetes_pool import CHART, chart_values, kubernetes_resources


@dataclass(frozen=True)
class WorkerPoolArgs:
    """Which queue, which flow, how many workers of what size."""

    image: str
    #: The queue's key prefix (``mf-pool:<run>:<step>:``).
    prefix: str
    #: The flow's file as the pods see it (built into the image, or on a mounted folder).
    flow_file: str
    #: A Secret holding the Redis URL under ``url``.
    redis_secret: str
    size: int = 2
    namespace: str = "default"
    cpu: float = 1
    memory_mb: int = 1024
    #: Node folders mounted at the same path (a dev cluster's flow folder and datastore).
    host_paths: tuple[str, ...] = field(default_factory=tuple)


class WorkerPool(pulumi.ComponentResource):
    """A Helm release of ``infra/helm/worker-pool``."""

    def __init__(self, name: str, args: WorkerPoolArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("metaflow-stack:pool:WorkerPool", name, None, opts)
        resources = kubernetes_resources(args.cpu, None, args.memory_mb)
        redis = {"existingSecret": args.redis_secret}
        values = chart_values(args.prefix, args.flow_file, args.size, args.image, redis, resources)
        values["hostPaths"] = list(args.host_paths)
        self.release = chart_release(self, name, CHART, args.namespace, values)
        self.register_outputs({"release": self.release.name})
