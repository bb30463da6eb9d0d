"""Nomad's job JSON, the body of ``PUT /v1/jobs`` (its ``api.Job``): one Metaflow task attempt as a batch
job, or a worker pool's long-running workers as a service job.

Nomad's batch defaults would fight Metaflow's retries: a failed task is
restarted up to 3 times on its node and then rescheduled once elsewhere, so
a failing step would silently run five times. Both policies are set to no
attempts: a failure is the attempt's, and only ``@retry`` runs it again.

Field names and units are Nomad's (``api/jobs.go``, ``api/tasks.go``,
``api/resources.go``, ``api/constraint.go``): durations in nanoseconds,
memory in MB, ``Cores`` for whole cores, ``CPU`` in MHz.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from metaflow_stack.errors import StackError

#: How a task runs on a client: in a Docker container (the default), as a chrooted process of the
#: client's own files (``exec``), or as a plain process of the client's (``raw_exec``: no isolation).
DRIVERS = ("docker", "exec", "raw_exec")
#: The job's one group and task.
GROUP, TASK = "step", "metaflow"
#: The longest job ID made: Nomad's limit (128), less ``nomad/jobs/``, since a job's credentials are kept in a
#: variable named for it, and a variable's path is 128 characters at most (``job_variable``).
MAX_JOB_ID = 117
#: What a fractional ``cpu`` becomes: Nomad shares CPU in MHz.
MHZ_PER_CORE = 1000
#: How long a stopped task has between its signal and SIGKILL.
KILL_TIMEOUT_NS = 30 * 1_000_000_000
#: The operators a constraint may use (Nomad's ``constraint`` block).
OPERATORS = frozenset(
    {"=", "==", "is", "!=", "not", ">", ">=", "<", "<=", "regexp", "version", "semver", "is_set", "is_not_set"}
    | {"set_contains", "set_contains_any", "set_contains_all", "distinct_hosts", "distinct_property"}
)


#: Nomad's rule for a namespace name (no ``*``: in an ACL policy that is every namespace).
_NAMESPACE_NAME = re.compile(r"[a-zA-Z0-9-]{1,128}")


def namespace_name(name: str) -> str:
    """``name``, if Nomad takes it for a namespace; else ``StackError``. A name goes into ACL policies (HCL)
    and the shell lines given to operators: a ``*`` there is every namespace, a quote writes more rules."""
    if not isinstance(name, str) or not _NAMESPACE_NAME.fullmatch(name):
        wildcard = " (a wildcard is every namespace)" if "*" in str(name) else ""  # (Metaflow shows no "*")
        raise StackError(
            f"{name!r} is not a Nomad namespace name{wildcard}", fix="use letters, digits and '-' (128 at most)"
        )
    return name


#: The settings that name something: a string each, or not given.
_NAMES = ("gpu_model", "image", "namespace", "region", "node_pool")


@dataclass(frozen=True)
class Placement:
    """Where and with what a task runs: the ``@nomad`` decorator's settings, checked."""

    cpu: float = 1.0
    memory: int = 4096
    gpu: int = 0
    gpu_model: str | None = None
    gpu_memory: int | None = None  # MB of each GPU, at least
    image: str | None = None
    driver: str = "docker"
    datacenters: tuple[str, ...] = ()
    namespace: str | None = None
    region: str | None = None
    node_pool: str | None = None
    constraints: tuple[tuple[str, str, str], ...] = field(default=())  # (attribute, operator, value)

    def __post_init__(self) -> None:
        if self.driver not in DRIVERS:
            raise StackError(f"driver={self.driver!r} is not one of {', '.join(DRIVERS)}", fix='driver="docker"')
        if not 0 < self.cpu < math.inf or not self.memory > 0 or self.gpu < 0:
            raise StackError(
                f"cpu={self.cpu}, memory={self.memory} and gpu={self.gpu} must be positive (gpu may be 0)",
                fix="@nomad(cpu=2, memory=4096)",
            )
        if self.gpu_memory is not None and self.gpu_memory < 1:
            raise StackError(f"gpu_memory={self.gpu_memory} must be 1 MB or more", fix="@nomad(gpu_memory=16384)")
        for name in _NAMES:
            if (value := getattr(self, name)) is not None and (not isinstance(value, str) or not value.strip()):
                raise StackError(f"{name}={value!r} must be a name", fix=f'@nomad({name}="...") or leave it out')
        if self.namespace is not None:
            namespace_name(self.namespace)
        for attribute, operator, _ in self.constraints:
            if operator not in OPERATORS:
                raise StackError(
                    f"constraint on {attribute} uses {operator!r}, which Nomad does not know",
                    fix=f"one of {', '.join(sorted(OPERATORS))}",
                )


def constraints_of(given: Any) -> tuple[tuple[str, str, str], ...]:
    """``constraints=`` as users write them, Nomad's HCL words (``[{"attribute": "${attr.kernel.name}",
    "operator": "=", "value": "linux"}]``, operator ``=`` by default), as (attribute, operator, value)."""
    if given is None:
        return ()
    if not isinstance(given, list | tuple) or not all(isinstance(c, dict) for c in given):
        raise StackError(
            f"constraints={given!r} is not a list of constraints",
            fix='constraints=[{"attribute": "${attr.kernel.name}", "value": "linux"}]',
        )
    found = []
    for constraint in given:
        unknown = set(constraint) - {"attribute", "operator", "value"}
        if unknown or "attribute" not in constraint:
            raise StackError(
                f"constraint {constraint!r} needs an attribute and may have an operator and a value"
                + (f", not {', '.join(sorted(unknown))}" if unknown else ""),
                fix='{"attribute": "${attr.kernel.name}", "operator": "=", "value": "linux"}',
            )
        found.append(
            (str(constraint["attribute"]), str(constraint.get("operator", "=")), str(constraint.get("value", "")))
        )
    return tuple(found)


