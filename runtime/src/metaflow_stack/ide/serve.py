"""``metaflow ide serve``: one helper process an editor keeps, asked in JSON lines on stdin, answering on stdout.

Starting Python and importing Metaflow costs most of a second, far more than
a keystroke may wait, so the editor starts this once and asks it again and
again. Each request is one line, ``{"id", "method", "params"}``, validated
with pydantic (``METHODS`` lists them: the flow's graph, the runs sidebar's
listings and previews, cards, a debug configuration, the launcher's
backends); each answer is one line with the same ``id`` and either
``result`` or ``error`` (``{code, message, fix}``, as every ``--json``
command prints errors). A line longer than ``MAX_LINE`` is refused without
being read whole; the process ends when stdin closes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metaflow_stack.agent.source import pathspec_parts
from metaflow_stack.errors import InvalidInput, StackError
from metaflow_stack.ide import debug, launch
from metaflow_stack.ide.browse import Browser
from metaflow_stack.ide.graph import flow_graph

#: Bytes of one request at most (a flow file of a few MiB, as JSON).
MAX_LINE = 8 * 1024 * 1024

_Name = Field(max_length=4096)
_Limit = Field(default=100, ge=1, le=1000)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GraphParams(Params):
    """The buffer as the editor has it now (saved or not), and its file's path (for line numbers' file)."""

    path: str = _Name
    #: A flow file's text: parsing costs time and memory many times its size (7 MiB of list: 15 s, 3.8 GB).
    source: str = Field(max_length=512 * 1024)


class Nothing(Params):
    pass


class FlowsParams(Params):
    limit: int = _Limit
    cursor: str | None = None


class RunsParams(Params):
    flow: str = _Name
    status: str | None = None
    tags: list[str] = Field(default_factory=list, max_length=50)
    user: str | None = None
    limit: int = _Limit
    cursor: str | None = None


class RunParams(Params):
    run: str = _Name


class TasksParams(Params):
    run: str = _Name
    step: str | None = None
    limit: int = _Limit
    cursor: str | None = None


class TaskParams(Params):
    task: str = _Name


class ArtifactsParams(Params):
    task: str = _Name
    limit: int = Field(default=200, ge=1, le=1000)
    cursor: str | None = None


class ArtifactParams(Params):
    task: str = _Name
    name: str = _Name
    full: bool = False


class CardParams(Params):
    task: str = _Name
    file: str = _Name


class DebugParams(Params):
    """Debug ``step`` of the flow at ``path`` (the whole flow when None), spun on ``task`` or on the newest
    completed task of the step in ``run`` or the recent runs."""

    path: str = _Name
    #: A flow file's text: parsing costs time and memory many times its size (7 MiB of list: 15 s, 3.8 GB).
    source: str = Field(max_length=512 * 1024)
    step: str | None = None
    run: str | None = None
    task: str | None = None
    python: str | None = None


def _debug(browser: Browser, params: DebugParams) -> dict[str, Any]:
    """The configuration, and the task spun on (None: the whole flow runs, as no earlier task was found)."""
    graph = flow_graph(params.source, params.path)
    if params.step is not None and params.step not in graph["steps"]:
        raise InvalidInput("params.step", f"{params.step!r} is not a step of {graph['flow']}")
    task = params.task
    if task is not None:
        flow, _, step, _ = pathspec_parts(task, 4, "params.task")
        if (flow, step) != (graph["flow"], params.step):
            raise InvalidInput("params.task", f"{task} is not a task of {graph['flow']}'s step {params.step}")
    if params.step is not None and task is None:
        task = debug.task_to_spin(browser.queries, graph["flow"], params.step, params.run)
    configuration = debug.configuration(params.path, graph["flow"], params.step, task, params.python)
    return {"configuration": configuration, "task": task if params.step is not None else None}


def _form(params: GraphParams) -> dict[str, Any]:
    """What the launcher's form shows: the flow, and a field per Parameter typed as its value will be."""
    graph = flow_graph(params.source, params.path)
    return {"flow": graph["flow"], "fields": launch.form_fields(graph["parameters"])}


def _model(answer: Any) -> Any:
    return answer.model_dump() if isinstance(answer, BaseModel) else answer


