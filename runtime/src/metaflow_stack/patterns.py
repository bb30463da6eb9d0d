"""Search patterns from users: regular expressions that run in linear time.

A ``grep`` on a log, an artifact or metadata search, takes a pattern from
whoever sends the request. Python's ``re`` backtracks, so ``(a+)+$`` on a
line of 30 characters holds a core (and the GIL) for seconds and doubles
with each character. Patterns are therefore compiled by RE2, whose matching
is linear in the text whatever the pattern: backreferences and lookaround,
which need backtracking, are refused with the reason. The pattern's length
and RE2's program memory are bounded too, so no pattern is costly to build.
"""

from __future__ import annotations

from typing import Any

import re2

from metaflow_stack.errors import InvalidInput

MAX_PATTERN = 256
#: RE2's memory for one compiled pattern (its default is 8 MiB); a{100}{100}{100} is refused, not built.
_MAX_PROGRAM_BYTES = 1 << 20


def _options() -> Any:
    options = re2.Options()
    options.max_mem = _MAX_PROGRAM_BYTES
    options.log_errors = False  # a user's bad pattern is their 400, not a line in the server's log
    return options


_OPTIONS = _options()


def compile_pattern(text: str, field: str = "grep") -> Any:
    """``text`` as a linear-time pattern over bytes; ``InvalidInput`` naming ``field`` when it is not one."""
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_PATTERN:
        raise InvalidInput(field, f"must be a regular expression of 1 to {MAX_PATTERN} characters")
    try:
        return re2.compile(text.encode(), _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise InvalidInput(
            field,
            f"not a regular expression this server runs ({reason})",
            "use RE2 syntax: no backreferences or lookaround",
        ) from None
