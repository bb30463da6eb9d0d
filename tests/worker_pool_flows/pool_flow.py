"""A foreach whose items misbehave on demand, run with and without ``@worker_pool``.

``POOL_FLOW_FAIL`` (item indexes, comma-separated) makes those items raise
on every attempt; ``POOL_FLOW_FLAKY`` on their first attempt only;
``POOL_FLOW_KILL`` makes their first attempt's process die by SIGKILL;
``POOL_FLOW_HANG`` makes them sleep until killed; ``POOL_FLOW_SLOW`` for 3 s. ``POOL_FLOW_RELEASE``
names a file every item waits for before it ends, so a test can see items
running. ``POOL_FLOW_EXITS`` names a folder: each item writes into a pipe
no one reads (as a subprocess that ignores its input leaves it), and leaves
an ``atexit`` callback, a thread and an executor's work unfinished, each of
which writes a file there as the item's process ends; and the flow imports
``pool_flow_tracker`` (beside it), whose own callback notes each task's end.
The items get these settings through ``@environment``, as a user gives them
to a task on another machine: a pool's pods get what ``@kubernetes`` would
send, not the run's environment.
"""

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from metaflow import FlowSpec, Parameter, current, environment, metaflow_config, retry, step

if os.environ.get("POOL_FLOW_EXITS"):
    import pool_flow_tracker  # noqa: F401 (what it does as it is imported)


def _items(variable: str) -> set[int]:
    return {int(i) for i in os.environ.get(variable, "").split(",") if i}


def _mark_later(path: str) -> None:
    time.sleep(0.2)
    with open(path, "w") as file:
        file.write("ended")


def _leave_work_unfinished(folder: str, index: int) -> None:
    """What a process does on its way out: its atexit callbacks, its threads, its executors' work."""
    subprocess.run(["true"], input=b"x" * (1 << 20), check=True)  # (BrokenPipeError, handled by subprocess)
    atexit.register(_mark_later, os.path.join(folder, f"atexit-{index}"))
    threading.Thread(target=_mark_later, args=(os.path.join(folder, f"thread-{index}"),)).start()
    ThreadPoolExecutor(1).submit(_mark_later, os.path.join(folder, f"executor-{index}"))


class PoolFlow(FlowSpec):
    n = Parameter("n", default=6, type=int)

    @step
    def start(self):
        self.items = [f"item-{i}" for i in range(self.n)]
        self.next(self.each, foreach="items")

    @environment(vars={name: value for name, value in os.environ.items() if name.startswith("POOL_FLOW_")})
    @retry(times=1)
    @step
    def each(self):
        index = int(self.input.split("-")[1])
        print(f"{self.input} attempt {current.retry_count}")
        print(f"{self.input} to stderr", file=sys.stderr)
        release = os.environ.get("POOL_FLOW_RELEASE")
        while release and not os.path.exists(release):
            time.sleep(0.05)
        if index in _items("POOL_FLOW_HANG"):
            time.sleep(3600)
        if index in _items("POOL_FLOW_SLOW"):
            time.sleep(3)
        if os.environ.get("POOL_FLOW_EXITS"):
            _leave_work_unfinished(os.environ["POOL_FLOW_EXITS"], index)
        if index in _items("POOL_FLOW_KILL") and current.retry_count == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if index in _items("POOL_FLOW_FAIL") or (index in _items("POOL_FLOW_FLAKY") and current.retry_count == 0):
            raise RuntimeError(f"{self.input} failed on attempt {current.retry_count}")
        self.square = index * index
        self.label = self.input.upper()
        self.host_only = os.environ.get("STACK_TEST_HOST_ONLY")  # (the run's own: never a cluster's worker's)
        self.node_only = os.environ.get("STACK_TEST_NODE_ONLY")  # (a cluster node's own)
        self.metadata_setting = metaflow_config.DEFAULT_METADATA  # (read as Metaflow was imported)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.squares = [getattr(i, "square", None) for i in inputs]
        self.errors = [str(getattr(i, "error", "")) for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        print("squares", self.squares)


if __name__ == "__main__":
    PoolFlow()
