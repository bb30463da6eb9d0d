"""A local datastore written by hand, laid out as Metaflow's local metadata writes it: for the readers' tests
that need a task's files exactly so (a step's own files among them) without running a flow."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

#: Milliseconds in the records' file names, as Metaflow names them: one apart, so that none overwrites another.
_MS = itertools.count(1_700_000_000_000)


def local_task(root: Path, pathspec: str = "F/1/s/2") -> Path:
    """The folder of the task ``pathspec`` under ``root`` (a ``.metaflow`` folder): its flow's, run's, step's and
    its own ``_self.json``, and attempt 0 started and succeeded."""
    flow, run, _, _ = pathspec.split("/")
    folder = root
    for depth, part in enumerate(pathspec.split("/")):
        folder = folder / part
        (folder / "_meta").mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {"flow_id": flow, "ts_epoch": 1_000 + depth}
        if depth == 1:
            record |= {"run_number": run, "user_name": "ana", "tags": [], "system_tags": []}
        (folder / "_meta" / "_self.json").write_text(json.dumps(record))
    (folder / "0.attempt.json").write_text(json.dumps({"time": 2.0}))
    metadatum(folder, "attempt", "0", 0)
    metadatum(folder, "attempt_ok", "True", 0)
    return folder


def metadatum(task: Path, field: str, value: Any, attempt: int | str | None) -> Path:
    """A ``sysmeta_<field>_<ms>.json`` of the task (``attempt``: its ``attempt_id`` tag, as a step could write it;
    None for none)."""
    ms = next(_MS)
    tags = [f"attempt_id:{attempt}"] if attempt is not None else []
    path = task / "_meta" / f"sysmeta_{field}_{ms}.json"
    datum = {"field_name": field, "value": value, "type": field, "user_name": "ana", "ts_epoch": ms, "tags": tags}
    path.write_text(json.dumps(datum))
    return path
