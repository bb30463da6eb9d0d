"""A step whose process dies in its Nomad job (no exception ``@catch`` could take in the task), under
``@catch``: Metaflow's fallback attempt records the failure without running the step's code, and runs
here, not as another job. The job reaches the test's
S3 with the credentials ``@environment`` gives it."""

import os

from metaflow import FlowSpec, catch, environment, nomad, step

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class CatchFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @catch(var="failure")
    @environment(vars=S3_CREDENTIALS)
    @nomad(driver="raw_exec", cpu=0.5, memory=256)
    @step
    def work(self):
        os._exit(3)  # (the process ends at once: nothing in the task sees it)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CatchFlow()
