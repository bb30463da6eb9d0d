"""A foreach whose item 1 fails its first attempt (and is retried), and whose
items listed in ``$FAN_FAIL_AT`` (comma-separated) fail every attempt.

Metaflow's local runtime stops launching tasks and kills the running ones at
the first task that fails for good, so with ``$FAN_BARRIER`` (a folder) set,
the failing items' last attempts wait there until every other item has
finished and every failing item has reached its last attempt: then all of them
fail together and the run records each one."""

import os
import time
from pathlib import Path

from metaflow import FlowSpec, Parameter, current, retry, step

RETRIES = 1


def failing_items() -> set[int]:
    return {int(item) for item in os.environ.get("FAN_FAIL_AT", "").split(",") if item}


def wait_for_the_others(barrier: Path, width: int, item: int) -> None:
    (barrier / f"failing-{item}").touch()
    failing = len(failing_items())
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        names = [path.name for path in barrier.iterdir()]
        done = sum(name.startswith("done-") for name in names)
        arrived = sum(name.startswith("failing-") for name in names)
        if done == width - failing and arrived == failing:
            return
        time.sleep(0.2)


class FanFlow(FlowSpec):
    width = Parameter("width", default=5, type=int)

    @step
    def start(self):
        self.items = list(range(self.width))
        self.next(self.work, foreach="items")

    @retry(times=RETRIES, minutes_between_retries=0)
    @step
    def work(self):
        barrier = os.environ.get("FAN_BARRIER")
        if self.input == 1 and current.retry_count == 0:
            raise RuntimeError("flaky first attempt")
        if self.input in failing_items():
            if barrier and current.retry_count == RETRIES:
                wait_for_the_others(Path(barrier), self.width, self.input)
            raise ValueError(f"item {self.input} is bad")
        self.value = self.input * 2
        if barrier:
            (Path(barrier) / f"done-{self.input}").touch()
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
