"""Checks every server's fuzzing adds to Schemathesis' own (loaded through ``SCHEMATHESIS_HOOKS``)."""

from __future__ import annotations

import schemathesis


@schemathesis.check
def errors_are_json(ctx, response, case) -> None:
    """Every error answer is the stack's JSON error, never HTML or a bare string."""
    if response.status_code >= 400:
        kind = (response.headers.get("content-type") or [""])[0]
        if not kind.startswith("application/json"):
            raise AssertionError(f"{case.method} {case.path} answered {response.status_code} as {kind or 'nothing'}")
        body = response.json()
        if not isinstance(body, dict) or not {"code", "message"} <= set(body):
            raise AssertionError(f"{case.method} {case.path} answered {response.status_code} without code/message")