#: Each method: what its parameters are, and what it answers with them.
METHODS: dict[str, tuple[type[Params], Callable[[Browser, Any], Any]]] = {
    "graph": (GraphParams, lambda _, p: flow_graph(p.source, p.path)),
    "profile": (Nothing, lambda b, _: b.profile()),
    "flows": (FlowsParams, lambda b, p: b.queries.list_flows(p.limit, p.cursor)),
    "runs": (
        RunsParams,
        lambda b, p: b.queries.list_runs(p.flow, p.status, tags=p.tags, user=p.user, limit=p.limit, cursor=p.cursor),
    ),
    "summary": (RunParams, lambda b, p: b.queries.run_summary(p.run)),
    "tasks": (TasksParams, lambda b, p: b.queries.run_tasks(p.run, p.step, limit=p.limit, cursor=p.cursor)),
    "artifacts": (ArtifactsParams, lambda b, p: b.queries.artifact_info(p.task, limit=p.limit, cursor=p.cursor)),
    "preview": (ArtifactParams, lambda b, p: b.preview(p.task, p.name, p.full)),
    "cards": (TaskParams, lambda b, p: b.cards(p.task)),
    "card": (CardParams, lambda b, p: b.card(p.task, p.file)),
    "debug": (DebugParams, _debug),
    "backends": (Nothing, lambda _, __: launch.backends()),
    "form": (GraphParams, lambda _, p: _form(p)),
    "reconnect": (Nothing, lambda b, _: b.forget()),
}


class Request(BaseModel):
    id: int | str
    method: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)


def _refused(ident: Any, exc: ValidationError, prefix: str, model: type[BaseModel]) -> dict[str, Any]:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "") or "request"
    fix = f"{prefix or 'a request'} takes {', '.join(model.model_fields) or 'nothing'}"
    return {"id": ident, **InvalidInput(field, first["msg"], fix=fix).to_dict()}


def answer(line: str, browser: Browser | None = None) -> dict[str, Any]:
    """The answer to one request line; ``browser`` holds the connection to the runs (made on first use)."""
    browser = browser or Browser()
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        return {
            "id": None,
            **InvalidInput("request", f"is not JSON ({exc.msg})", fix="send one JSON object a line").to_dict(),
        }
    except ValueError:  # (an integer past Python's 4,300 digits: read as JSON, refused as a number)
        return {
            "id": None,
            **InvalidInput("request", "holds a number too long to read", fix="send it as a string").to_dict(),
        }
    except RecursionError:  # (nested past the parser's depth: it would end the helper)
        return {"id": None, **InvalidInput("request", "is nested too deeply", fix="send the request flat").to_dict()}
    try:
        request = Request.model_validate(raw)
    except ValidationError as exc:
        ident = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), int | str) else None
        return _refused(ident, exc, "", Request)
    if request.method not in METHODS:
        refused = InvalidInput("method", f"{request.method!r} is not one of {', '.join(METHODS)}")
        return {"id": request.id, **refused.to_dict()}
    model, handler = METHODS[request.method]
    try:
        params = model.model_validate(request.params)
    except ValidationError as exc:
        return _refused(request.id, exc, "params", model)
    try:
        return {"id": request.id, "result": _model(handler(browser, params))}
    except StackError as exc:
        return {"id": request.id, **exc.to_dict()}
    except Exception as exc:  # what went wrong reading the runs is the answer: the helper serves on
        return _internal(
            request.id, f"{request.method} failed: {type(exc).__name__}: {exc}", "look at the datastore named"
        )


def _internal(ident: int | str | None, message: str, fix: str) -> dict[str, Any]:
    """An ``internal_error`` answer: what failed on this side, never the request's fault."""
    failed = StackError(message, fix=fix)
    return {"id": ident, "error": {**failed.to_dict()["error"], "code": "internal_error"}}


def serve(requests: IO[bytes] | None = None, answers: IO[str] | None = None) -> None:
    """Answer request lines from ``requests`` (stdin) on ``answers`` (stdout) until the input ends."""
    requests = requests or sys.stdin.buffer
    answers = answers or sys.stdout
    browser = Browser()
    while True:
        line = requests.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):  # the rest of the line, read and dropped
                line = requests.readline(MAX_LINE)
            reply = {"id": None, **InvalidInput("request", f"is longer than {MAX_LINE:,} bytes").to_dict()}
        else:
            reply = answer(line.decode("utf-8", errors="replace"), browser)
        answers.write(_line(reply) + "\n")
        answers.flush()


def _line(reply: dict[str, Any]) -> str:
    """The reply as one line of strict JSON; a result that is not (NaN, bytes) is an ``internal_error`` answer
    instead, so the editor hears why and the helper serves on."""
    try:
        return json.dumps(reply, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        message = f"the answer is not JSON: {type(exc).__name__}: {exc}"
        return json.dumps(_internal(reply.get("id"), message, "report it with the request"))
