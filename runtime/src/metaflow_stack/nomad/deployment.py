"""A whole flow deployed as one Nomad job (``nomad create``): each dispatch, or each tick of ``@schedule``, one run.

The job is parameterized (``nomad job dispatch -meta alpha=3 JOB``: the flow's parameters are the
dispatch's ``Meta``, required where they have no default) or, for a flow with ``@schedule``, periodic
(its parameters' defaults). Its task fetches the flow's code package from the datastore and runs
``metaflow_stack.nomad.dispatched``, which runs the flow once inside the allocation and prints the run's id
on a line of its own: Metaflow gives a run its id only when it starts, so ``trigger`` reads it from the
task's output. The job's restart and reschedule policies have no attempts, as for a task: retries are the
flow's ``@retry``.

Credentials (the metadata service's key and headers, and what ``--env-var`` passes) are kept out of the
job's spec, which anyone who may read the job sees, and its version history: in the job's own Nomad
Variable (``nomad/jobs/<job>``), which the job's task reads at its start with its workload identity (its
implicit policy: the variables of its own job, a dispatched or periodic run's parent's).

A flow whose steps start Nomad jobs of their own (``@nomad``) runs them from inside its job, as the
job's own workload: the task is given its workload identity (``NOMAD_TOKEN``) and reaches its agent through
the Task API (``$NOMAD_SECRETS_DIR/api.sock``), so no token of the deployer's is stored in the job. Where the
cluster enforces ACLs, that identity holds only what ``steps_policy`` grants, bound to this job (and so to
each of its dispatched and periodic runs).
"""

from __future__ import annotations

import collections
import hashlib
import json
import keyword
import queue
import re
import shlex
import threading
from collections.abc import Iterable
from typing import Any

from metaflow_stack.elsewhere import in_double_quotes
from metaflow_stack.engines.nomad.client import NomadClient, Refused
from metaflow_stack.engines.nomad.job_variable import SECRET_SETTINGS, keep, variable_path
from metaflow_stack.engines.nomad.jobspec import Placement, namespace_name, task_job
from metaflow_stack.engines.nomad.watch import Ending, follow
from metaflow_stack.errors import StackError
from metaflow_stack.nomad.job_secrets import FIRST, VARIABLE_NAME

#: The line a deployed run prints first: this, then its run id.
RUN_ID_MARKER = "metaflow-stack-run-id: "
#: ``Meta`` key of a deployed flow's job (``nomad job status -filter`` finds them).
DEPLOYED = "metaflow.deployed"
#: Lines of a job's output kept to say why it ended before its run started.
TAIL_LINES = 12
#: Where the job works (Nomad's task folder).
WORKDIR = "${NOMAD_TASK_DIR:-/tmp}/metaflow-flow"
#: Set in the job's environment to the image its ``@nomad`` steps run when they name none: the one the
#: deployer chose (its clients pull it), since the job has no Docker of its own to look for the stack's.
STEP_IMAGE_VARIABLE = "METAFLOW_STACK_NOMAD_STEP_IMAGE"
#: What a deployed flow's workload may do in its namespace to run its steps as jobs of their own: each
#: endpoint's "ACL Required" in Nomad's API docs (register and purge, read evaluations and allocations,
#: follow logs, list the jobs a killed run left to purge them).
STEP_CAPABILITIES = ("submit-job", "read-job", "read-logs", "list-jobs")
#: The variables of the steps' jobs (``jobspec.job_id``: ``mf-...``), where each keeps the run's credentials.
STEP_VARIABLES = "nomad/jobs/mf-*"
#: ``Meta`` keys naming what ``create`` made beside the job (its credentials' variable, its steps' policy), so
#: that a later ``create`` without them removes them.
VARIABLE_META, POLICY_META = "metaflow.credentials", "metaflow.steps-policy"


def deployment_name(flow: str) -> str:
    """The job a flow is deployed as: ``metaflow-<flow>``, in Nomad's job ID characters (and short enough that a
    dispatched child's ID, ``<job>/dispatch-<time>-<id>``, stays readable in Nomad's listings)."""
    return "metaflow-" + re.sub(r"[^a-z0-9-]", "-", flow.lower())[:100]


