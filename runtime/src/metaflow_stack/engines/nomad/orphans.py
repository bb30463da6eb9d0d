"""Jobs whose launcher on this machine is gone: a ``nomad step`` trampoline or a run (its worker pool's
job) killed outright could not purge its own. Each job names its launcher in its ``Meta``
(``elsewhere.Launcher``); the next run's start purges those whose launcher has ended.
"""

from __future__ import annotations

import contextlib

from metaflow_stack.elsewhere import Launcher
from metaflow_stack.engines.nomad.client import NomadClient
from metaflow_stack.engines.nomad.job_variable import variable_path
from metaflow_stack.errors import StackError

#: ``Meta`` key naming what waits for the job (``elsewhere.Launcher.label``).
OWNER = "metaflow-stack.owner"


def sweep(client: NomadClient, prefix: str = "mf-", variables: bool = False) -> int:
    """Purge the jobs whose launcher on this host is gone (killed outright, it could not), and, given
    ``variables``, their variables (a worker pool's job keeps its queue's URL in its own); how many."""
    gone = 0
    try:
        jobs = client.jobs(prefix)
    except StackError:
        return 0  # the first task reports an agent that does not answer
    for job in jobs:
        launcher = Launcher.parse((job.get("Meta") or {}).get(OWNER))
        if launcher is not None and launcher.gone():
            try:
                client.deregister(job["ID"])
            except StackError:  # (another's to purge, or a refusal: the sweep is a courtesy, not the run's work)
                continue
            gone += 1
            if variables:
                with contextlib.suppress(StackError):
                    client.delete_variable(variable_path(job["ID"]))
    return gone
