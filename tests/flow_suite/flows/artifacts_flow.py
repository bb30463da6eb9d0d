"""Artifacts of several types and sizes, made in one step and changed in the next."""

from metaflow import FlowSpec, step


class ArtifactsFlow(FlowSpec):
    @step
    def start(self):
        self.mapping = {"a": 1, "nested": {"b": [1, 2, 3]}}
        self.blob = bytes(range(256)) * 4096  # 1 MiB
        self.numbers = list(range(10_000))
        self.nothing = None
        self.next(self.change)

    @step
    def change(self):
        self.mapping["a"] += 1
        self.blob_size = len(self.blob)
        self.next(self.end)

    @step
    def end(self):
        self.checksum = sum(self.numbers)


if __name__ == "__main__":
    ArtifactsFlow()
