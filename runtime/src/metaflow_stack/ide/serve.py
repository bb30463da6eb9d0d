"""``metaflow ide serve``: one helper process an editor keeps, asked in JSON lines on stdin, answering on stdout.

Starting Python and importing Metaflow costs most of a second, far more than
a keystroke may wait, so the editor starts this once and asks it again and
again. Each request is one line, ``{"id", "method", "params"}``, validated
with pydantic; each answer is one line with the same ``id`` and either
``result`` or ``error`` (``{code, message, fix}``, as every ``--json``
command prints errors). A line longer than ``MAX_LINE`` is refused without
being read whole; the process ends when stdin closes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import IO, Any, Literal

from pydantic import BaseModel, Field, ValidationError

from metaflow_stack.errors import InvalidInput, StackError
from metaflow_stack.ide.graph import flow_graph

#: Bytes of one request at most (a flow file of a few MiB, as JSON).
MAX_LINE = 8 * 1024 * 1024


class GraphParams(BaseModel):
    """The buffer as the editor has it now (saved or not), and its file's path (for line numbers' file)."""

    path: str = Field(max_length=4096)
    source: str


class Request(BaseModel):
    id: int | str
    method: Literal["graph"]
    params: GraphParams


def _graph(params: GraphParams) -> dict[str, Any]:
    return flow_graph(params.source, params.path)


#: What each method does with its parameters.
METHODS: dict[str, Callable[[Any], dict[str, Any]]] = {"graph": _graph}


def answer(line: str) -> dict[str, Any]:
    """The answer to one request line."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        return {
            "id": None,
            **InvalidInput("request", f"is not JSON ({exc.msg})", fix="send one JSON object a line").to_dict(),
        }
    try:
        request = Request.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "request"
        ident = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), int | str) else None
        return {"id": ident, **InvalidInput(field, first["msg"], fix='{"id", "method": "graph", "params"}').to_dict()}
    try:
        return {"id": request.id, "result": METHODS[request.method](request.params)}
    except StackError as exc:
        return {"id": request.id, **exc.to_dict()}
    except (RecursionError, MemoryError, ValueError) as exc:  # a source built to exhaust the parser: refused
        refused = InvalidInput("params.source", f"cannot be read as a flow ({type(exc).__name__})")
        return {"id": request.id, **refused.to_dict()}


def serve(requests: IO[bytes] | None = None, answers: IO[str] | None = None) -> None:
    """Answer request lines from ``requests`` (stdin) on ``answers`` (stdout) until the input ends."""
    requests = requests or sys.stdin.buffer
    answers = answers or sys.stdout
    while True:
        line = requests.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # the rest of the line, read and dropped
                line = requests.readline(MAX_LINE)
            reply = {"id": None, **InvalidInput("request", f"is longer than {MAX_LINE:,} bytes").to_dict()}
        else:
            reply = answer(line.decode("utf-8", errors="replace"))
        answers.write(json.dumps(reply) + "\n")
        answers.flush()
