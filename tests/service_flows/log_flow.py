"""A flow with output worth bounding: ``start`` prints ``--lines`` numbered
lines (every 100th also to stderr); ``flaky`` says which attempt it is and
fails its first one."""

import sys

from metaflow import FlowSpec, Parameter, current, retry, step


class LogFlow(FlowSpec):
    lines = Parameter("lines", default=3000, type=int)

    @step
    def start(self):
        for i in range(self.lines):
            print(f"out {i:05d} " + "x" * (i % 50))
            if i % 100 == 0:
                print(f"err {i:05d}", file=sys.stderr)
        self.next(self.flaky)

    @retry(times=1, minutes_between_retries=0)
    @step
    def flaky(self):
        print(f"attempt {current.retry_count} says hello")
        if current.retry_count == 0:
            raise RuntimeError("the first attempt fails")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    LogFlow()
