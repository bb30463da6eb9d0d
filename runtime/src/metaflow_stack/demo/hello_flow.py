"""The smallest real flow: it says where it ran, so the demo can prove it."""

import platform
import socket

from metaflow import FlowSpec, step


class HelloFlow(FlowSpec):
    """start -> hello -> end, recording the host and Python each step ran on."""

    @step
    def start(self):
        self.next(self.hello)

    @step
    def hello(self):
        self.host = socket.gethostname()
        self.python = platform.python_version()
        self.message = f"hello from {self.host} (Python {self.python})"
        print(self.message)
        self.next(self.end)

    @step
    def end(self):
        print("done:", self.message)


if __name__ == "__main__":
    HelloFlow()
