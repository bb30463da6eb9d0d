"""Opaque page cursors, one format for the service, the agent and the UI: a row's sort key (or a log's
offsets) as URL-safe base64 JSON without padding. Free of server dependencies, so every client can use it."""

from __future__ import annotations

import base64
import json
from typing import Any

from metaflow_stack.errors import InvalidInput

#: The longest cursor taken: far above any this code issues (a few sort keys), far below what costs.
MAX_CURSOR = 4096
#: The values of a cursor: integers a database's 64 bits hold, strings no longer than an id.
_INT64 = range(-(2**63), 2**63)
_MAX_TEXT = 1024


def encode_cursor(values: list[Any]) -> str:
    """An opaque cursor over a row's sort key (or a log's offsets): URL-safe, no padding."""
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> list[Any]:
    """The values of a cursor ``encode_cursor`` made; ``InvalidInput`` for anything else."""
    refused = InvalidInput("_cursor", "not a cursor this service issued", "drop it to start from the first page")
    if len(text) > MAX_CURSOR:
        raise refused
    try:
        values = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, RecursionError):  # (RecursionError: a list nested a thousand deep)
        raise refused from None
    if not isinstance(values, list) or not all(_fits(v) for v in values):
        raise refused
    return values


def _fits(value: Any) -> bool:
    """Whether ``value`` can be a sort key's: an integer of 64 bits (no bool), or a string of an id's length."""
    if type(value) is int:
        return value in _INT64
    return isinstance(value, str) and len(value) <= _MAX_TEXT


def decode_offset(text: str | None) -> int:
    """Where in a listing a cursor ``encode_cursor([offset])`` made stands (0 without one); ``InvalidInput``
    for any other cursor, a negative offset among them."""
    if text is None:
        return 0
    values = decode_cursor(text)
    if len(values) != 1 or type(values[0]) is not int or values[0] < 0:  # (no bools: JSON's true is an int here)
        raise InvalidInput("_cursor", "not a cursor this listing issued", "drop it to start from the first page")
    return values[0]
