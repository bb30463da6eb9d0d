"""A step with a default card and one it writes itself."""

from metaflow import FlowSpec, card, current, step
from metaflow.cards import Markdown


class CardFlow(FlowSpec):
    @card
    @step
    def start(self):
        self.score = 0.93
        self.next(self.report)

    @card(type="blank", id="report")
    @step
    def report(self):
        current.card["report"].append(Markdown(f"# Score {self.score}"))
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CardFlow()
