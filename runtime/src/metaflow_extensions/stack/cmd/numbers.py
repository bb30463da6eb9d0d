"""Number options that refuse what click's own ranges let through."""

from __future__ import annotations

import math
from typing import Any

from metaflow._vendor import click


class FiniteRange(click.FloatRange):
    """A ``click.FloatRange`` that also refuses ``nan`` and ``inf``: click compares a bound with ``<`` and
    ``>``, which ``nan`` passes, and a range open above takes ``inf``; either reached a server as a value it
    could not use (an event retention of ``inf`` days failed its relay every five seconds, for good)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number", param, ctx)
        return number
