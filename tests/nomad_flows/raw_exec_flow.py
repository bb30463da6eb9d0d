"""One step as a Nomad job on the ``raw_exec`` driver: a process of the client's, in the task folder Nomad
makes for it, with the client's Python, with the CPU and memory ``@resources`` asks for (``@nomad`` names
none), and a variable from ``@secrets`` (Metaflow's ``inline`` provider, for tests: it runs in the job, as
every provider does). The job reaches the test's S3 with the credentials ``@environment`` gives it."""

import os
import sys

from metaflow import FlowSpec, environment, nomad, resources, secrets, step

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class RawExecFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @secrets(sources=[{"type": "inline", "id": "test", "options": {"env_vars": {"FROM_SECRET": "kept"}}}])
    @environment(vars=S3_CREDENTIALS)
    @resources(cpu=0.5, memory=384)
    @nomad(driver="raw_exec")
    @step
    def work(self):
        self.in_job = os.environ.get("METAFLOW_NOMAD_WORKLOAD") == "1"
        self.task_dir = os.environ["NOMAD_TASK_DIR"]
        self.cwd = os.getcwd()
        self.python = sys.executable
        self.limits = (os.environ["NOMAD_CPU_LIMIT"], os.environ["NOMAD_MEMORY_LIMIT"])  # (MHz, MB)
        self.from_secret = os.environ.get("FROM_SECRET")
        print(f"raw_exec in {self.cwd}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RawExecFlow()
