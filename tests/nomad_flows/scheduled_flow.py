"""A flow deployed with ``@schedule``: a periodic Nomad job, whose schedule ``nomad trigger`` runs now."""

from metaflow import FlowSpec, Parameter, schedule, step


@schedule(cron="0 3 * * ? *", timezone="Europe/Paris")
class ScheduledFlow(FlowSpec):
    size = Parameter("size", default=4, type=int)

    @step
    def start(self):
        self.squared = self.size**2
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ScheduledFlow()
