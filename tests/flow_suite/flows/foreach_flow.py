"""A foreach over a parameter's items, its join summing what each item made."""

from metaflow import FlowSpec, Parameter, step


class ForeachFlow(FlowSpec):
    count = Parameter("count", default=4, type=int, help="how many items")

    @step
    def start(self):
        self.items = list(range(self.count))
        self.next(self.square, foreach="items")

    @step
    def square(self):
        self.value = self.input * self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        self.values = sorted(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        self.total = sum(self.values)


if __name__ == "__main__":
    ForeachFlow()
