"""The live DAG under ``%mf_run``: an anywidget, so JupyterLab, Notebook 7 and VS Code draw it alike.

The front end (``ui/src/widget``, built into ``static/dag_widget.js``) lays
the graph out with the UI's own code and colours each step and foreach item
by its tasks' states. The kernel sends those states as the runtime
announces them (``progress``), then what the metadata recorded once the
run ends. A click on a step or an item asks the kernel for that task's
artifacts (names, types, sizes: nothing loaded) and the last lines of its
logs, through the agent's queries. Saved notebooks and nbconvert get a
static table of the same states (``text/html``).
"""

from __future__ import annotations

import contextlib
import html
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from metaflow_stack.agent.source import AgentError

#: The built front end (``just ui`` builds it with the UI).
ESM = Path(__file__).parent / "static" / "dag_widget.js"
#: Tasks of a step listed in a click's answer, artifacts and log lines of its task at most.
MAX_TASKS, MAX_ARTIFACTS, LOG_LINES = 20, 50, 20


def available() -> bool:
    """Whether the front end was built (a checkout without Node has no widget: runs just print)."""
    return ESM.exists()


class DagWidget(anywidget.AnyWidget):
    """A run's graph and the live state of its tasks (the agent's ``TaskInfo`` shape)."""

    _esm = ESM
    graph = traitlets.Dict().tag(sync=True)
    tasks = traitlets.List().tag(sync=True)
    run = traitlets.Unicode("").tag(sync=True)
    state = traitlets.Unicode("starting").tag(sync=True)
    detail = traitlets.Dict().tag(sync=True)

    def __init__(self, graph: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(graph=graph, **kwargs)
        self.on_msg(self._message)

    def _message(self, _: Any, content: Any, buffers: Any) -> None:
        if not isinstance(content, dict) or content.get("type") != "select":
            return
        try:
            self.detail = self._detail(content.get("step"), content.get("task"))
        except AgentError as exc:
            self.detail = {"error": exc.message}

    def _detail(self, step: Any, task: Any) -> dict[str, Any]:
        """What a click on a step (its last task) or an item (that task) shows: bounded, nothing unpickled."""
        from metaflow_stack.agent.queries import connect

        if not self.run:
            return {"error": "the run has not started yet"}
        if not isinstance(step, str) or step not in self.graph.get("steps", {}):
            return {"error": "no such step in this flow"}
        with connect() as queries:
            tasks = queries.run_tasks(self.run, step=step, limit=MAX_TASKS).tasks
            chosen = next((t.pathspec for t in tasks if t.pathspec == task), tasks[-1].pathspec if tasks else None)
            if chosen is None:
                return {"step": step, "error": f"step {step} has no task yet"}
            artifacts = queries.artifact_info(chosen, limit=MAX_ARTIFACTS).artifacts
            logs = {stream: queries.logs(chosen, stream, tail=LOG_LINES).lines for stream in ("stdout", "stderr")}
        return {
            "step": step,
            "task": chosen,
            "tasks": [t.model_dump(mode="json") for t in tasks],
            "artifacts": [
                {"name": a.name, "type": a.python_type, "size": a.size} for a in artifacts if not a.name.startswith("_")
            ],
            "stdout": [line.text for line in logs["stdout"]],
            "stderr": [line.text for line in logs["stderr"]],
            "show": f"%mf_show {chosen} NAME",
        }

    def recorded(self) -> None:
        """Replace the announced states with what the metadata recorded for the run (the last word)."""
        from metaflow_stack.agent.queries import connect

        if not self.run:
            return
        found: list[dict[str, Any]] = []
        with connect() as queries:
            cursor = None
            while True:
                page = queries.run_tasks(self.run, limit=1000, cursor=cursor)
                found += [task.model_dump(mode="json") for task in page.tasks]
                if not page.next_cursor:
                    break
                cursor = page.next_cursor
        self.tasks = found

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, tuple):
            data, metadata = bundle
            return {**data, "text/html": self.static_html()}, metadata
        return {**(bundle or {}), "text/html": self.static_html()}

    def static_html(self) -> str:
        """The graph's steps and their tasks' states as a table (no script): what a saved notebook keeps."""
        rows = []
        for name, step in self.graph.get("steps", {}).items():
            counts = {"completed": 0, "failed": 0, "running": 0, "killed": 0}
            own = [task for task in self.tasks if task.get("step_name") == name]
            for task in own:
                counts[task.get("status", "running")] = counts.get(task.get("status", "running"), 0) + 1
            state = next((s for s in ("running", "failed", "killed", "completed") if counts[s]), "pending")
            retried = sum(task.get("attempt", 0) for task in own)
            done = f"{counts['completed']}/{len(own)} done" if own else ""
            failed = f", {counts['failed']} failed" if counts["failed"] else ""
            failed += f", {retried} retried" if retried else ""
            rows.append(
                f'<tr data-step="{html.escape(name)}" data-status="{state}"><td><b>{html.escape(name)}</b></td>'
                f"<td>{html.escape(step.get('type', ''))}</td><td>{html.escape(', '.join(step.get('next', [])))}</td>"
                f"<td>{state}</td><td>{done}{failed}</td></tr>"
            )
        title = html.escape(f"{self.run or 'run'}: {self.state}")
        return (
            f'<div class="mf-dag-static"><p><b>{title}</b></p><table><thead><tr><th>step</th><th>type</th>'
            f"<th>next</th><th>status</th><th>tasks</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )


class LiveDag:
    """A run's widget, displayed under the cell and kept up to date while ``following()`` runs the flow."""

    def __init__(self, flow: str, flow_file: str) -> None:
        from IPython.display import display

        from metaflow_stack.notebook.progress import Progress, graph_of

        graph = graph_of(flow_file)
        self.flow = flow
        self.widget = DagWidget(graph)
        self.progress = Progress(flow, graph, self._announced)
        self.handle = display(self.widget, display_id=True)

    def _announced(self, tasks: list[dict[str, Any]]) -> None:
        if self.progress.run_id and not self.widget.run:
            self.widget.run = f"{self.flow}/{self.progress.run_id}"
            self.widget.state = "running"
        self.widget.tasks = tasks

    def finished(self, run: Any) -> None:
        """The run is over: its recorded states, and the saved output (static table) brought up to date."""
        self.widget.run = run.pathspec
        self.widget.state = "completed" if run.successful else "failed"
        with contextlib.suppress(AgentError):  # the announced states stay: the outcome is shown above anyway
            self.widget.recorded()
        if self.handle is not None:
            self.handle.update(self.widget)
