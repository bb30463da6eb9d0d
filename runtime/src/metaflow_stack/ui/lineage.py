"""Where an artifact's value came from and where it went: across the run's DAG and across runs.

Metaflow records what each task stored, not what it read, but every value
is content-addressed: a step whose tasks hold a hash that none of its
parent steps held set that value (``produced``); a step holding only hashes
its parents held received it unchanged (``carried``; Metaflow hands every
artifact on, and a join keeps what it merges); a parameter is produced by
the run's ``_parameters`` task, the parent of the start step. The same hash stored by
other runs, of this flow or another, is the same value: a model that a
scoring flow loaded from a training run and kept shows up there, and the
oldest holder is where it was first stored. Everything is read from the
artifacts' records (names and hashes); no value is loaded.
"""

from __future__ import annotations

from typing import Any

from metaflow_stack.agent.models import ArtifactInfo
from metaflow_stack.agent.queries import MAX_ARTIFACTS, Queries
from metaflow_stack.agent.source import AgentError, pathspec_parts
from metaflow_stack.ui.compare import all_flows
from metaflow_stack.ui.details import Details

#: Records of the same value listed from elsewhere (per flow) and flows searched for it.
MAX_ELSEWHERE = 50
MAX_FLOWS = 20


def _in_run(queries: Queries, run: str, name: str) -> list[ArtifactInfo]:
    """Every task's record of ``name`` in ``run``, page after page."""
    found, cursor = [], None
    while True:
        page = queries.search_artifacts(run, name=name, limit=MAX_ARTIFACTS, cursor=cursor)
        found += page.artifacts
        if not (cursor := page.next_cursor):
            return found


def _steps(graph: dict[str, Any], records: list[ArtifactInfo], parameter: str | None) -> list[dict[str, Any]]:
    """Each step of the graph with the values it held and its role: produced, carried or absent
    (``_parameters`` first when the artifact is a parameter whose value is ``parameter``)."""
    held: dict[str, dict[str, int]] = {"_parameters": {parameter: 1}} if parameter else {}
    for record in records:
        values = held.setdefault(record.pathspec.split("/")[2], {})
        values[record.sha or ""] = values.get(record.sha or "", 0) + 1
    parents: dict[str, list[str]] = {graph["start_step"]: ["_parameters"]}
    for name, step in graph["steps"].items():
        for after in step["next"]:
            parents.setdefault(after, []).append(name)
    steps = []
    for name in ["_parameters", *graph["steps"]] if parameter else graph["steps"]:
        values = held.get(name, {})
        inherited = {sha for parent in parents.get(name, []) for sha in held.get(parent, {})}
        new = [sha for sha in values if sha not in inherited]
        steps.append(
            {
                "step": name,
                "role": "produced" if new else ("carried" if values else "absent"),
                "values": [{"sha": sha, "tasks": count, "new": sha in new} for sha, count in values.items()],
            }
        )
    return steps


def _elsewhere(queries: Queries, flows: list[str], flow: str, run: str, sha: str) -> dict[str, Any]:
    """Records of the value ``sha`` outside ``run``: this flow first, then up to ``MAX_FLOWS`` others."""
    found: list[ArtifactInfo] = []
    truncated = False
    others = [f for f in flows if f != flow]
    for name in [flow, *others[:MAX_FLOWS]]:
        page = queries.search_artifacts(name, sha=sha, limit=MAX_ELSEWHERE)
        found += [a for a in page.artifacts if not a.pathspec.startswith(f"{flow}/{run}/")]
        truncated = truncated or page.truncated
    return {
        "records": [a.model_dump() for a in found],
        "truncated": truncated or len(others) > MAX_FLOWS,
        "flows_searched": 1 + min(len(others), MAX_FLOWS),
    }


def lineage(queries: Queries, source: Details, task: str, name: str) -> dict[str, Any]:
    """The lineage of artifact ``name`` of ``task`` (Flow/run/step/task)."""
    flow, run, _, _ = pathspec_parts(task, 4, "task")
    records = [r for r in _in_run(queries, f"{flow}/{run}", name) if not r.pathspec.split("/")[2].startswith("_")]
    this = next((r for r in records if r.pathspec == task), None)
    if this is None:
        raise AgentError("not_found", f"artifact {name} of {task} does not exist")
    graph = source.graph(flow, run)
    parameter = source.parameters_artifacts(flow, run).get(name, (None,))[0] if name in graph["parameters"] else None
    steps = _steps(graph, records, parameter)
    sha = this.sha or ""
    return {
        "artifact": this.model_dump(),
        "steps": steps,
        "produced_in": [s["step"] for s in steps if any(v["sha"] == sha and v["new"] for v in s["values"])],
        "carried_into": [s["step"] for s in steps if any(v["sha"] == sha and not v["new"] for v in s["values"])],
        "elsewhere": _elsewhere(queries, all_flows(queries), flow, run, sha) if this.sha else None,
    }
