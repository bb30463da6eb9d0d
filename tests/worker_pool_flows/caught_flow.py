"""``@worker_pool`` written on the step, with ``@catch`` and ``@timeout``: the items named in
``POOL_FLOW_HANG`` sleep until their timeout kills them, those in ``POOL_FLOW_FAIL`` raise. It prints
when imported, as flow files do: the pool imports it before it says it is ready. ``POOL_FLOW_BACKEND``
names the pool's backend (default: local)."""

import os
import time

from metaflow import FlowSpec, catch, retry, step, timeout, worker_pool

print("caught_flow.py imported")


def _items(variable: str) -> set[int]:
    return {int(i) for i in os.environ.get(variable, "").split(",") if i}


class CaughtFlow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(6))
        self.next(self.each, foreach="items")

    @worker_pool(size=2, backend=os.environ.get("POOL_FLOW_BACKEND", "local"))
    @catch(var="error")
    @retry(times=1)
    @timeout(seconds=4)
    @step
    def each(self):
        if self.input in _items("POOL_FLOW_HANG"):
            time.sleep(3600)
        if self.input in _items("POOL_FLOW_FAIL"):
            raise RuntimeError(f"item {self.input} failed")
        self.square = self.input * self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        self.squares = [getattr(i, "square", None) for i in inputs]
        self.errors = [str(i.error) if i.error else "" for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CaughtFlow()
