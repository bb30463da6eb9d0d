"""For the Nomad tests: one short batch job run to its end through ``@nomad``'s client and watcher, and the
jobs still registered."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from metaflow_stack.engines.nomad.client import NomadClient, Settings
from metaflow_stack.engines.nomad.jobspec import Placement, task_job
from metaflow_stack.engines.nomad.watch import follow


def run_job(
    settings: Settings, placement: Placement, script: str, edit: Callable[[dict[str, Any]], None] | None = None
) -> tuple:
    """Run ``script`` with ``sh -c`` as one job (``edit`` changes its JSON first); how it ended and its output
    lines, the job purged after."""
    lines: list[tuple[str, str]] = []
    name = f"mf-test-{uuid.uuid4().hex[:8]}"
    job = task_job(name, ["sh", "-c", script], {"GREETING": "hello"}, placement, {"t": "1"})
    if edit is not None:
        edit(job)
    with NomadClient(settings) as client:
        eval_id = client.register(job)
        try:
            ending = follow(client, name, eval_id, lambda kind, line: lines.append((kind, line)))
        finally:
            client.deregister(name)
    return ending, lines


def jobs_left(settings: Settings, prefix: str) -> list[str]:
    """The IDs of the jobs still registered whose IDs start with ``prefix``."""
    with NomadClient(settings) as client:
        return [job["ID"] for job in client.jobs(prefix)]
