"""A flow deployed as one Nomad job (``nomad create``) whose ``train`` step runs as a Nomad job of its own,
started from the deployed flow's job as its workload: its workload identity, through its agent's Task API.
The step's job reaches the test's S3 with the credentials ``@environment`` gives it."""

import os

from metaflow import FlowSpec, Parameter, environment, nomad, step

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class DeployedStepsFlow(FlowSpec):
    alpha = Parameter("alpha", default=2, type=int)

    @step
    def start(self):
        self.runner_job = os.environ.get("NOMAD_JOB_ID")
        self.next(self.train)

    @environment(vars=S3_CREDENTIALS)
    @nomad(cpu=0.5, memory=512)
    @step
    def train(self):
        self.step_job = os.environ.get("NOMAD_JOB_ID")
        self.total = self.alpha * 21
        self.next(self.end)

    @step
    def end(self):
        print(f"total: {self.total}")


if __name__ == "__main__":
    DeployedStepsFlow()
