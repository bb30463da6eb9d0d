"""Starting Ray in this process, for the capabilities that run on it (Functions' ``ray`` backend, the
``@worker_pool`` Ray backend).

A Ray started here waits a fixed 30 seconds for its own node to register
(Ray's ``Node``: not configurable). On a machine busy enough to miss that,
a second start nearly always succeeds, so one more is made (the first's
processes stopped) before the failure is reported, in one line naming the
fix.
"""

from __future__ import annotations

import contextlib
from typing import Any

from metaflow_stack.errors import StackError

#: What Ray says when its node missed its startup window.
_NODE_TIMED_OUT = "timed out during startup"


def init(**options: Any) -> None:
    """``ray.init(**options)``, made once more when Ray's own node missed its startup window; ``StackError``
    when it misses it twice. The processes a missed start left (its GCS and raylet: Ray's ``shutdown`` knows
    only a node that started) are stopped before the next try, so a busy machine is not given two Rays."""
    import psutil
    import ray

    for tries_left in (1, 0):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(**options)
            return
        except Exception as exc:  # Ray raises a bare Exception for it
            if _NODE_TIMED_OUT not in str(exc):
                raise
            ray.shutdown()
            _stop([c for c in psutil.Process().children(recursive=True) if c.pid not in before])
            if not tries_left:
                raise StackError(
                    "Ray's node did not start within Ray's 30 seconds, twice: this machine is too busy",
                    fix="try again when it is less busy, or start Ray (ray start --head) and set RAY_ADDRESS=auto",
                ) from None


def _stop(processes: list[Any]) -> None:
    """Terminate ``processes`` (psutil's), then kill those still there after a few seconds."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
