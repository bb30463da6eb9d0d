"""A Nomad job's own Variable (``nomad/jobs/<job>``): where a job's credentials are kept out of its spec,
which anyone who may read the job sees, and out of its version history. Of all workloads only the job's own
may read it (its workload identity's implicit policy), from inside an allocation through its agent's Task
API. A deployed flow's job (``nomad create``), a ``@nomad`` task's job and a worker pool's job keep theirs
there.

Read inside the job with the standard library alone (``read_own``): a task's image, or an ``exec`` or
``raw_exec`` client's Python, holds Metaflow's needs and nothing of this runtime's (its HTTP client
included), and the runtime itself arrives in the code package.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any
from urllib.parse import quote

from metaflow_stack.errors import StackError

#: The run's Metaflow settings that are credentials: kept in the job's variable, never in its spec.
SECRET_SETTINGS = ("METAFLOW_SERVICE_AUTH_KEY", "METAFLOW_SERVICE_HEADERS")
#: What a job's task that reads its variable says where its agent's Task API does not answer.
NO_TASK_API = (
    "its agent's Task API does not answer at $NOMAD_SECRETS_DIR/api.sock (fix: Nomad 1.5 or later, with a "
    "data_dir short enough for a socket's path)"
)
#: Seconds the Task API has to answer; the most of its answer read (a variable holds a few settings).
TIMEOUT_S = 30.0
MAX_ANSWER_BYTES = 1 << 20


class NotKept(StackError):
    """The token may not write the job's variable: none was written."""


def keep(client: Any, job: str, items: dict[str, str], what: str) -> None:
    """``items`` in ``job``'s variable, written with ``client`` (an ``engines.nomad.client.NomadClient``);
    ``NotKept``, naming the policy rule a token needs, where the token may not (``what``: whose credentials,
    in the message)."""
    from metaflow_stack.engines.nomad.client import Refused  # (its HTTP client: not for ``read_own``'s side)

    path = variable_path(job)
    try:
        client.put_variable(path, items)
    except Refused:
        raise NotKept(
            f"your Nomad token may not write the variable {path}, where {what}",
            fix=f'give its policy `variables {{ path "nomad/jobs/*" {{ capabilities = ["write", "destroy"] }} }}` '
            f'in namespace "{client.namespace}" (the dev cluster\'s policy has it)',
        ) from None


def forget(client: Any, job: str) -> str | None:
    """Remove ``job``'s variable with ``client``; ``None`` once it is gone (or never was), else what an
    operator is told: that it may be left, and the command that removes it."""
    path = variable_path(job)
    try:
        client.delete_variable(path)
    except StackError as exc:
        where = client.settings.cli_options()
        return f"the Nomad variable {path} may be left ({exc.message}): nomad var purge {where}{path}"
    return None


class VariableGone(StackError):
    """The job's variable is not there (removed, or never written)."""


class VariableRefused(StackError):
    """The job's workload identity may not read its variable."""


class TaskApiUnavailable(StackError):
    """The agent's Task API does not answer inside the allocation."""


def variable_path(job: str) -> str:
    """Where ``job``'s credentials are kept: the Nomad Variable that, of all workloads, only its own read."""
    return f"nomad/jobs/{job}"


class _TaskApi(http.client.HTTPConnection):
    """HTTP to the agent's Task API, a Unix socket in the task's secrets folder."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT_S)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def read_own(job: str) -> dict[str, str]:
    """The items of ``job``'s variable, read from inside one of its allocations with the task's workload
    identity (``Identity {"Env": true}``: ``NOMAD_TOKEN``) through its agent's Task API, in the job's
    namespace; ``VariableGone``, ``VariableRefused`` or ``TaskApiUnavailable`` (Nomad opens no socket, and
    says nothing, where its path is too long) for the caller to say in its words."""
    path = variable_path(job)
    namespace = os.environ.get("NOMAD_NAMESPACE")
    target = f"/v1/var/{quote(path, safe='/')}" + (f"?namespace={quote(namespace)}" if namespace else "")
    token = os.environ.get("NOMAD_TOKEN")
    connection = _TaskApi(os.path.join(os.environ.get("NOMAD_SECRETS_DIR", "secrets"), "api.sock"))
    try:
        connection.request("GET", target, headers={"X-Nomad-Token": token} if token else {})
        answer = connection.getresponse()
        body = answer.read(MAX_ANSWER_BYTES + 1)
    except (OSError, http.client.HTTPException):
        raise TaskApiUnavailable(NO_TASK_API) from None
    finally:
        connection.close()
    if answer.status == 404:
        raise VariableGone(f"the variable {path} is not there")
    if answer.status in (401, 403):
        raise VariableRefused(f"this job's identity may not read the variable {path}")
    try:
        items = json.loads(body)["Items"] if answer.status == 200 and len(body) <= MAX_ANSWER_BYTES else None
    except (ValueError, KeyError, TypeError):
        items = None
    if not isinstance(items, dict):
        raise StackError(f"Nomad's Task API answered {answer.status} for the variable {path}, with no items")
    return {str(name): str(value) for name, value in items.items()}