def check_name(name: str) -> str:
    """``name`` (a ``--name``: the ones ``deployment_name`` makes always do) where it can name the job and its
    variable (``nomad/jobs/<job>``: Nomad takes letters, digits, ``-``, ``_`` and ``~``, 128 in all, in a
    variable's path); else one line naming the fix."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,117}", name):
        raise StackError(
            f"--name {name!r} cannot name a deployed flow's job and the Nomad Variable its credentials are kept in",
            fix="use up to 117 letters, digits, '-' and '_'",
        )
    return name


def parameter_info(flow: Any) -> dict[str, dict[str, Any]]:
    """The flow's parameters as Metaflow's schedulers describe them (``generate_fake_flow_file_contents``
    makes a flow that takes them again): what ``DeployedFlow.from_nomad`` triggers a deployment with."""
    from metaflow.includefile import FilePathClass
    from metaflow.parameters import JSONType

    info = {}
    for var, param in flow._get_parameters():
        kind = param.kwargs.get("type")
        extra = {}
        if kind == JSONType or isinstance(kind, FilePathClass):
            name = str(kind.name)
            if isinstance(kind, FilePathClass):
                extra = {"is_text": getattr(kind, "_is_text", True), "encoding": getattr(kind, "_encoding", "utf-8")}
        else:
            name = str(getattr(kind, "__name__", "str"))
        info[param.name] = {
            "python_var_name": var,
            "name": param.name,
            "type": name,
            "description": param.kwargs.get("help"),
            "is_required": bool(param.kwargs.get("required", False)),
            **extra,
        }
    return info


#: What a parameter's type may be in ``parameter_info``.
_PARAMETER_TYPES = frozenset({"str", "int", "float", "bool", "JSON", "FilePath"})
#: A parameter's name, and an encoding's: no quote, no space.
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def deployment_facts(meta: dict[str, str]) -> tuple[str, dict[str, dict[str, Any]], str | None]:
    """The flow's name, its ``parameter_info`` and its project's name as a deployed job's ``Meta`` keeps them,
    held to what ``create`` writes: Metaflow pastes each into the Python file it makes to trigger the job
    (``generate_fake_flow_file_contents``), which is then imported, and whoever may submit a job in the
    namespace writes ``Meta``. A parameter's help, pasted in triple quotes, is left out: triggering needs none.
    ``StackError`` naming the key otherwise."""
    flow, project = meta.get("metaflow.flow", ""), meta.get("metaflow.project_name") or None
    if not flow.isidentifier() or keyword.iskeyword(flow):
        raise StackError(f"its metaflow.flow {flow[:80]!r} is not a flow's name", fix="deploy it again with create")
    if project is not None and not re.fullmatch(r"[A-Za-z0-9_]{1,128}", project):
        raise StackError(f"its metaflow.project_name {project[:80]!r} is not a project's", fix="deploy it again")
    try:
        given = json.loads(meta.get("metaflow.parameters") or "{}")
        info = {}
        for key, each in given.items():
            var, kind = each["python_var_name"], each["type"]
            plain = [each["name"], *([each.get("encoding", "utf-8")] if kind == "FilePath" else [])]
            if not (var.isidentifier() and not keyword.iskeyword(var) and kind in _PARAMETER_TYPES):
                raise ValueError(key)
            if not all(isinstance(v, str) and _PLAIN.fullmatch(v) for v in plain) or key != each["name"]:
                raise ValueError(key)
            if not isinstance(each["is_required"], bool) or not isinstance(each.get("is_text", True), bool):
                raise ValueError(key)
            info[key] = {**{k: each[k] for k in ("python_var_name", "name", "type", "is_required")}, "description": ""}
            info[key] |= {"is_text": each.get("is_text", True), "encoding": plain[-1]} if kind == "FilePath" else {}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise StackError("its metaflow.parameters are not those create writes", fix="deploy it again") from None
    return flow, info, project


def deployed_job(
    name: str,
    flow: str,
    command: list[str],
    env: dict[str, str],
    placement: Placement,
    parameters: tuple[list[str], list[str]],
    schedule: tuple[str, str | None] | None,
    meta: dict[str, str],
    identity: bool = False,
) -> dict[str, Any]:
    """The job of a deployed flow (``meta``: what else its ``Meta`` says of it): ``task_job``'s, made
    parameterized on ``parameters`` (the required ones, the optional ones) or, given ``schedule`` (cron, time
    zone), periodic without overlapping runs; given ``identity``, its task holds its workload identity
    (``NOMAD_TOKEN``: Nomad's default identity has no expiry, so it needs no renewal).

    ``@schedule``'s cron (AWS's six fields, ``0 0 * * ? *``) is Nomad's as it is: its cron takes a year
    field and ``?``; numbered week days differ (AWS counts Sunday as 1, Nomad as 0), names do not."""
    job = task_job(name, command, env, placement, {**meta, DEPLOYED: "true", "metaflow.flow": flow})
    if identity:
        job["TaskGroups"][0]["Tasks"][0]["Identity"] = {"Env": True}
    if schedule is None:
        required, optional = parameters
        job["ParameterizedJob"] = {"Payload": "forbidden", "MetaRequired": required, "MetaOptional": optional}
    else:
        cron, timezone = schedule
        job["Periodic"] = {"Enabled": True, "SpecType": "cron", "Spec": cron, "ProhibitOverlap": True}
        if timezone:
            job["Periodic"]["TimeZone"] = timezone
    return job


def secrets_of(env: dict[str, str], passed: Iterable[str]) -> dict[str, str]:
    """The credentials among the job's variables (``passed``: the names ``--env-var`` gave, each a name the
    job's shell can export), taken out of ``env``."""
    wrong = [name for name in passed if not VARIABLE_NAME.fullmatch(name)]
    if wrong:
        raise StackError(f"--env-var {wrong[0]!r} is not a variable's name", fix="name one: letters, digits and '_'")
    return {name: env.pop(name) for name in [*SECRET_SETTINGS, *passed] if name in env}


