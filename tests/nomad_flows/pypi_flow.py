"""A step with its own ``@pypi`` environment as a Nomad job: Metaflow solves it for linux-64 at the run's
start and keeps its packages in the datastore, and the job's bootstrap makes the environment from them
before the step runs in it. The job reaches the test's S3 with the credentials ``@environment`` gives it."""

import sys

from metaflow import FlowSpec, environment, nomad, pypi, step

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class PypiFlow(FlowSpec):
    @pypi(disabled=True)
    @step
    def start(self):
        self.next(self.work)

    @environment(vars=S3_CREDENTIALS)
    @pypi(python="3.11", packages={"six": "1.16.0"})
    @nomad(cpu=0.5, memory=1024)
    @step
    def work(self):
        import six

        self.six_version = six.__version__
        self.prefix, self.six_file = sys.prefix, six.__file__
        self.next(self.end)

    @pypi(disabled=True)
    @step
    def end(self):
        print("six", self.six_version, "in prefix", self.prefix, "from", self.six_file)


if __name__ == "__main__":
    PypiFlow()
