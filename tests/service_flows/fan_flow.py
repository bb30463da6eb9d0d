"""A foreach whose item 1 fails its first attempt (and is retried), and whose
item ``$FAN_FAIL_AT`` fails every attempt when that variable is set."""

import os

from metaflow import FlowSpec, Parameter, current, retry, step


class FanFlow(FlowSpec):
    width = Parameter("width", default=5, type=int)

    @step
    def start(self):
        self.items = list(range(self.width))
        self.next(self.work, foreach="items")

    @retry(times=1, minutes_between_retries=0)
    @step
    def work(self):
        if self.input == 1 and current.retry_count == 0:
            raise RuntimeError("flaky first attempt")
        if str(self.input) == os.environ.get("FAN_FAIL_AT"):
            raise ValueError(f"item {self.input} is bad")
        self.value = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FanFlow()
