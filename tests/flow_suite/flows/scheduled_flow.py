"""A flow on a schedule: deployed, a scheduler starts it by its cron; triggered by hand in tests."""

from metaflow import FlowSpec, schedule, step


@schedule(cron="0 3 * * *")
class ScheduledFlow(FlowSpec):
    @step
    def start(self):
        self.started = True
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ScheduledFlow()
