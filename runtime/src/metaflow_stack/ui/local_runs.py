"""The UI's source on a local datastore: the agent's ``LocalSource`` plus
the run's graph, parameters, previews and a task's attempts and metadata
(Metaflow's small ``_meta`` files), and a live feed of changed runs."""

from __future__ import annotations

import asyncio
from typing import Any

from metaflow_stack.agent.liveness import Liveness
from metaflow_stack.agent.local_source import LocalSource, numbered
from metaflow_stack.agent.models import ConfidentialInfo
from metaflow_stack.agent.source import AgentError
from metaflow_stack.datastore import CONFIDENTIAL_FIELD
from metaflow_stack.datastore.attempts import attempt_of
from metaflow_stack.datastore.blobs import Blobs
from metaflow_stack.ui.changes import Changes, watch
from metaflow_stack.ui.details import Details


class LocalRuns(Details, LocalSource):
    """Everything the UI reads, from the files under ``root``."""

    def __init__(self, root: Any, liveness: Liveness | None = None) -> None:
        super().__init__(root, liveness)
        self.blobs = Blobs((str(self.root),))

    def describe(self) -> dict[str, str]:
        return {"kind": "local", "where": str(self.root)}

    async def follow(self, changes: Changes, stop: asyncio.Event) -> None:
        """Publish the runs whose files change, until ``stop``."""
        await watch(self.root, changes, stop)

    def parameters_artifacts(self, flow: str, run: str) -> dict[str, tuple[str, int | None]]:
        folder = self._folder(flow, run, what=f"run {flow}/{run}") / "_parameters"
        found = sorted(folder.glob("*/*.data.json"))
        if not found:
            raise AgentError("not_found", f"run {flow}/{run} has no recorded graph yet")
        data = self._object(found[-1])
        info, objects = data.get("info"), data.get("objects")
        info, objects = info if isinstance(info, dict) else {}, objects if isinstance(objects, dict) else {}
        return {  # (a task writes the file: only names and hashes that are text, sizes that are numbers)
            name: (sha, size if isinstance(size := (info.get(name) or {}).get("size"), int) else None)
            for name, sha in objects.items()
            if isinstance(name, str) and isinstance(sha, str) and isinstance(info.get(name) or {}, dict)
        }

    def task_detail(self, parts: list[str]) -> dict[str, Any]:
        """A task's attempts (start, end, outcome) and its metadata, from its ``_meta`` files (one that holds no
        record, or no start time, is left out)."""
        folder = self._folder(*parts, what=f"task {'/'.join(parts)}")
        starts = {}
        for attempt in numbered(self._names(folder), ".attempt.json"):
            started = self._object(folder / f"{attempt}.attempt.json").get("time")
            if type(started) in (int, float):
                starts[attempt] = int(started * 1000)
        found = [self.metadatum(path) for path in sorted(folder.glob("_meta/sysmeta_*.json"))]
        return task_detail("/".join(parts), starts, [datum for datum in found if datum is not None])


def task_detail(pathspec: str, starts: dict[int, int], metadata: list[dict[str, Any]]) -> dict[str, Any]:
    """Attempts (newest first, with start, end and outcome), metadata rows and a ``@confidential`` task's
    verification (its latest attempt's records, ``ConfidentialInfo.of_attempt``), from Metaflow's metadata
    records (``field_name``, ``value``, ``type``, ``tags``, ``ts_epoch``) and known attempt start times."""
    attempts = {n: {"attempt": n, "started_at": ts, "finished_at": None, "ok": None} for n, ts in starts.items()}
    rows = []
    for datum in metadata:
        attempt = attempt_of(datum.get("tags")) or 0
        rows.append(
            {"field": datum["field_name"], "value": datum.get("value"), "type": datum.get("type"), "attempt": attempt}
        )
        entry = attempts.setdefault(attempt, {"attempt": attempt, "started_at": None, "finished_at": None, "ok": None})
        if datum["field_name"] == "attempt" and entry["started_at"] is None:
            entry["started_at"] = datum.get("ts_epoch")
        if datum["field_name"] == "attempt_ok":
            entry.update(ok=str(datum.get("value")) == "True", finished_at=datum.get("ts_epoch"))
    # The latest attempt that started or ended, as the other readers find it: a record tagged with another
    # attempt makes no attempt of its own.
    known = [n for n, entry in attempts.items() if entry["started_at"] is not None or entry["ok"] is not None]
    latest = max(known, default=0)
    records = [
        d.get("value")
        for d in metadata
        if d["field_name"] == CONFIDENTIAL_FIELD and attempt_of(d.get("tags")) == latest
    ]
    verification = ConfidentialInfo.of_attempt(records)
    return {
        "pathspec": pathspec,
        "attempts": [attempts[n] for n in sorted(attempts, reverse=True)],
        "metadata": rows,
        "confidential": verification.model_dump() if verification else None,
    }
