"""JSON Schemas of a function's input and output, from its type hints, and fast validators.

Schemas are derived once at bind time (pydantic) and travel in the reference,
so every caller validates the same way without importing the function's
module; validation compiles the schema (fastjsonschema) once per load.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from metaflow_stack.functions.errors import BindError, InvalidInputError


def _schema_of(annotation: Any) -> dict[str, Any]:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(annotation).json_schema()
    except Exception as exc:  # pydantic raises several types for unsupported annotations
        raise BindError(f"cannot derive a JSON Schema from the type {annotation!r}: {exc}") from exc


def derive(fn: Callable[..., Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The input and output schemas of ``fn(data, params) -> result``."""
    parameters = list(inspect.signature(fn).parameters.values())
    if len(parameters) != 2:
        raise BindError(
            f"{fn.__qualname__} takes {len(parameters)} arguments; a function takes (data, params)",
            fix="define it as def f(data: dict, params: FunctionParameters) -> dict",
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # unresolvable forward references and the like
        raise BindError(f"cannot resolve the type hints of {fn.__qualname__}: {exc}") from exc
    data = hints.get(parameters[0].name, inspect.Parameter.empty)
    result = hints.get("return", inspect.Parameter.empty)
    return _schema_of(data), _schema_of(result)


class Validator:
    """Checks values against a schema; a failure names the offending field."""

    def __init__(self, schema: dict[str, Any]) -> None:
        import fastjsonschema

        self._error = fastjsonschema.JsonSchemaValueException
        self._check = fastjsonschema.compile(schema) if schema else None

    def __call__(self, value: Any, where: str = "input") -> None:
        if self._check is None:
            return
        try:
            self._check(value)
        except self._error as exc:
            field = where + (exc.name or "data")[len("data") :]
            message = exc.message.replace("data", where, 1)
            if exc.rule == "required" and isinstance(exc.value, dict):
                missing = [f for f in exc.rule_definition if f not in exc.value]
                if missing:
                    field, message = f"{field}.{missing[0]}", f"missing required field {missing[0]!r}"
            raise InvalidInputError(field, message) from None
