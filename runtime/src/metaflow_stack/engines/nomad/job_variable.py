"""A Nomad job's own Variable (``nomad/jobs/<job>``): where a job's credentials are kept out of its spec,
which anyone who may read the job sees, and out of its version history. Of all workloads only the job's own
may read it (its workload identity's implicit policy), from inside an allocation through its agent's Task
API. A deployed flow's job (``nomad create``) and a worker pool's job keep theirs there.
"""

from __future__ import annotations

import os

from metaflow_stack.engines.nomad.client import NomadClient, Settings

#: The run's Metaflow settings that are credentials: kept in the job's variable, never in its spec.
SECRET_SETTINGS = ("METAFLOW_SERVICE_AUTH_KEY", "METAFLOW_SERVICE_HEADERS")
#: What a job's task that reads its variable says where its agent's Task API does not answer.
NO_TASK_API = (
    "its agent's Task API does not answer at $NOMAD_SECRETS_DIR/api.sock (fix: Nomad 1.5 or later, with a "
    "data_dir short enough for a socket's path)"
)


def variable_path(job: str) -> str:
    """Where ``job``'s credentials are kept: the Nomad Variable that, of all workloads, only its own read."""
    return f"nomad/jobs/{job}"


def task_api() -> Settings:
    """Inside an allocation: its agent's Task API, asked with the task's workload identity (``Identity {"Env":
    true}``: ``NOMAD_TOKEN``), in the job's namespace."""
    return Settings(
        address=f"unix://{os.environ.get('NOMAD_SECRETS_DIR', 'secrets')}/api.sock",
        token=os.environ.get("NOMAD_TOKEN") or None,
        namespace=os.environ.get("NOMAD_NAMESPACE") or None,
    )


def read_own(job: str) -> dict[str, str]:
    """The items of ``job``'s variable, read from inside one of its allocations through the Task API
    (``task_api``); the client's ``NotFound``, ``Refused`` or ``Unavailable`` (Nomad opens no socket, and
    says nothing, where its path is too long: ``NO_TASK_API``) for the caller to say in its words."""
    with NomadClient(task_api()) as client:
        return client.variable(variable_path(job))
