"""A flow deployed as one Nomad job (``nomad create``) and run by dispatching it with its parameters: its
steps, a foreach among them (on a pool of warm workers inside the job), run inside that job, on the
``@project`` branch it was deployed from."""

from metaflow import FlowSpec, Parameter, project, step, worker_pool


@project(name="nomad_deployed")
class DeployedFlow(FlowSpec):
    alpha = Parameter("alpha", default=1, type=int)
    greeting = Parameter("greeting-word", default="hello")

    @step
    def start(self):
        self.items = [1, 2]
        self.next(self.each, foreach="items")

    @worker_pool(size=2)
    @step
    def each(self):
        self.value = self.input * self.alpha
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.value for i in inputs)
        self.said = self.greeting
        self.next(self.end)

    @step
    def end(self):
        print(f"{self.said}: {self.total}")


if __name__ == "__main__":
    DeployedFlow()
