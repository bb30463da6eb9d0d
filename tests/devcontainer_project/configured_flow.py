"""A step run in the container a devcontainer.json describes: built from its Dockerfile with build
args, with its environment, its mount, its runArgs and its lifecycle commands."""

import os
from pathlib import Path

from metaflow import FlowSpec, devcontainer, step


class ConfiguredFlow(FlowSpec):
    @devcontainer(config=".devcontainer/devcontainer.json")
    @step
    def start(self):
        self.greeting = Path("/etc/greeting").read_text().strip()
        self.env = {name: os.environ.get(name) for name in ("FROM_CONFIG", "FROM_HOST")}
        self.extended_path = os.environ["EXTENDED_PATH"]
        self.data = Path("/data/input.txt").read_text().strip()
        self.created = Path("/tmp/created").read_text().split()
        self.shm = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
        self.next(self.end)

    @step
    def end(self):
        print(self.greeting, self.env, self.data, self.created, self.shm)


if __name__ == "__main__":
    ConfiguredFlow()
