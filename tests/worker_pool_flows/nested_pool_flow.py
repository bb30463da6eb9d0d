"""A foreach in a foreach: run with ``--with worker_pool``, both bodies are pooled, the inner one with each
outer item's items (its progress counts them all)."""

from metaflow import FlowSpec, step


class NestedPoolFlow(FlowSpec):
    @step
    def start(self):
        self.outer = [1, 2]
        self.next(self.mid, foreach="outer")

    @step
    def mid(self):
        self.inner = [self.input * 10 + i for i in range(3)]
        self.next(self.each, foreach="inner")

    @step
    def each(self):
        self.value = self.input
        self.next(self.inner_join)

    @step
    def inner_join(self, inputs):
        self.values = [i.value for i in inputs]
        self.next(self.outer_join)

    @step
    def outer_join(self, inputs):
        self.values = sorted(v for i in inputs for v in i.values)
        self.next(self.end)

    @step
    def end(self):
        print("values", self.values)


if __name__ == "__main__":
    NestedPoolFlow()
