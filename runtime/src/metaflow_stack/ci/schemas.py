"""Validate a JSON document against a maintained library's models of a published schema, strictly.

The models this project validates with (githubkit's of GitHub's OpenAPI
description, hera's of Argo Workflows' API) are generated from the schema a
tool publishes, and generated models let unknown fields pass: dropped
silently or kept aside, depending on the model. A document is valid here
when one of the models accepts it and every field it has is one the schema
names, so a misspelt field fails instead of vanishing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from metaflow_stack.errors import InvalidInput

#: A step of an error's path that names a field (the others name a union's members: models, ``literal[...]``).
_FIELD = re.compile(r"(?!none$)[a-z_][A-Za-z0-9_]*")


def unknown_fields(model: BaseModel, data: dict[str, Any], where: str = "") -> list[str]:
    """The keys of ``data`` that ``model`` (parsed from it) has no field for, at any depth; a key set to
    ``null`` says nothing and is let be (Metaflow writes Kubernetes' newer fields as nulls, for example)."""
    # The names the schema uses (a model's Python names would be dropped by the tool, not understood).
    fields = {(info.alias or name): name for name, info in type(model).model_fields.items()}
    found = []
    for key, value in data.items():
        if key not in fields:
            if value is not None:
                found.append(f"{where}{key}")
            continue
        parsed = getattr(model, fields[key])
        if isinstance(parsed, BaseModel) and isinstance(value, dict):
            found += unknown_fields(parsed, value, f"{where}{key}.")
        elif isinstance(parsed, list) and isinstance(value, list):
            for index, (item, raw) in enumerate(zip(parsed, value, strict=False)):
                if isinstance(item, BaseModel) and isinstance(raw, dict):
                    found += unknown_fields(item, raw, f"{where}{key}.{index}.")
        elif isinstance(parsed, dict) and isinstance(value, dict):
            for name, item in parsed.items():
                if isinstance(item, BaseModel) and isinstance(value.get(name), dict):
                    found += unknown_fields(item, value[name], f"{where}{key}.{name}.")
    return found


def validate(data: dict[str, Any], models: Sequence[type[BaseModel]], what: str) -> BaseModel:
    """``data`` parsed by the first of ``models`` that accepts it with no unknown field; else ``InvalidInput``
    naming the field (``what`` says what kind of document it was meant to be)."""
    first: ValidationError | None = None
    for model in models:
        try:
            parsed = model.model_validate(data)
        except ValidationError as exc:
            first = first or exc
            continue
        if unknown := unknown_fields(parsed, data):
            raise InvalidInput(unknown[0], f"is not a field of {what}")
        return parsed
    if first is None:
        raise ValueError("no model to validate with")
    # The deepest error is the most precise; only the steps of its path that name fields are kept.
    problem = max(first.errors(), key=lambda e: len(e["loc"]))
    path = [str(p) for p in problem["loc"] if isinstance(p, int) or _FIELD.fullmatch(str(p))]
    raise InvalidInput(".".join(path) or "body", f"{problem['msg']} (in {what})")
