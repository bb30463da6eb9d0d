"""A foreach whose items run as Nomad jobs: item 2 fails its first attempt (``@retry`` runs it again as a
new job), ``--fail-item N`` makes item N fail for good, at once, ``--sleep S`` keeps the other items busy (a
test stops the run meanwhile). The jobs reach the test's S3 with the credentials ``@environment`` gives them."""

import os
import socket
import time

from metaflow import FlowSpec, Parameter, current, environment, nomad, retry, step

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class NomadFlow(FlowSpec):
    fail_item = Parameter("fail-item", default=0, type=int)
    sleep = Parameter("sleep", default=0.0, type=float)

    @step
    def start(self):
        self.items = [1, 2, 3]
        self.next(self.each, foreach="items")

    @retry(times=1)
    @environment(vars=S3_CREDENTIALS)
    @nomad(cpu=0.5, memory=512)
    @step
    def each(self):
        self.hostname = socket.gethostname()
        self.in_job = os.environ.get("METAFLOW_NOMAD_WORKLOAD") == "1"
        self.auth_key = os.environ.get("METAFLOW_SERVICE_AUTH_KEY")  # (from the job's variable, not its spec)
        time.sleep(0 if self.input == self.fail_item else self.sleep)  # (the failing item fails the run at once)
        print(f"item {self.input} in {self.hostname}")
        if self.input == 2 and current.retry_count == 0:
            raise RuntimeError("item 2 fails its first attempt")
        if self.input == self.fail_item:
            raise RuntimeError(f"item {self.input} always fails")
        self.value = self.input * 10
        self.next(self.join)

    @step
    def join(self, inputs):
        self.values = [i.value for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    NomadFlow()
