"""A branch beside a nested foreach, for the UI: the DAG's shape, per-item
statuses, a parameter to compare, a card, and an artifact whose unpickling would run
code (``Sneaky``: loading it creates ``$UI_SNEAKY_MARKER``). With ``$UI_GATE``
naming a file, every ``leaf`` task waits while that file exists, and with
``$UI_START_GATE`` the ``start`` task, so a test can watch the run while it is
running."""

import os
import time
from pathlib import Path

from metaflow import FlowSpec, Parameter, card, current, step
from metaflow.cards import Markdown


def _sneaky_restore(marker: str) -> str:
    Path(marker).touch()  # proof that something unpickled the artifact
    return "restored"


class Sneaky:
    def __reduce__(self):
        return (_sneaky_restore, (os.environ.get("UI_SNEAKY_MARKER", "/nonexistent/marker"),))


def _hold(variable: str) -> None:
    """Wait while the file named by ``$variable`` exists."""
    gate = os.environ.get(variable)
    while gate and Path(gate).exists():
        time.sleep(0.2)


class BranchForeachFlow(FlowSpec):
    alpha = Parameter("alpha", default=0.5, type=float)

    @step
    def start(self):
        _hold("UI_START_GATE")
        self.next(self.fan, self.side)

    @card(type="blank", id="summary")
    @step
    def fan(self):
        self.items = ["a", "b", "c"]
        current.card["summary"].append(Markdown(f"## Fanning out over {len(self.items)} items"))
        self.next(self.each, foreach="items")

    @step
    def each(self):
        self.inner = [1, 2]
        self.next(self.leaf, foreach="inner")

    @step
    def leaf(self):
        _hold("UI_GATE")
        self.score = self.alpha * self.input
        print(f"leaf {self.input} scored {self.score}")
        self.next(self.inner_join)

    @step
    def inner_join(self, inputs):
        self.next(self.fan_join)

    @step
    def fan_join(self, inputs):
        self.next(self.join)

    @step
    def side(self):
        self.sneaky = Sneaky()
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        self.accuracy = round(0.8 + self.alpha / 10, 4)  # a metric that moves with the parameter
        self.model_name = "ridge"  # a result that does not


if __name__ == "__main__":
    BranchForeachFlow()
