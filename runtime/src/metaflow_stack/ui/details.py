"""What the UI shows beyond the agent's answers, whatever the source: the
run's graph and parameters, and previews of values.

Metaflow records the flow's structure for every run as the ``_graph_info``
artifact of the run's ``_parameters`` task, written as plain data, so it is
read with ``plain_loads`` like any preview; the parameters are that task's
other artifacts. A source says where that task's artifacts are
(``parameters_artifacts``) and how values are read (``blobs``).
"""

from __future__ import annotations

from typing import Any

from metaflow_stack.agent.source import AgentError
from metaflow_stack.datastore.blobs import Blobs
from metaflow_stack.datastore.previews import NotPlainData, plain_loads


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
        try:
            info = plain_loads(self.blobs.read(flow, artifacts["_graph_info"][0]))
        except NotPlainData as exc:
            raise AgentError("bad_artifact", f"the graph of {flow}/{run} is not plain data ({exc})") from None
        steps = info.get("steps") if isinstance(info, dict) else None
        if not isinstance(steps or {}, dict) or not all(isinstance(step, dict) for step in (steps or {}).values()):
            raise AgentError("bad_artifact", f"the graph of {flow}/{run} is not the shape Metaflow records")
        parameters = {}
        names = [_text(p.get("name")) for p in _list(info.get("parameters")) if isinstance(p, dict)]
        for name in filter(None, names):
            found = artifacts.get(name)
            parameters[name] = self.blobs.preview(flow, *found) if found else "(not recorded)"
        # Only text and lists of text leave here: a recorded graph is data from the flow, answered as JSON.
        return {
            "start_step": _text(info.get("start_step")) or "start",
            "end_step": _text(info.get("end_step")) or "end",
            "file": _text(info.get("file")),
            "doc": _text(info.get("doc")),
            "parameters": parameters,
            "steps": {
                str(name): {
                    "type": _text(step.get("type")),
                    "next": _texts(step.get("next")),
                    "foreach_artifact": _text(step.get("foreach_artifact")),
                    "matching_join": _text(step.get("matching_join")),
                    "doc": _text(step.get("doc")),
                    "decorators": _texts([d.get("name") for d in _list(step.get("decorators")) if isinstance(d, dict)]),
                }
                for name, step in (steps or {}).items()
            },
        }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _texts(value: Any) -> list[str]:
    return [item for item in _list(value) if isinstance(item, str)]
