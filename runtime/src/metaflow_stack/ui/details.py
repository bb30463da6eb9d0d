"""What the UI shows beyond the agent's answers, whatever the source: the
run's graph and parameters, and previews of values.

Metaflow records the flow's structure for every run as the ``_graph_info``
artifact of the run's ``_parameters`` task, written as plain data, so it is
read with ``plain_loads`` like any preview; the parameters are that task's
other artifacts. A source says where that task's artifacts are
(``parameters_artifacts``) and how values are read (``blobs``).

The run page, compare and lineage each read the graph, and a task writes
it: it is read within a preview's bound (``MAX_PREVIEW_BYTES``, checked
against the size recorded and then against the bytes read, since a task
records its own sizes), and answered only up to ``MAX_GRAPH_CHARACTERS`` of
text (a pickle can share one long docstring between every step: gigabytes
of JSON from a 1 MiB graph). A graph is stored by its content hash, so what
is made of it is kept for the next request.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from metaflow_stack.agent.source import AgentError
from metaflow_stack.datastore.blobs import Blobs
from metaflow_stack.datastore.previews import MAX_PREVIEW_BYTES, NotPlainData, plain_loads


class Details:
    """Graphs and parameters; subclasses are the sources."""

    blobs: Blobs

    def parameters_artifacts(self, flow: str, run: str) -> dict[str, tuple[str, int | None]]:
        """The ``_parameters`` task's artifacts: name to (content hash, stored size)."""
        raise NotImplementedError

    def graph(self, flow: str, run: str) -> dict[str, Any]:
        """The flow's structure as recorded for this run (steps with types, next steps, joins) and its
        parameters, rendered."""
        artifacts = self.parameters_artifacts(flow, run)
        if "_graph_info" not in artifacts:
            raise AgentError("not_found", f"run {flow}/{run} has no recorded graph")
        sha, size = artifacts["_graph_info"]
        try:  # a size that is not a number (a task writes it) is not one to trust: the bytes read still bound it
            shape = _shape(self.blobs, flow, sha, size if isinstance(size, int) else None)
        except _Refused as exc:
            raise AgentError(exc.code, f"the graph of {flow}/{run} {exc}") from None
        parameters = {}
        for name in shape["parameters"]:
            found = artifacts.get(name)
            parameters[name] = self.blobs.preview(flow, *found) if found else "(not recorded)"
        return {**shape, "parameters": parameters}


#: Characters of text a graph is answered with at most: its pickle's bound, four times over for the short
#: strings (step types, decorator names) Metaflow's graphs share between steps.
MAX_GRAPH_CHARACTERS = 4 * MAX_PREVIEW_BYTES
#: The largest graph pickle kept parsed between requests (64 of them at most): a 1 MiB one parses into tens of
#: MB of small objects, which 64 runs could make the UI hold.
CACHED_GRAPH_BYTES = 64 * 1024


class _Refused(Exception):
    """Why a recorded graph is not shown, and the error code that says so."""

    def __init__(self, code: str, why: str) -> None:
        super().__init__(why)
        self.code = code


def _shape(blobs: Blobs, flow: str, sha: str, size: int | None) -> dict[str, Any]:
    """The recorded graph's text, its parameters by name only (their values are previewed per request). A
    graph of ``CACHED_GRAPH_BYTES`` or less (Metaflow's are a few KB) is read and parsed once; a larger one
    (a run wrote it) on every request, so what the cache holds stays bounded. A refusal is not kept."""
    too_large = _Refused("too_large", f"is larger than {MAX_PREVIEW_BYTES // 2**20} MiB")
    if size is not None and size > MAX_PREVIEW_BYTES:
        raise too_large
    shape = _small_shape(blobs, flow, sha) if size is None or size <= CACHED_GRAPH_BYTES else None
    if shape is not None:
        return shape
    data = blobs.read(flow, sha, limit=MAX_PREVIEW_BYTES)
    if len(data) > MAX_PREVIEW_BYTES:
        raise too_large
    return _parsed(data)


@lru_cache(maxsize=64)
def _small_shape(blobs: Blobs, flow: str, sha: str) -> dict[str, Any] | None:
    """``_parsed`` of the graph of ``sha`` (a content hash: one graph for ever) if its pickle is of
    ``CACHED_GRAPH_BYTES`` or less; None (kept too: it is known to be larger) if not."""
    data = blobs.read(flow, sha, limit=CACHED_GRAPH_BYTES)
    return _parsed(data) if len(data) <= CACHED_GRAPH_BYTES else None


def _parsed(data: bytes) -> dict[str, Any]:
    """A graph's pickle as the shape answered, only text and lists of text; ``_Refused`` for one of another
    shape or too much text."""
    try:
        info = plain_loads(data)
    except NotPlainData as exc:
        raise _Refused("bad_artifact", f"is not plain data ({exc})") from None
    steps = info.get("steps") if isinstance(info, dict) else None
    steps = steps or {}
    if not isinstance(steps, dict) or not all(isinstance(n, str) and isinstance(s, dict) for n, s in steps.items()):
        raise _Refused("bad_artifact", "is not the shape Metaflow records")
    names = [_text(p.get("name")) for p in _list(info.get("parameters")) if isinstance(p, dict)]
    # Only text and lists of text leave here: a recorded graph is data from the flow, answered as JSON.
    shape = {
        "start_step": _text(info.get("start_step")) or "start",
        "end_step": _text(info.get("end_step")) or "end",
        "file": _text(info.get("file")),
        "doc": _text(info.get("doc")),
        "parameters": list(filter(None, names)),
        "steps": {
            name: {
                "type": _text(step.get("type")),
                "next": _texts(step.get("next")),
                "foreach_artifact": _text(step.get("foreach_artifact")),
                "matching_join": _text(step.get("matching_join")),
                "doc": _text(step.get("doc")),
                "decorators": _texts([d.get("name") for d in _list(step.get("decorators")) if isinstance(d, dict)]),
            }
            for name, step in steps.items()
        },
    }
    if _characters(shape) > MAX_GRAPH_CHARACTERS:
        raise _Refused("too_large", f"is more than {MAX_GRAPH_CHARACTERS:,} characters of text")
    return shape


def _characters(value: Any) -> int:
    """The characters of the text in ``value``, a shape of dicts, lists and text, counted as JSON would
    repeat it: a string shared by every step counts once for each."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(key) + _characters(item) for key, item in value.items())
    return sum(map(_characters, value)) if isinstance(value, list) else 0


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _texts(value: Any) -> list[str]:
    return [item for item in _list(value) if isinstance(item, str)]
