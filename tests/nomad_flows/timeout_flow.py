"""A step that outlives its ``@timeout`` in its Nomad job: Metaflow's timeout stops it there, and the
attempt fails with Metaflow's own exception. The job reaches the test's S3 with the credentials
``@environment`` gives it."""

import time

from metaflow import FlowSpec, environment, nomad, step, timeout

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class TimeoutFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @timeout(seconds=3)
    @environment(vars=S3_CREDENTIALS)
    @nomad(driver="raw_exec", cpu=0.5, memory=256)
    @step
    def work(self):
        time.sleep(120)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TimeoutFlow()
