"""A pool over ``@nomad``: its workers are the allocations of one Nomad job with its settings (here the
``raw_exec`` driver: processes of the client's, which see the flow's file where the run has it).
``POOL_FLOW_FLAKY`` (an item) makes that item fail on its first attempt.

A worker gets what ``@nomad`` would send a task (the run's Metaflow settings), not the run's environment:
the item's setting and the test S3's credentials reach it as a user gives them, through ``@environment``."""

import os

from metaflow import FlowSpec, current, environment, nomad, retry, step, worker_pool

PASSED_ON = ("POOL_FLOW_FLAKY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class NomadPoolFlow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(4))
        self.next(self.each, foreach="items")

    @environment(vars={name: os.environ[name] for name in PASSED_ON if name in os.environ})
    @retry(times=1, minutes_between_retries=0)
    @worker_pool(size=2)
    @nomad(driver="raw_exec", cpu=0.5, memory=512)
    @step
    def each(self):
        if str(self.input) == os.environ.get("POOL_FLOW_FLAKY") and current.retry_count == 0:
            raise RuntimeError(f"item {self.input} fails on attempt 0")
        self.square = self.input * self.input
        self.alloc = os.environ.get("NOMAD_ALLOC_ID")
        # (the worker's own, never its items': the queue's URL, the identity it read its credentials with)
        self.pool_secrets = ",".join(n for n in ("METAFLOW_STACK_POOL_REDIS_URL", "NOMAD_TOKEN") if n in os.environ)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.squares = [i.square for i in inputs]
        self.errors = []
        self.next(self.end)

    @step
    def end(self):
        print("squares", self.squares)


if __name__ == "__main__":
    NomadPoolFlow()
