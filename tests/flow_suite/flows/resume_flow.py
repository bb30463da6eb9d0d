"""A run that fails in its middle step, and succeeds when resumed (a resumed run has an origin run)."""

from metaflow import FlowSpec, current, step


class ResumeFlow(FlowSpec):
    @step
    def start(self):
        self.prepared = "made once"
        self.next(self.middle)

    @step
    def middle(self):
        if current.origin_run_id is None:
            raise RuntimeError("the original run fails here")
        self.resumed_from = current.origin_run_id
        self.next(self.end)

    @step
    def end(self):
        self.result = f"{self.prepared}, resumed from {self.resumed_from}"


if __name__ == "__main__":
    ResumeFlow()
