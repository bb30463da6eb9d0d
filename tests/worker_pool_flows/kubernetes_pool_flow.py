"""The seed's example: a pool over ``@kubernetes``, whose workers are long-running pods with its settings.
``POOL_FLOW_FAIL`` (an item) makes that item fail.

A pod gets what ``@kubernetes`` would send it (the run's Metaflow settings), not the run's environment: the
item's setting and the test S3's credentials reach it as a user gives them, through ``@environment``."""

import os

from metaflow import FlowSpec, environment, kubernetes, step, worker_pool

PASSED_ON = ("POOL_FLOW_FAIL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


class KubernetesPoolFlow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(4))
        self.next(self.each, foreach="items")

    @environment(vars={name: os.environ[name] for name in PASSED_ON if name in os.environ})
    @worker_pool(size=2)
    @kubernetes(
        cpu=2,
        memory=4096,
        namespace="pools",
        node_selector="disk=ssd",
        image="registry.example/team/pool:1",
        service_account="pool-runner",
        tolerations=[{"key": "spot", "operator": "Exists", "effect": "NoExecute", "toleration_seconds": 60}],
    )
    @step
    def each(self):
        if str(self.input) == os.environ.get("POOL_FLOW_FAIL"):
            raise RuntimeError(f"item {self.input} fails")
        self.square = self.input * self.input
        self.host_only = os.environ.get("STACK_TEST_HOST_ONLY")  # (the run's, which no pod gets)
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
    KubernetesPoolFlow()
