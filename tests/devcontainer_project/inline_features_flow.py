"""A step whose features are given to the decorator, not in a file: the same local feature, on the
stack's base image, built by the Dev Containers CLI."""

from pathlib import Path

from metaflow import FlowSpec, devcontainer, step


class InlineFeaturesFlow(FlowSpec):
    @devcontainer(features={"./.devcontainer/with-features/greeter": {"greeting": "hello from the decorator"}})
    @step
    def start(self):
        self.greeting = Path("/usr/local/share/greeting").read_text().strip()
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    InlineFeaturesFlow()