def keep_secrets(client: NomadClient, job: str, secrets: dict[str, str], kept_before: bool) -> str | None:
    """Write ``secrets`` to the job's variable, or, with none, remove the one an earlier ``create`` wrote
    (``kept_before``); the command left for an operator, if the token may not remove it."""
    path = variable_path(job)
    if secrets:
        keep(client, job, secrets, "the deployed flow's credentials are kept")
    elif kept_before:
        try:
            client.delete_variable(path)
        except Refused:
            return f"nomad var purge {client.settings.cli_options()}{path}"
    return None


def steps_policy(job: str, namespace: str, reaches: Iterable[str]) -> tuple[str, str]:
    """The ACL policy that lets ``job`` (in ``namespace``) run its steps as Nomad jobs in the namespaces it
    ``reaches``: its name (Nomad's policy name characters, and a hash of the job's namespace and ID: jobs
    whose IDs differ only in characters a policy name cannot hold get a policy each) and HCL rules."""
    for each in reaches:  # (pasted into HCL, and into the shell line an operator may be given to run)
        namespace_name(each)
    digest = hashlib.sha256(f"{namespace}/{job}".encode()).hexdigest()[:10]
    name = f"{re.sub(r'[^A-Za-z0-9-]', '-', job)[:100]}-{digest}"
    capabilities = ", ".join(f'"{c}"' for c in STEP_CAPABILITIES)
    # (each step's job keeps the run's credentials in its own variable, which the deployed job writes first;
    # a block of more than one argument takes a line each)
    path = f'    path "{STEP_VARIABLES}" {{\n      capabilities = ["write", "destroy"]\n    }}'
    variables = f"  variables {{\n{path}\n  }}"
    block = 'namespace "{}" {{\n  capabilities = [{}]\n{}\n}}\n'
    return name, "".join(block.format(each, capabilities, variables) for each in sorted(set(reaches)))


def grant_steps(client: NomadClient, job: str, reaches: list[str], granted_before: bool) -> str | None:
    """Bind ``steps_policy`` to ``job`` where the agent enforces ACLs, or, with no namespace to reach,
    remove the one an earlier ``create`` bound (``granted_before``); ``None`` once that holds (or there are
    no ACLs), else the command an operator runs (policies take a management token)."""
    if not (reaches or granted_before) or not client.acls_enabled():
        return None
    name, rules = steps_policy(job, client.namespace, reaches)
    try:
        if reaches:
            description = f"The Metaflow flow deployed as {job}: its steps' own jobs"
            client.put_policy(name, rules, description, (client.namespace, job))
        else:
            client.delete_policy(name)
    except Refused:
        if not reaches:
            return f"nomad acl policy delete {name}"
        escaped = rules.replace("\n", "\\n")  # (its lines kept: printf makes them again)
        return f"printf '{escaped}' | nomad acl policy apply -namespace {client.namespace} -job {job} {name} -"
    return None


