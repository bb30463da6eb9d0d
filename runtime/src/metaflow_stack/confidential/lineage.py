"""Which run's data key a resumed run's confidential steps take: the first run of its chain of resumes.

``resume`` clones what an earlier run's tasks made as it is: a sealed
value stays sealed under that run's key, naming its place in that run. So
a resumed run takes the key of the first run of its chain (run 3 resumes 2,
which resumed 1: run 1's key), which opens what was cloned from any run of
the chain and seals what it makes; a run that is no resume has a key of its
own. Metaflow records each task's origin run (``origin-run-id`` metadata,
which the Client API's ``origin_pathspec`` reads too), so the chain is read
from the run's own metadata provider.
"""

from __future__ import annotations

from typing import Any

from metaflow_stack.errors import StackError

#: Resumes a chain may hold (a longer one is a loop in the metadata, not a user's history).
MAX_RESUMES = 100


def first_run(provider: Any, flow: str, origin: str | None) -> str | None:
    """The first run of the chain of resumes that ``origin`` (the run being resumed, Metaflow's
    ``--clone-run-id``) belongs to, read through ``provider`` (Metaflow's metadata provider); None for a
    run that is no resume."""
    if not origin:
        return None
    run, seen = origin, {origin}
    for _ in range(MAX_RESUMES):
        earlier = _origin_of(provider, flow, run)
        if earlier is None:
            return run
        if earlier in seen:
            raise StackError(f"{flow}/{run} resumes {earlier}, which resumes it", fix="resume from another run")
        seen.add(earlier)
        run = earlier
    raise StackError(f"{flow}/{origin} is more than {MAX_RESUMES} resumes from its first run")


def _origin_of(provider: Any, flow: str, run: str) -> str | None:
    """The run ``run`` resumed, from the metadata of its ``start`` task (every run has one, cloned or run)."""
    from metaflow.exception import MetaflowException

    try:
        tasks = provider.get_object("step", "task", None, None, flow, run, "start") or []
        ids = [str(task["task_id"]) for task in tasks]
        data = [provider.get_object("task", "metadata", None, None, flow, run, "start", task) for task in ids]
    except MetaflowException as exc:  # a metadata service that does not answer, say: one line, not a traceback
        raise StackError(f"{flow}/{run}'s metadata cannot be read: {exc}", fix="check the metadata service") from None
    for datum in (datum for metadata in data for datum in metadata or []):
        if datum.get("field_name") == "origin-run-id":
            value = datum.get("value")
            return None if value in (None, "", "None") else str(value)  # (Metaflow writes "None" for none)
    return None
