"""Which attempt of a task a record belongs to: Metaflow tags each attempt's metadata ``attempt_id:N``."""

from __future__ import annotations

import re

_ATTEMPT_TAG = re.compile(r"^attempt_id:(\d+)$")


def attempt_of(tags: list[str] | None) -> int | None:
    """The attempt an ``attempt_id:N`` tag names, or None when no tag does."""
    for tag in tags or []:
        match = _ATTEMPT_TAG.match(tag)
        if match:
            return int(match.group(1))
    return None
