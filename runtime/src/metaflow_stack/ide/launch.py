"""The editor's run launcher: where a run may go, its parameters' values from a form, and the run itself
through Metaflow's ``Runner``, reported as JSON lines.

The form sends every value as text; ``Runner`` checks values against each
Parameter's type (a float parameter refuses ``"0.7"``), so each is
converted here by the type the flow's source names, or, without one, by
its default's type, as Metaflow infers it. A value that does not convert
is refused naming the parameter, before anything starts.

Backends are offered by what ``metaflow stack doctor`` finds usable here;
the others come with that check's fix. A launch prints one JSON object a
line: ``{"event": "started", "run": "Flow/123"}`` as soon as the run has
an id (``Runner.async_run``), ``{"event": "output", "stream", "line"}`` for
each line the run prints, and ``{"event": "finished", "status",
"returncode"}``. Stopping the launcher stops the run with it.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from metaflow_stack.errors import InvalidInput, StackError
from metaflow_stack.ide.graph import flow_graph

#: Where a run may go: the ``--with`` decorator (None: this machine), and the doctor check it needs.
BACKENDS: dict[str, tuple[str | None, str | None, str]] = {
    "local": (None, None, "every step on this machine"),
    "worker_pool": ("worker_pool", None, "foreach items on a pool of warm workers here"),
    "devcontainer": ("devcontainer", "Docker engine", "every step in a devcontainer sandbox"),
    "nomad": ("nomad", "Nomad", "every step as a Nomad job"),
    "kubernetes": ("kubernetes", "kubectl", "every step as a Kubernetes pod"),
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def backends() -> list[dict[str, Any]]:
    """Each backend: its name, what it does, whether it is usable here, and the fix when it is not."""
    from metaflow_stack.doctor import run_checks

    checks = {check.name: check for check in run_checks({needs for _, needs, _ in BACKENDS.values() if needs})}
    found = []
    for name, (decorator, needs, detail) in BACKENDS.items():
        check = checks.get(needs) if needs else None
        usable = check is None or check.ok
        found.append(
            {
                "name": name,
                "decorator": decorator,
                "detail": detail,
                "usable": usable,
                "fix": f"{check.detail}: {check.fix}" if check is not None and not check.ok else None,
            }
        )
    return found


def _boolean(text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise ValueError("is not true or false")


#: How text becomes a value of each type a Parameter may name.
_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": _boolean,
    "JSONType": json.loads,
}


def _inferred_type(default: str | None) -> str:
    """The type Metaflow infers from a default written as a literal (``0.5`` a float); text otherwise."""
    if default is None:
        return "str"
    try:
        value = ast.literal_eval(default)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return "str"
    return type(value).__name__ if type(value).__name__ in _CONVERTERS else "str"


def _kind(parameter: dict[str, Any]) -> str:
    """The type a Parameter takes: the one it names, else its default's (as Metaflow infers it)."""
    return (parameter["type"] or _inferred_type(parameter["default"])).split(".")[-1]


def form_fields(declared: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The launcher form's fields: one per Parameter (IncludeFile and Config are given by file, not typed),
    with the type its value is converted to, its default as written, its help, and whether it is required."""
    return [
        {
            "name": p["name"] or p["attribute"],
            "type": _kind(p),
            "placeholder": p["default"] or "",
            "help": p["help"] or "",
            "required": p["required"] and p["default"] is None,
        }
        for p in declared
        if p["kind"] == "Parameter"
    ]


def converted(declared: list[dict[str, Any]], given: dict[str, str]) -> dict[str, Any]:
    """The form's text values as the flow's parameters take them; ``InvalidInput`` naming the parameter
    for an unknown name or a value that is not of its type. Parameters left empty keep their defaults."""
    by_name = {p["name"] or p["attribute"]: p for p in declared if p["kind"] == "Parameter"}
    values = {}
    for name, text in given.items():
        parameter = by_name.get(name)
        if parameter is None:
            raise InvalidInput(f"parameters.{name}", "is not a parameter of the flow", fix=", ".join(by_name))
        if text == "":
            continue
        kind = _kind(parameter)
        convert = _CONVERTERS.get(kind, str)
        try:
            value = convert(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise InvalidInput(f"parameters.{name}", f"{text!r} {_reason(exc, kind)}", fix=f"give a {kind}") from None
        values[name.replace("-", "_")] = value
    missing = [n for n, p in by_name.items() if p["required"] and p["default"] is None and given.get(n, "") == ""]
    if missing:
        raise InvalidInput(f"parameters.{missing[0]}", "is required", fix="give it a value")
    return values


def _reason(exc: Exception, kind: str) -> str:
    return str(exc) if str(exc).startswith("is not") else f"is not a {kind}"


def decorator_of(backend: str) -> list[str]:
    """The ``--with`` decorators of ``backend``; ``InvalidInput`` for one not offered."""
    if backend not in BACKENDS:
        raise InvalidInput("backend", f"{backend!r} is not one of {', '.join(BACKENDS)}", fix="choose local")
    decorator = BACKENDS[backend][0]
    return [decorator] if decorator else []


def launch(path: str, given: dict[str, str], backend: str, events: IO[str] | None = None) -> int:
    """Run the flow at ``path`` with the form's values on ``backend``, reporting JSON lines on ``events``
    (stdout); the run's return code."""
    events = events or sys.stdout
    try:
        source = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput("path", f"{path} cannot be read: {exc}", fix="save the flow file") from None
    values = converted(flow_graph(source, path)["parameters"], given)
    decospecs = decorator_of(backend)
    return asyncio.run(_launched(path, values, decospecs, lambda event: _emit(events, event)))


def _first_line(exc: Exception) -> str:
    """An error's first line (Metaflow puts the run's whole output after it)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _emit(events: IO[str], event: dict[str, Any]) -> None:
    events.write(json.dumps(event) + "\n")
    events.flush()


async def _launched(path: str, values: dict[str, Any], decospecs: list[str], emit: Callable[[dict], None]) -> int:
    from metaflow import Runner

    try:
        runner = Runner(path, show_output=False, cwd=os.getcwd(), decospecs=decospecs)
    except Exception as exc:  # loading the flow file ran its module code: whatever it raised is the user's
        raise StackError(
            f"{path} cannot be loaded: {_first_line(exc)}", fix="run it once: python FLOW.py check"
        ) from None
    with runner:
        try:
            executing = await runner.async_run(**values)
        except (TypeError, ValueError, RuntimeError) as exc:  # a value Runner refused, a run that did not start
            raise StackError(f"the run did not start: {_first_line(exc)}", fix="correct the form") from None
        emit({"event": "started", "run": executing.run.pathspec})
        streams = [_follow(executing, stream, emit) for stream in ("stdout", "stderr")]
        await asyncio.gather(*streams)
        await executing.wait()
        emit({"event": "finished", "status": executing.status, "returncode": executing.returncode})
        return executing.returncode or 0


async def _follow(executing: Any, stream: str, emit: Callable[[dict], None]) -> None:
    async for _, line in executing.stream_log(stream):
        emit({"event": "output", "stream": stream, "line": line})