def job_id(flow: str, run_id: str, step: str, task_id: str, attempt: int) -> str:
    """The job of one task attempt, named for it (``mf-<flow>-<run>-<step>-<task>-<attempt>``, lowercase,
    the characters both a job ID and a variable's path take); a name over ``MAX_JOB_ID`` keeps its start and
    gains a hash of the whole."""
    name = re.sub(r"[^a-z0-9_-]+", "-", f"mf-{flow}-{run_id}-{step}-{task_id}-{attempt}".lower())
    if len(name) <= MAX_JOB_ID:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[: MAX_JOB_ID - len(digest) - 1]}-{digest}"


def _constraint(attribute: str, operator: str, value: str) -> dict[str, str]:
    return {"LTarget": attribute, "RTarget": value, "Operand": operator}


def resources(placement: Placement) -> dict[str, Any]:
    """The task's ``Resources``: whole cores as ``Cores``, a fraction as ``CPU`` MHz, memory in MB, GPUs
    as ``nvidia/gpu`` devices with the model and memory asked for."""
    cpu = placement.cpu
    found: dict[str, Any] = {"MemoryMB": int(placement.memory)}
    if float(cpu).is_integer():
        found["Cores"] = int(cpu)
    else:
        found["CPU"] = max(int(cpu * MHZ_PER_CORE), 1)
    if placement.gpu:
        device: dict[str, Any] = {"Name": "nvidia/gpu", "Count": placement.gpu}
        wanted = []
        if placement.gpu_model:
            wanted.append(_constraint("${device.model}", "=", placement.gpu_model))
        if placement.gpu_memory:
            wanted.append(_constraint("${device.attr.memory}", ">=", f"{placement.gpu_memory} MiB"))
        if wanted:
            device["Constraints"] = wanted
        found["Devices"] = [device]
    return found


def literal(text: str) -> str:
    """``text`` as Nomad's task runner reads it back: it parses every string of a task's config as an HCL
    template (``${...}`` a variable, ``%{...}`` a directive), so a shell's ``${NOMAD_TASK_DIR:-/tmp}`` in a
    command would fail the task's validation; ``$${`` and ``%%{`` are HCL's literal ``${`` and ``%{``."""
    return text.replace("${", "$${").replace("%{", "%%{")


def task_job(
    job: str, command: list[str], env: dict[str, str], placement: Placement, meta: dict[str, str]
) -> dict[str, Any]:
    """The job that runs ``command`` once with ``env``, placed as ``placement`` says; ``meta`` names the
    Metaflow task (and who waits for it), so a run's jobs and orphans can be found."""
    group = {
        "Count": 1,
        "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
        "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
    }
    return _job(job, "batch", group, command, env, placement, meta, {})


def workers_job(
    job: str, command: list[str], env: dict[str, str], placement: Placement, meta: dict[str, str], count: int
) -> dict[str, Any]:
    """A service job of ``count`` long-running workers (a worker pool's): Nomad keeps them running,
    restarting one that dies as its defaults say, until the job is purged. They stop on SIGTERM, which
    is asked for: Nomad's default for ``exec`` and ``raw_exec`` is SIGINT. Each holds its workload identity
    (``NOMAD_TOKEN``), with which it reads the job's credentials from the job's own variable (``job_variable``)."""
    task = {"KillSignal": "SIGTERM", "Identity": {"Env": True}}
    return _job(job, "service", {"Count": count}, command, env, placement, meta, task)


def _job(
    job: str,
    kind: str,
    group: dict[str, Any],
    command: list[str],
    env: dict[str, str],
    placement: Placement,
    meta: dict[str, str],
    task: dict[str, Any],
) -> dict[str, Any]:
    """A job of ``kind`` whose one group (``group``'s fields) runs one task: ``command`` with ``env``,
    placed as ``placement`` says (``task``'s fields added)."""
    command = [literal(part) for part in command]
    if placement.driver == "docker":
        if not placement.image:
            raise StackError("the docker driver needs an image", fix="give image=, or let the runtime pick one")
        # The command as the image's entrypoint: an image with an ENTRYPOINT of its own (["python"]) would
        # otherwise be handed it as arguments (Nomad's ``command`` is Docker's CMD), as @kubernetes does not.
        config: dict[str, Any] = {"image": placement.image, "entrypoint": command[:1], "args": command[1:]}
    else:
        config = {"command": command[0], "args": command[1:]}
    body: dict[str, Any] = {
        "ID": job,
        "Name": job,
        "Type": kind,
        "Meta": meta,
        "TaskGroups": [
            {
                "Name": GROUP,
                **group,
                "Tasks": [
                    {
                        "Name": TASK,
                        "Driver": placement.driver,
                        "Config": config,
                        "Env": env,
                        "Resources": resources(placement),
                        "KillTimeout": KILL_TIMEOUT_NS,
                        "Meta": meta,
                        **task,
                    }
                ],
            }
        ],
    }
    if placement.datacenters:
        body["Datacenters"] = list(placement.datacenters)
    if placement.constraints:
        body["Constraints"] = [_constraint(*c) for c in placement.constraints]
    for key, value in (
        ("Namespace", placement.namespace),
        ("Region", placement.region),
        ("NodePool", placement.node_pool),
    ):
        if value:
            body[key] = value
    return body
