"""Two static branches joined: one artifact set by both, merged after a choice, the others merged as is."""

from metaflow import FlowSpec, step


class BranchFlow(FlowSpec):
    @step
    def start(self):
        self.shared = "from start"
        self.next(self.left, self.right)

    @step
    def left(self):
        self.side = "left"
        self.left_only = 1
        self.next(self.join)

    @step
    def right(self):
        self.side = "right"
        self.right_only = 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.sides = sorted(i.side for i in inputs)
        self.merge_artifacts(inputs, exclude=["side"])
        self.next(self.end)

    @step
    def end(self):
        self.summary = f"{self.shared}: {self.sides} {self.left_only + self.right_only}"


if __name__ == "__main__":
    BranchFlow()
