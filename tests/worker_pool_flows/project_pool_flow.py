"""A foreach (pooled with ``--with worker_pool``) in a flow whose command line has options of its own:
``@project``'s ``--branch``, and a ``Config``'s ``--config-value``, which the pool's tasks must take as a
plain task does."""

from metaflow import Config, FlowSpec, project, step


@project(name="pooled")
class ProjectPoolFlow(FlowSpec):
    settings = Config("settings", default_value={"scale": 2})

    @step
    def start(self):
        self.items = [1, 2, 3]
        self.next(self.each, foreach="items")

    @step
    def each(self):
        self.value = self.input * self.settings.scale
        self.next(self.join)

    @step
    def join(self, inputs):
        self.values = sorted(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        print("values", self.values)


if __name__ == "__main__":
    ProjectPoolFlow()
