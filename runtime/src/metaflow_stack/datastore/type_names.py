"""The Python type names Metaflow records for artifacts, as readers show them."""

from __future__ import annotations

import re


def type_name(recorded: str | None) -> str | None:
    """``list`` from the ``<class 'list'>`` Metaflow records."""
    match = re.fullmatch(r"<class '(.+)'>", recorded or "")
    return match.group(1) if match else recorded
