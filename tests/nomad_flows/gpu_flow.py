"""One step asking Nomad for a GPU no node has."""

from metaflow import FlowSpec, environment, nomad, step

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class GpuFlow(FlowSpec):
    @environment(vars=S3_CREDENTIALS)
    @nomad(gpu=1, gpu_model="H100", memory=256)
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    GpuFlow()
