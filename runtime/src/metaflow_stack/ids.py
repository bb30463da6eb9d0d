"""The ids Metaflow objects can have, checked once for every reader and writer.

Flow and step names are Python identifiers, as Metaflow makes them (a flow
is its class, a step its method). Run and task ids are what a scheduler may
choose, so anything but empty, over 255 characters, ``/`` (pathspecs split
on it), spaces and control characters; an all-digit id is the service's own
number and fits 64 bits. The metadata service refuses any other id before
it is stored, the agent and the UI before it reaches a URL or a file path.
"""

from __future__ import annotations

import re

from metaflow_stack.errors import InvalidInput

_ID = re.compile(r"[^\s/\x00-\x1f\x7f]{1,255}\Z")  # (\Z: ``$`` would take a line's end, a newline after it)
_IDENTIFIERS = {"flow_id", "step_name"}
#: The kind of each part of a pathspec, in order.
PATHSPEC_KINDS = ("flow_id", "run_number", "step_name", "task_id")


def is_number(text: str) -> bool:
    """Whether ``text`` is a whole number in ASCII digits: ``str.isdigit`` also takes ``"¹"``, which ``int``
    refuses, so a hostile id would reach ``int`` and fail there."""
    return text.isascii() and text.isdigit()


def check_id(kind: str, value: str) -> str:
    """``value`` if an object of ``kind`` (``flow_id``, ``run_number``, ``step_name``, ``task_id``) can have
    it; ``InvalidInput`` naming ``kind`` otherwise."""
    if kind in _IDENTIFIERS:
        valid = value.isidentifier() and len(value) <= 255
        rule = "a Python identifier, as Metaflow names flows and steps"
    else:
        valid = bool(_ID.match(value)) and not (is_number(value) and len(value) > 18)
        rule = "1 to 255 characters without '/', spaces or control characters"
    if not valid:
        raise InvalidInput(kind, f"{value[:80]!r} is not a valid {kind.replace('_', ' ')}: it must be {rule}")
    return value