def job_command(
    environment: Any,
    datastore: str,
    package: tuple[str, str],
    run: list[str],
    task_api: bool,
    secrets: bool,
    ready: bool,
) -> list[str]:
    """The job's command: fetch and unpack the code package (``package``: its metadata and URL) as
    Metaflow's own jobs do, then ``run`` (the ``dispatched`` module's line) in that folder; given
    ``task_api``, with its agent's Task API as the Nomad address (for its steps, and to read its
    ``secrets`` first, given them). ``ready``: its image has what fetching the package needs, which the
    script's own shell is told (``METAFLOW_SKIP_INSTALL_DEPENDENCIES``, not exported: a step's job with an
    image of its own still installs it)."""
    from metaflow.mflog import BASH_FLUSH_LOGS, BASH_MFLOG

    metadata, url = package
    # Metaflow's commands log through mflog into a task's log files and save them as the task's; this job is
    # no task (its run's tasks save their own), so its mflog lines go to its output alone. They also put the
    # package's own Metaflow first on the path, as a task needs; this job's run makes its own code package,
    # which Metaflow refuses to do from modules whose installed distribution is elsewhere (the image's). So
    # the run uses the image's Metaflow and runtime (the stack's image has the deployer's), and the package's
    # user code.
    skip = {BASH_MFLOG, BASH_FLUSH_LOGS, "flush_mflogs"}
    commands = [
        c
        for c in environment.get_package_commands(url, datastore, metadata)
        if c not in skip and not c.startswith(("export PYTHONPATH=", "export METAFLOW_EXTRACTED_ROOT="))
    ]
    prelude = ["METAFLOW_SKIP_INSTALL_DEPENDENCIES=1"] if ready else []
    prelude += ["export NOMAD_ADDR=unix://$NOMAD_SECRETS_DIR/api.sock"] if task_api or secrets else []
    if secrets:  # (a failure ends the job, naming why, before anything needs them)
        prelude.append(in_double_quotes(FIRST))
    init = " && ".join(['mflog() { echo \\"$1\\"; }', *prelude, *commands])
    script = f"mkdir -p {WORKDIR} && cd {WORKDIR} && {init} && exec {in_double_quotes(shlex.join(run))}"
    return shlex.split(f'bash -c "{script}"')


def marker_line(run_id: str) -> bytes:
    """What the dispatched job writes, in one write, to say its run's id. The run writes each of its log lines
    in pieces on the same stream (Metaflow's logger writes the timestamp, the task's name and the message
    apart), so the marker may come after a piece of one: it starts a line of its own."""
    return f"\n{RUN_ID_MARKER}{run_id}\n".encode()


def run_id_in(line: str) -> str | None:
    """The run id a line of the dispatched job's output says (``marker_line``), if it says one."""
    return (line[len(RUN_ID_MARKER) :].strip() or None) if line.startswith(RUN_ID_MARKER) else None


def run_id_of(client: NomadClient, job: str, eval_id: str, timeout_s: float) -> str:
    """The run id a dispatched ``job`` prints once its run has started; its output is read until then."""
    found: queue.Queue[str | Ending | BaseException] = queue.Queue()
    last: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def on_line(kind: str, line: str) -> None:
        if kind == "stdout" and (run_id := run_id_in(line)):
            found.put(run_id)
        elif line.strip():
            last.append(line)

    def watch() -> None:
        try:
            found.put(follow(client, job, eval_id, on_line))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            found.put(exc)

    threading.Thread(target=watch, name=f"watch {job}", daemon=True).start()
    try:
        got = found.get(timeout=timeout_s)
    except queue.Empty:
        raise StackError(
            f"the dispatched job {job} printed no run id in {timeout_s:.0f} s",
            fix=f"see `nomad alloc logs -job {job}`; is the cluster short of room?",
        ) from None
    if isinstance(got, BaseException):
        raise got
    if isinstance(got, Ending):
        said = " | ".join(last) or got.reason or "nothing"
        raise StackError(
            f"the dispatched job {job} ended ({got.status}, exit code {got.code}) before its run started; it said: "
            f"{said}",
            fix=f"see `nomad alloc logs -job {job}`",
        )
    return got
