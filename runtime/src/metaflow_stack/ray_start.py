"""Starting Ray in this process, for the capabilities that run on it (Functions' ``ray`` backend, the
``@worker_pool`` Ray backend).

A Ray started here waits a fixed 30 seconds for its own node to register
(Ray's ``Node``: not configurable). On a machine busy enough to miss that,
a second start nearly always succeeds, so one more is made before the
failure is reported, in one line naming the fix.
"""

from __future__ import annotations

from typing import Any

from metaflow_stack.errors import StackError

#: What Ray says when its node missed its startup window.
_NODE_TIMED_OUT = "timed out during startup"


def init(**options: Any) -> None:
    """``ray.init(**options)``, made once more when Ray's own node missed its startup window; ``StackError``
    when it misses it twice."""
    import ray

    for tries_left in (1, 0):
        try:
            ray.init(**options)
            return
        except Exception as exc:  # Ray raises a bare Exception for it
            if _NODE_TIMED_OUT not in str(exc):
                raise
            ray.shutdown()
            if not tries_left:
                raise StackError(
                    "Ray's node did not start within Ray's 30 seconds, twice: this machine is too busy",
                    fix="try again when it is less busy, or start Ray (ray start --head) and set RAY_ADDRESS=auto",
                ) from None
