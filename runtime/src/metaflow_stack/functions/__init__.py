"""Relocatable functions: bind a function to a Metaflow task, export a portable
reference, and run it anywhere in the environment it was bound in.

The public names are re-exported from ``metaflow``: ``json_function``,
``JsonFunction``, ``FunctionParameters`` and ``function_from_json``. This
module stays light (no third-party imports) because Metaflow imports it with
every ``import metaflow``.
"""

from __future__ import annotations

from typing import Any

from metaflow_stack.functions.binding import JsonFunction, json_function
from metaflow_stack.functions.params import FunctionParameters

#: The longest ``call_timeout`` a backend takes, in seconds: a week (past 24 days the kernel's wait overflows).
MAX_CALL_TIMEOUT = 7 * 24 * 3600


def function_from_json(reference: Any, backend: str = "local", **options: Any) -> Any:
    """Load a function from its reference and run it on ``backend`` (see ``backends.function_from_json``)."""
    from metaflow_stack.functions.backends import function_from_json as load

    return load(reference, backend, **options)


__all__ = ["FunctionParameters", "JsonFunction", "function_from_json", "json_function"]
