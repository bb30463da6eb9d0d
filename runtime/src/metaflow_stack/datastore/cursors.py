"""Opaque page cursors, one format for the service, the agent and the UI: a row's sort key (or a log's
offsets) as URL-safe base64 JSON without padding. Free of server dependencies, so every client can use it."""

from __future__ import annotations

import base64
import json
from typing import Any

from metaflow_stack.errors import InvalidInput


def encode_cursor(values: list[Any]) -> str:
    """An opaque cursor over a row's sort key (or a log's offsets): URL-safe, no padding."""
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(text: str) -> list[Any]:
    """The values of a cursor ``encode_cursor`` made; ``InvalidInput`` for anything else."""
    refused = InvalidInput("_cursor", "not a cursor this service issued", "drop it to start from the first page")
    try:
        values = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except ValueError:
        raise refused from None
    if not isinstance(values, list) or not all(isinstance(v, int | str) for v in values):
        raise refused
    return values
