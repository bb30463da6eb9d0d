"""Two runs side by side: what changed in parameters, results, metrics and timing.

A run's results are the artifacts of its end task (what Metaflow's
``Run.data`` shows); two artifacts are the same when their content hashes
are equal, so nothing is loaded to tell. Metrics are the numeric plain
values among them (previewed, never unpickled with code), compared as
numbers. Timing is each step's wall time, first start to last end.
"""

from __future__ import annotations

from typing import Any

from metaflow_stack.agent.models import TaskInfo
from metaflow_stack.agent.queries import MAX_FLOWS, MAX_TASKS, Queries
from metaflow_stack.agent.source import pathspec_parts
from metaflow_stack.ui.details import Details

#: Recorded Python types whose previews are numbers.
NUMERIC = {"int", "float", "numpy.float64", "numpy.float32", "numpy.int64", "numpy.int32"}


def all_flows(queries: Queries) -> list[str]:
    """Every flow's name, alphabetically, page after page."""
    names, cursor = [], None
    while True:
        page = queries.list_flows(limit=MAX_FLOWS, cursor=cursor)
        names += [flow.name for flow in page.flows]
        if not (cursor := page.next_cursor):
            return sorted(names)


def all_tasks(queries: Queries, run: str) -> list[TaskInfo]:
    """Every task of ``run``, page after page."""
    tasks, cursor = [], None
    while True:
        page = queries.run_tasks(run, limit=MAX_TASKS, cursor=cursor)
        tasks += page.tasks
        if not (cursor := page.next_cursor):
            return tasks


def _side(queries: Queries, source: Details, run: str) -> dict[str, Any]:
    flow, number = pathspec_parts(run, 2, "run")
    summary = queries.run_summary(run)
    graph = source.graph(flow, number)
    tasks = all_tasks(queries, run)
    ends = [t for t in tasks if t.step_name == graph["end_step"] and t.status == "completed"]
    results = {}
    if ends:
        for artifact in queries.artifact_info(ends[0].pathspec, limit=1000).artifacts:
            if not artifact.name.startswith("_") and artifact.name not in graph["parameters"]:
                preview = source.blobs.preview(flow, artifact.sha, artifact.size) if artifact.sha else None
                results[artifact.name] = {**artifact.model_dump(), "preview": preview}
    steps: dict[str, list[int]] = {}
    for task in tasks:
        span = steps.setdefault(task.step_name, [task.started_at, task.finished_at or task.started_at])
        span[0] = min(span[0], task.started_at)
        span[1] = max(span[1], task.finished_at or task.started_at)
    return {
        "summary": summary,
        "parameters": graph["parameters"],
        "results": results,
        "step_ms": {name: end - start for name, (start, end) in steps.items()},
    }


def _number(artifact: dict[str, Any] | None) -> float | None:
    if artifact is None or artifact["python_type"] not in NUMERIC or artifact["preview"] is None:
        return None
    try:
        return float(artifact["preview"])
    except ValueError:
        return None


def compare(queries: Queries, source: Details, a: str, b: str) -> dict[str, Any]:
    """Run ``a`` (the baseline) against run ``b``."""
    left, right = _side(queries, source, a), _side(queries, source, b)
    names = list(dict.fromkeys([*left["parameters"], *right["parameters"]]))
    parameters = [
        {
            "name": name,
            "a": left["parameters"].get(name),
            "b": right["parameters"].get(name),
            "changed": left["parameters"].get(name) != right["parameters"].get(name),
        }
        for name in names
    ]
    results, metrics = [], []
    for name in dict.fromkeys([*left["results"], *right["results"]]):
        mine, theirs = left["results"].get(name), right["results"].get(name)
        same = mine is not None and theirs is not None and mine["sha"] == theirs["sha"]
        results.append({"name": name, "a": mine, "b": theirs, "same": same})
        x, y = _number(mine), _number(theirs)
        if x is not None and y is not None:
            metrics.append({"name": name, "a": x, "b": y, "delta": y - x, "relative": (y - x) / x if x else None})
    steps = [
        {"step": step, "a_ms": left["step_ms"].get(step), "b_ms": right["step_ms"].get(step)}
        for step in dict.fromkeys([*left["step_ms"], *right["step_ms"]])
    ]
    return {
        "a": left["summary"],
        "b": right["summary"],
        "parameters": parameters,
        "results": results,
        "metrics": metrics,
        "steps": steps,
    }
