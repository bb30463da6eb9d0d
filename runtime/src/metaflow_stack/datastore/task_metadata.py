"""The task metadata readers show, read back bounded: foreach stacks, exceptions, verifications.

A run writes these values itself: Metaflow's runtime, this project's client
and ``@confidential``'s launcher, but also any step's own code (locally a
file in its ``_meta`` folder, with a service a POST of metadata). So every
reader (the service's pages, the agent's local source, the UI) takes them
as data of any shape and size, and shows them by the same rules:

- a foreach stack: its first ``FOREACH_ITEMS`` text items, each cut at
  ``FOREACH_CHARS``;
- an exception: a text type and message and a list of text lines, each cut
  to its bound; any other shape is no type, with a note as its message;
- a ``@confidential`` verification: the records of the task's latest attempt.
  Its launcher writes exactly one before the step's code runs; with more,
  the step wrote the others, and which is the launcher's cannot be told (a
  record is unsigned), so none is shown: a conflict, never attested.
"""

from __future__ import annotations

import json
from typing import Any

#: The longest stored text parsed (a verification, an exception): a few kilobytes as the stack writes them, while
#: a client may store a MiB, whose parse every read would pay.
PARSED_MAX = 64 * 1024
#: What parsing a stored value raises, besides its own parse errors: nested past the parser's limit, or too large.
UNREADABLE = (ValueError, SyntaxError, RecursionError, MemoryError)

#: Foreach items shown per task, and characters per item: Metaflow itself records at most 256 characters of them.
FOREACH_ITEMS = 16
FOREACH_CHARS = 200

#: An exception's bounds, as this project's client writes it (``service_provider``): a message of 4,000
#: characters, the last 20 lines of the traceback of 300 each (and a qualified class name, far shorter).
MESSAGE_CHARS = 4096
TRACEBACK_LINES = 20
LINE_CHARS = 300

#: A verification with more than one record for the attempt, as every reader shows it.
CONFLICTING = {
    "attested": False,
    "mode": "unknown",
    "conflicting": True,
    "why": "its latest attempt has more than one verification record: its launcher writes one before the "
    "step's code runs, so the step wrote the others, and records are unsigned: none is shown",
}


def parsed(text: str) -> Any:
    """The JSON value of a stored text of at most ``PARSED_MAX`` characters; None for a longer one, or one that
    does not parse."""
    if len(text) > PARSED_MAX:
        return None
    try:
        return json.loads(text)
    except UNREADABLE:
        return None


def foreach_items(stack: Any) -> list[str]:
    """A recorded foreach stack (a list of ``var=item``), outermost first, bounded; [] for anything else."""
    if not isinstance(stack, list):
        return []
    return [item[:FOREACH_CHARS] for item in stack[:FOREACH_ITEMS] if isinstance(item, str)]


def exception_fields(value: Any) -> dict[str, Any]:
    """A recorded exception's ``type``, ``message`` and ``traceback`` (its last lines), bounded. None is no
    exception; a value of another shape than an object of text type and message and a list of text lines is no
    type, with a note saying what was recorded instead."""
    if value is None:
        return {"type": None, "message": None, "traceback": []}
    if isinstance(value, dict):
        kind, message, lines = value.get("type"), value.get("message"), value.get("traceback") or []
        texts = all(isinstance(part, str | None) for part in (kind, message))
        if texts and isinstance(lines, list) and all(isinstance(line, str) for line in lines):
            return {
                "type": kind[:LINE_CHARS] if kind else None,
                "message": message[:MESSAGE_CHARS] if message is not None else None,
                "traceback": [line[:LINE_CHARS] for line in lines[-TRACEBACK_LINES:]],
            }
    shape = "an object whose fields are not text" if isinstance(value, dict) else f"a JSON {type(value).__name__}"
    note = f"(the run recorded {shape} as this exception, not a type, message and traceback: not shown)"
    return {"type": None, "message": note, "traceback": []}


def verification(records: list[Any]) -> dict[str, Any] | None:
    """What a task shows of the verification ``records`` of its latest attempt (each its stored JSON text, or the
    object): nothing for none, the record for one (when it is an object), ``CONFLICTING`` for more."""
    if not records:
        return None
    if len(records) > 1:
        return dict(CONFLICTING)
    found = parsed(records[0]) if isinstance(records[0], str) else records[0]
    if not isinstance(found, dict):
        return None
    return {key: value for key, value in found.items() if key != "conflicting"}  # the readers' verdict alone
