"""Steps run in images the Dev Containers CLI built with a local feature: named in a devcontainer.json
(the feature's install script, its environment and its lifecycle command, then the file's own),
then given to the decorator itself, on the stack's base image."""

import os
from pathlib import Path

from metaflow import FlowSpec, devcontainer, step


class FeaturedFlow(FlowSpec):
    @devcontainer(config=".devcontainer/with-features/devcontainer.json")
    @step
    def start(self):
        self.greeting = Path("/usr/local/share/greeting").read_text().strip()
        self.env = {name: os.environ.get(name) for name in ("GREETER", "FROM_REMOTE_ENV")}
        self.lifecycle = Path("/tmp/lifecycle").read_text().split()
        self.next(self.inline)

    @devcontainer(features={"./.devcontainer/with-features/greeter": {"greeting": "hello from the decorator"}})
    @step
    def inline(self):
        self.inline_greeting = Path("/usr/local/share/greeting").read_text().strip()
        self.next(self.end)

    @step
    def end(self):
        print(self.greeting, self.env, self.lifecycle)


if __name__ == "__main__":
    FeaturedFlow()
