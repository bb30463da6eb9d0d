"""The one interface every pool backend offers the ``@worker_pool`` decorator."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from metaflow_stack.pool.counts import Counts

if TYPE_CHECKING:
    from metaflow_stack.engines.nomad.jobspec import Placement as NomadPlacement
    from metaflow_stack.pool.contained import Launcher
    from metaflow_stack.pool.local import Interpreter


class Pool(Protocol):
    """A pool of warm workers for one step of one run."""

    def start(self) -> None:
        """Start the workers without waiting for them (they warm up while the run's first steps run)."""

    def alive(self) -> bool:
        """Whether the workers can still take tasks (a pool that died is started again for the next attempt)."""

    def command(self, entrypoint: list[str]) -> list[str]:
        """The command line that runs a task's ``entrypoint ...`` on the pool instead of in a new interpreter;
        waits for the workers the first time, and raises ``StackError`` naming the fix if they cannot start."""

    def counts(self) -> Counts:
        """What the pool is doing now, for the run's progress display."""

    def stop(self) -> None:
        """Stop the workers and kill what still runs; leave nothing behind. Safe to call twice."""


#: The backends, in the decorator's words.
BACKENDS = ("local", "redis", "ray", "kubernetes", "nomad")


def open_pool(
    backend: str,
    flow_file: str,
    size: int,
    run_id: str,
    step: str,
    *,
    redis_url: str | None = None,
    resources: dict[str, Any] | None = None,
    image: str | None = None,
    namespace: str | None = None,
    values: dict[str, Any] | None = None,
    contained: Launcher | None = None,
    placement: NomadPlacement | None = None,
    interpreter: Interpreter | None = None,
) -> Pool:
    """The pool for ``step`` of run ``run_id`` (not started). ``redis_url``: for ``redis``, ``kubernetes`` and
    ``nomad``, where the queue is (default: ``METAFLOW_STACK_POOL_REDIS_URL``, then the stack's Redis; one
    with a password: ``redis_queue.private``);
    ``resources``: the step's ``@resources`` (``cpu``, ``gpu``, ``memory`` in MB), for each Ray actor or
    pod; for ``kubernetes``: ``image``, the pods' (default: the stack's base image), ``namespace`` (default:
    ``METAFLOW_KUBERNETES_NAMESPACE``, then ``default``) and chart ``values`` the step sets (a node selector,
    tolerations: ``@kubernetes``'s); for ``nomad``: ``image`` and ``placement``, where and with what the
    workers run (``@nomad``'s; default: ``resources``); for ``local``, ``contained``: how to start the
    container the fork server runs in (``@devcontainer``'s), ``flow_file`` then the flow as the container
    sees it; for ``local``, ``redis`` and ``ray`` (a Ray of the pool's own), ``interpreter``: the step's own
    environment's, which the workers' fork servers then run."""
    name = f"{step}@{os.uname().nodename}"
    resources = resources or {}
    if backend == "local" and contained is not None:
        from metaflow_stack.pool.contained import ContainedPool

        return ContainedPool(flow_file, size, name, contained)
    if backend == "local":
        from metaflow_stack.pool.local import LocalPool

        return LocalPool(flow_file, size, name, interpreter=interpreter)
    if backend == "ray":
        from metaflow_stack.pool.ray_pool import RayPool

        return RayPool(flow_file, size, name, resources, interpreter)
    from metaflow_stack.errors import StackError
    from metaflow_stack.pool.local_redis import stack_url
    from metaflow_stack.pool.redis_pool import RedisPool
    from metaflow_stack.pool.redis_queue import URL_VARIABLE, private, readable

    named = redis_url or os.environ.get(URL_VARIABLE) or stack_url()
    if named is None:
        raise StackError(
            f"the {backend} worker pool has no Redis: none is named, and the stack's has not been started here",
            fix=f"start the stack's (just up --with redis), or set {URL_VARIABLE}=redis://:PASSWORD@host:port/db",
        )
    url = private(readable(named))
    prefix = f"mf-pool:{run_id}:{step}:"
    if backend == "kubernetes":
        from metaflow_stack.pool.kubernetes_pool import open_kubernetes_pool

        return open_kubernetes_pool(flow_file, size, name, url, prefix, resources, image, namespace, values or {})
    if backend == "nomad":
        from metaflow_stack.pool.nomad_pool import open_nomad_pool

        return open_nomad_pool(flow_file, size, name, url, prefix, resources, image, placement)
    return RedisPool(flow_file, size, name, url, prefix, interpreter)
