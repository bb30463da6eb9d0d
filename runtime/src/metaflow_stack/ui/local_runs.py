"""What the UI reads from a local datastore beyond the agent's answers.

The flow's graph is the ``_graph_info`` artifact of the run's ``_parameters``
task (Metaflow writes it as plain data, so it is read with ``plain_loads``);
parameters are that task's other artifacts. A task's attempts and metadata
are Metaflow's small ``_meta`` files. Artifact values are content-addressed
blobs under ``<root>/<flow>/data/<sha[:2]>/<sha>``, gzip-compressed pickles.
"""

from __future__ import annotations

import gzip
from typing import Any

from metaflow_stack.agent.local_source import LocalSource
from metaflow_stack.agent.queries import AgentError
from metaflow_stack.ui.previews import MAX_PICKLE_BYTES, MAX_PREVIEW_BYTES, NotPlainData, plain_loads, render


class LocalRuns(LocalSource):
    """The agent's local source, plus graphs, parameters, attempts, metadata and previews."""

    def flows(self) -> list[str]:
        """The flows with runs here, by name."""
        return sorted(p.parent.parent.name for p in self.root.glob("*/_meta/_self.json"))

    def blob(self, flow: str, sha: str) -> bytes:
        """An artifact's pickle, at most ``MAX_PICKLE_BYTES`` once decompressed."""
        if not sha.isalnum():
            raise AgentError("bad_parameter", f"artifact hash {sha!r} is not a hash")
        path = self.root / flow / "data" / sha[:2] / sha
        if not path.is_file():
            raise AgentError("not_found", f"the value of artifact {sha} is missing from {self.root}")
        raw = False
        meta = path.with_name(f"{sha}_meta")
        if meta.is_file():
            raw = bool(self._json(meta).get("cas_raw"))
        self.files_read += 1
        if raw:
            return path.read_bytes()[: MAX_PICKLE_BYTES + 1]
        with gzip.open(path) as stream:
            return stream.read(MAX_PICKLE_BYTES + 1)

    def _parameters_task(self, flow: str, run: str) -> dict[str, Any]:
        """The ``data.json`` of the run's ``_parameters`` task: artifact names to hashes and details."""
        folder = self._folder(flow, run, what=f"run {flow}/{run}") / "_parameters"
        found = sorted(folder.glob("*/*.data.json"))
        if not found:
            raise AgentError("not_found", f"run {flow}/{run} has no recorded graph yet")
        return self._json(found[-1])

    def _graph_info(self, flow: str, run: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The ``_parameters`` task's ``data.json`` and the ``_graph_info`` it holds."""
        data = self._parameters_task(flow, run)
        sha = (data.get("objects") or {}).get("_graph_info")
        if sha is None:
            raise AgentError("not_found", f"run {flow}/{run} has no recorded graph")
        try:
            return data, plain_loads(self.blob(flow, sha))
        except NotPlainData as exc:
            raise AgentError("bad_artifact", f"the graph of {flow}/{run} is not plain data ({exc})") from None

    def graph(self, flow: str, run: str) -> dict[str, Any]:
        """The flow's structure as recorded for this run (steps with types, next steps, joins) and its
        parameters, rendered."""
        data, info = self._graph_info(flow, run)
        sizes = data.get("info") or {}
        parameters = {}
        for parameter in info.get("parameters") or []:
            sha = (data.get("objects") or {}).get(parameter["name"])
            size = (sizes.get(parameter["name"]) or {}).get("size")
            parameters[parameter["name"]] = self.preview(flow, sha, size) if sha else "(not recorded)"
        return {
            "start_step": info.get("start_step", "start"),
            "end_step": info.get("end_step", "end"),
            "file": info.get("file"),
            "doc": info.get("doc"),
            "parameters": parameters,
            "steps": {
                name: {
                    "type": step.get("type"),
                    "next": step.get("next") or [],
                    "foreach_artifact": step.get("foreach_artifact"),
                    "matching_join": step.get("matching_join"),
                    "doc": step.get("doc"),
                    "decorators": [d.get("name") for d in step.get("decorators") or []],
                }
                for name, step in (info.get("steps") or {}).items()
            },
        }

    def preview(self, flow: str, sha: str, size: int | None) -> str:
        """A bounded rendering of a plain-data value, or why it is not shown."""
        if size is not None and size > MAX_PREVIEW_BYTES:
            return f"(not previewed: {size:,} bytes stored)"
        data = self.blob(flow, sha)
        if len(data) > MAX_PICKLE_BYTES:
            return "(not previewed: larger than 8 MiB)"
        try:
            return render(plain_loads(data))
        except NotPlainData as exc:
            return f"(not previewed: needs {exc})"

    def task_detail(self, parts: list[str]) -> dict[str, Any]:
        """A task's attempts (start, end, outcome) and its metadata, from its ``_meta`` files."""
        folder = self._folder(*parts, what=f"task {'/'.join(parts)}")
        attempts: dict[int, dict[str, Any]] = {}
        for path in folder.glob("*.attempt.json"):
            number = int(path.name.split(".")[0])
            attempts[number] = {"attempt": number, "started_at": int(self._json(path)["time"] * 1000)}
        metadata = []
        for path in sorted(folder.glob("_meta/sysmeta_*.json")):
            datum = self._json(path)
            tags = datum.get("tags") or []
            attempt = next((int(t.split(":")[1]) for t in tags if t.startswith("attempt_id:")), 0)
            metadata.append(
                {"field": datum["field_name"], "value": datum["value"], "type": datum["type"], "attempt": attempt}
            )
            if datum["field_name"] == "attempt_ok":
                entry = attempts.setdefault(attempt, {"attempt": attempt, "started_at": None})
                entry.update(ok=datum["value"] == "True", finished_at=datum["ts_epoch"])
        return {
            "pathspec": "/".join(parts),
            "attempts": [
                {"ok": None, "finished_at": None, **attempts[number]} for number in sorted(attempts, reverse=True)
            ],
            "metadata": metadata,
        }
