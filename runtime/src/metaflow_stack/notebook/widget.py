"""The live DAG under ``%mf_run``: an anywidget, so JupyterLab, Notebook 7 and VS Code draw it alike.

The front end (``ui/src/widget``, built into ``static/dag_widget.js``) lays
the graph out with the UI's own code and colours each step and foreach item
by its tasks' states. The kernel sends those states as the runtime
announces them (``progress``), then what the metadata recorded once the
run ends: at most the tasks a step draws, beside each step's counts of all
its tasks (``progress.shown``), so a foreach of thousands stays a few
kilobytes an update. A click on a step or an item asks the kernel for that
task's artifacts (names, types, sizes: nothing loaded) and the last lines
of its logs, through the agent's queries. Saved notebooks and nbconvert get a
static table of the same states (``text/html``).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from metaflow_stack.agent.source import AgentError
from metaflow_stack.notebook.progress import COUNTED, Progress, graph_of, shown

#: The built front end (``just ui`` builds it with the UI).
ESM = Path(__file__).parent / "static" / "dag_widget.js"
#: Artifacts (Metaflow's own among them, then left out) and log lines a click's answer lists at most.
MAX_ARTIFACTS, LOG_LINES = 200, 20
#: A task id as Metaflow's datastores write them (digits locally; letters, - and _ elsewhere).
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Tasks read from the metadata once the run is over (their counts are what the widget says of them).
MAX_RECORDED = 10_000


def available() -> bool:
    """Whether the front end was built (a checkout without Node has no widget: runs just print)."""
    return ESM.exists()


class DagWidget(anywidget.AnyWidget):
    """A run's graph and the live state of its tasks (the agent's ``TaskInfo`` shape)."""

    # anywidget reads the file as the class is defined: without the build, a module that draws nothing
    # (``available()`` keeps it from being used)
    _esm = ESM if ESM.exists() else "export default {};"
    graph = traitlets.Dict().tag(sync=True)
    #: At most ``progress.SHOWN_PER_STEP`` tasks of each step: what it draws.
    tasks = traitlets.List().tag(sync=True)
    #: Each step's counts of all its tasks by status, with their total and retries (``progress.COUNTED``).
    counts = traitlets.Dict().tag(sync=True)
    run = traitlets.Unicode("").tag(sync=True)
    state = traitlets.Unicode("starting").tag(sync=True)
    detail = traitlets.Dict().tag(sync=True)

    def __init__(self, graph: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(graph=graph, **kwargs)
        self.on_msg(self._message)

    def _message(self, _: Any, content: Any, buffers: Any) -> None:
        """A click in the front end (untrusted input: only a step of this flow, or a task of this run)."""
        if not isinstance(content, dict) or content.get("type") != "select":
            return
        try:
            self.detail = self._detail(content.get("step"), content.get("task"))
        except AgentError as exc:
            self.detail = {"error": exc.message}
        except Exception as exc:  # shown where the user clicked: a comm handler's traceback goes nowhere
            self.detail = {"error": f"cannot read that task: {type(exc).__name__}: {exc}"}

    def _detail(self, step: Any, task: Any) -> dict[str, Any]:
        """What a click on an item (that task) or a step (its first task) shows: bounded, nothing unpickled."""
        from metaflow_stack.agent.queries import connect

        if not self.run:
            return {"error": "the run has not started yet"}
        if not isinstance(step, str) or step not in self.graph.get("steps", {}):
            return {"error": "no such step in this flow"}
        if task is not None and not _task_of(task, f"{self.run}/{step}/"):
            return {"error": "no such task in this run"}
        with connect() as queries:
            if task is None:
                first = queries.run_tasks(self.run, step=step, limit=1).tasks
                if not first:
                    return {"step": step, "error": f"step {step} has no task yet"}
                task = first[0].pathspec
            listed = queries.artifact_info(task, limit=MAX_ARTIFACTS)
            logs = {stream: queries.logs(task, stream, tail=LOG_LINES).lines for stream in ("stdout", "stderr")}
        own = [a for a in listed.artifacts if not a.name.startswith("_")]
        return {
            "step": step,
            "task": task,
            "artifacts": [{"name": a.name, "type": a.python_type, "size": a.size} for a in own],
            "more": listed.truncated,
            "stdout": [line.text for line in logs["stdout"]],
            "stderr": [line.text for line in logs["stderr"]],
            "show": f"%mf_show {task} NAME",
        }

    def show(self, tasks: list[dict[str, Any]], counts: dict[str, dict[str, int]]) -> None:
        """Show ``progress.shown``'s tasks and counts: sent together, so no view draws one without the other."""
        with self.hold_sync():
            self.tasks, self.counts = tasks, counts

    def recorded(self) -> None:
        """Replace the announced states with what the metadata recorded for the run (the last word)."""
        from metaflow_stack.agent.queries import connect

        if not self.run:
            return
        found: list[dict[str, Any]] = []
        with connect() as queries:
            cursor = None
            while len(found) < MAX_RECORDED:
                page = queries.run_tasks(self.run, limit=1000, cursor=cursor)
                found += [task.model_dump(mode="json") for task in page.tasks]
                if not page.next_cursor:
                    break
                cursor = page.next_cursor
        self.show(*shown(found))

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
            counts = self.counts.get(name) or dict.fromkeys(COUNTED, 0)
            state = next((s for s in ("running", "failed", "killed", "completed") if counts[s]), "pending")
            done = f"{counts['completed']}/{counts['total']} done" if counts["total"] else ""
            failed = f", {counts['failed']} failed" if counts["failed"] else ""
            failed += f", {counts['retried']} retried" if counts["retried"] else ""
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


def _task_of(task: Any, prefix: str) -> bool:
    """Whether ``task`` is a task pathspec under ``prefix`` (the run and step clicked)."""
    return isinstance(task, str) and task.startswith(prefix) and _TASK_ID.fullmatch(task[len(prefix) :]) is not None


class LiveDag:
    """A run's widget, displayed under the cell; ``progress.watching()`` keeps it up to date while the flow
    runs, ``finished`` or ``stopped`` closes it."""

    def __init__(self, flow: str, flow_file: str) -> None:
        from IPython.display import display

        graph = graph_of(flow_file)
        self.flow = flow
        self.widget = DagWidget(graph)
        self.progress = Progress(flow, graph, self._announced)
        self.handle = display(self.widget, display_id=True)

    def _announced(self, tasks: list[dict[str, Any]], counts: dict[str, dict[str, int]]) -> None:
        if self.progress.run_id and not self.widget.run:
            self.widget.run = f"{self.flow}/{self.progress.run_id}"
            self.widget.state = "running"
        self.widget.show(tasks, counts)

    def finished(self, run: Any) -> None:
        """The run is over: its recorded states, and the saved output (static table) brought up to date."""
        self.widget.run = run.pathspec
        try:
            self.widget.recorded()
        except Exception:  # the outcome is shown above anyway: the announced states stay, none left running
            self.progress.settle("killed")
        self.stopped("completed" if run.successful else "failed")

    def stopped(self, state: str) -> None:
        """The run ended as ``state`` (or never started): said in the widget and in what the notebook saves."""
        self.widget.state = state
        if self.handle is not None:
            self.handle.update(self.widget)
