"""Parameters of each kind Metaflow has: typed, boolean, JSON, with defaults and given values."""

from metaflow import FlowSpec, JSONType, Parameter, step


class ParametersFlow(FlowSpec):
    alpha = Parameter("alpha", default=0.5, type=float)
    who = Parameter("who", default="world")
    loud = Parameter("loud", default=False, type=bool)
    config = Parameter("config", default='{"layers": [1, 2]}', type=JSONType)

    @step
    def start(self):
        greeting = f"hello {self.who}"
        self.greeting = greeting.upper() if self.loud else greeting
        self.scaled = self.alpha * 10
        self.layers = self.config["layers"]
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ParametersFlow()
