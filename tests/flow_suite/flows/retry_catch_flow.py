"""A step that fails on its first attempt and is retried, and one that always fails and is caught."""

from metaflow import FlowSpec, catch, current, retry, step


class RetryCatchFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.flaky)

    @retry(times=2, minutes_between_retries=0)
    @step
    def flaky(self):
        if current.retry_count == 0:
            raise RuntimeError("the first attempt fails")
        self.attempts = current.retry_count + 1
        self.next(self.broken)

    @catch(var="problem", print_exception=False)
    @step
    def broken(self):
        raise ValueError("this step always fails")
        self.next(self.end)  # never reached; Metaflow reads the graph from the source

    @step
    def end(self):
        self.caught = self.problem.type if self.problem else None


if __name__ == "__main__":
    RetryCatchFlow()
