"""Python literals as a notebook writes them: a parameter's default (``--param alpha=0.5``), a run's value
(``%mf_run alpha=0.7``), a flow file's ``Parameter(default=...)``.

``ast.literal_eval`` refuses text that is no literal with ``ValueError`` or ``SyntaxError``, but text that
parses can still fail to build (``{[1]: 2}``: ``TypeError``) or exhaust the parser (a 100,000-character
``---1``: ``MemoryError``, ``RecursionError``); every caller takes all of them as "not a literal" here,
so none of them reaches the user as a traceback.
"""

from __future__ import annotations

import ast
from typing import Any


class NotLiteral(Exception):
    """The text (or expression) is no Python literal, or one Python cannot build."""


def literal(source: str | ast.expr) -> Any:
    """The value the literal ``source`` writes; ``NotLiteral`` when it writes none."""
    try:
        return ast.literal_eval(source)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise NotLiteral from None
