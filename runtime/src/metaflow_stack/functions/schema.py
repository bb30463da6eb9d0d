"""JSON Schemas of a function's input and output, from its type hints, and fast validators.

Schemas are derived once at bind time (pydantic) and travel in the reference,
so every caller validates the same way without importing the function's
module; validation compiles the schema (fastjsonschema) once per load.
"""

from __future__ import annotations

import inspect
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
    annotations = inspect.get_annotations(fn)
    data = _resolve(fn, annotations.get(parameters[0].name, inspect.Parameter.empty))
    result = _resolve(fn, annotations.get("return", inspect.Parameter.empty))
    return _schema_of(data), _schema_of(result)


def _resolve(fn: Callable[..., Any], annotation: Any) -> Any:
    """An annotation's type; string annotations (``from __future__ import annotations``) are evaluated
    in the function's module, as ``typing.get_type_hints`` does, one at a time so that an unresolvable
    ``params`` annotation does not matter."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, fn.__globals__, {})
    except Exception as exc:
        raise BindError(
            f"cannot resolve the type hint {annotation!r} of {fn.__qualname__}: {exc}",
            fix="import the type at the top of the function's module",
        ) from exc


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
