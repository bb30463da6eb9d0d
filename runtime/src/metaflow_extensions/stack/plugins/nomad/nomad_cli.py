"""``nomad step``: the trampoline Metaflow's runtime launches for a ``@nomad`` task; ``nomad create`` and
``nomad trigger``: the flow deployed as one Nomad job, and a run of it (``metaflow_stack.nomad.deployment``).

``nomad step`` rebuilds the real step command from its own options (as Metaflow's ``kubernetes step`` does), runs
it as a Nomad batch job (``metaflow_stack.nomad.task``), passes the job's output on and exits with the
task's real exit code. A job Nomad cannot place, an agent that does not answer or refuses, or a task
whose command never ran (its image could not be pulled, say) exits 202, Metaflow's "do not retry", in
one line naming the fix; a lost node fails the attempt so ``@retry`` runs it again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
from collections.abc import Iterator
from typing import Any

from metaflow import parameters
from metaflow._vendor import click
from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY, MetaflowException

from metaflow_stack.trampolines import step_parameters

#: Exit status when the node running the task was lost: a failed attempt, which ``@retry`` retries.
LOST = 75


@click.group()
def cli() -> None:
    pass


@cli.group(help="Run steps as Nomad batch jobs, or the whole flow as a deployed Nomad job.")
@click.option("--name", default=None, help="The deployed flow's job ID (default: metaflow-<flow>).")
@click.pass_obj
def nomad(obj, name: str | None) -> None:
    obj.nomad_deployment = name


@nomad.command(help="Run one task of a @nomad step as a Nomad job (Metaflow calls this).")
@step_parameters
@click.pass_context
def step(
    ctx, step_name: str, code_package_metadata: str, code_package_sha: str, code_package_url: str, **kwargs
) -> None:
    from metaflow_stack.elsewhere import bring_back_metadata, in_double_quotes, task_command, task_variables
    from metaflow_stack.engines.nomad.client import NomadClient, Settings
    from metaflow_stack.engines.nomad.job_variable import SECRET_SETTINGS
    from metaflow_stack.engines.nomad.jobspec import Placement, job_id
    from metaflow_stack.nomad import task
    from metaflow_stack.nomad.job_secrets import FIRST
    from metaflow_stack.trampolines import exits_in_one_line, step_command

    from .nomad_decorator import PLACEMENT_VARIABLE

    obj = ctx.obj
    flow, datastore = obj.flow.name, obj.flow_datastore.TYPE
    run_id, task_id, attempt = kwargs["run_id"], kwargs["task_id"], int(kwargs["retry_count"])
    step_cli, env = step_command(ctx, step_name, kwargs)
    python = obj.environment.executable(step_name, "python")
    ids = {"flow": flow, "run_id": run_id, "step": step_name, "task_id": task_id, "attempt": attempt}
    settings = json.loads(os.environ[PLACEMENT_VARIABLE])
    placement = Placement(**settings["placement"])
    package = (code_package_metadata, code_package_sha, code_package_url)
    env = task_variables(obj, step_name, package, {**env, task.WORKLOAD_VARIABLE: "1"})
    if settings["stack_image"]:
        env["METAFLOW_SKIP_INSTALL_DEPENDENCIES"] = "1"  # the stack's image has what fetching the package needs
    # (the credentials among the run's settings: in the job's variable, read first, never in its spec)
    secrets = {name: env.pop(name) for name in SECRET_SETTINGS if name in env}
    command = task_command(
        obj.environment,
        (datastore, obj.flow_datastore.datastore_root),
        ids,
        (code_package_metadata, code_package_url),
        f"{python} -u {step_cli}",
        workdir=task.WORKDIR,
        logs=task.LOGS,
        before_step=in_double_quotes(FIRST) if secrets else "",
    )
    meta = {"metaflow.flow": flow, "metaflow.run_id": str(run_id), "metaflow.step": step_name}
    meta |= {"metaflow.task_id": str(task_id), "metaflow.attempt": str(attempt)}
    name = job_id(flow, run_id, step_name, task_id, attempt)
    pathspec = f"{flow}/{run_id}/{step_name}/{task_id}"
    agent = Settings.from_env().at(placement.namespace, placement.region)  # asked of on every call
    try:
        with exits_in_one_line(f"{pathspec}: stopped; its Nomad job {name} was purged"), NomadClient(agent) as client:
            ending = task.run(client, name, command, env, placement, meta, secrets)
    finally:
        missing = bring_back_metadata(obj, run_id, step_name, task_id)
        if missing:
            click.echo(f"{pathspec}: {missing} from the job", err=True)
    if ending.code is not None:
        sys.exit(ending.code if not ending.signal else 128 + ending.signal)
    click.echo(f"{pathspec}: Nomad job {name} {ending.status}: {ending.reason}", err=True)
    sys.exit(LOST if ending.status == "lost" else METAFLOW_EXIT_DISALLOW_RETRY)


def _user() -> str:
    """Who runs the task, as Metaflow names the run's user."""
    from metaflow.util import get_username

    return get_username() or "unknown"


class NomadDeployException(MetaflowException):
    headline = "Nomad deployment"


#: Step decorators a deployed flow cannot honour: its steps run inside its own job, which reaches no
#: cluster but its own Nomad (whose ``@nomad`` steps it starts as jobs of their own, as its workload).
_ELSEWHERE = ("kubernetes", "batch", "devcontainer", "slurm")
#: ``@worker_pool`` backends whose workers a cluster runs (the others run inside the job: a fork server,
#: workers on a Redis the job reaches, a Ray); a Nomad pool's job is not yet started from a deployed flow.
_CLUSTER_POOLS = ("kubernetes", "nomad")


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    """The runtime's ``StackError`` as Metaflow's one-line error."""
    from metaflow_stack.errors import StackError

    try:
        yield
    except StackError as exc:
        raise NomadDeployException(f"{exc}") from None


def _deployable(obj) -> tuple[list[str], list[str], list[Any]]:
    """Refuse in one line what a deployed flow cannot honour; its parameters, required and optional, and
    its steps' ``@nomad`` decorators (each starts a job of its own from the deployed flow's)."""
    if obj.flow_datastore.TYPE == "local":
        raise NomadDeployException(
            "a deployed flow runs on a Nomad client: give it a datastore it reaches (--datastore s3)"
        )
    for node in obj.graph:
        pools = [d.attributes["backend"] for d in node.decorators if d.name == "worker_pool"]
        if pools and pools[0] in _CLUSTER_POOLS:
            raise NomadDeployException(
                f"step {node.name}: a deployed flow runs its steps inside its Nomad job, which cannot start a "
                f'worker pool\'s {pools[0]} workers (fix: @worker_pool(backend="local"): a pool inside the job)'
            )
        elsewhere = [d.name for d in node.decorators if d.name in _ELSEWHERE]
        if elsewhere:
            raise NomadDeployException(
                f"step {node.name}: a deployed flow runs its steps inside its Nomad job, so @{elsewhere[0]} cannot "
                "apply (remove it; size the job with --cpu and --memory)"
            )
    if obj.metadata.TYPE != "service":
        raise NomadDeployException(
            "a deployed flow's runs are recorded in its job, which ends: record them in a metadata service "
            "(--metadata service, with METAFLOW_SERVICE_URL)"
        )
    if obj.environment.TYPE != "local":
        raise NomadDeployException(f"--environment {obj.environment.TYPE} is not supported in a deployed flow yet")
    params = [p for _, p in obj.flow._get_parameters()]
    if any(getattr(p, "IS_CONFIG_PARAMETER", False) for p in params):
        raise NomadDeployException("a flow with a Config is not supported in a deployed flow yet")
    required = [p.name for p in params if p.kwargs.get("required") and p.kwargs.get("default") is None]
    if required and obj.flow._flow_decorators.get("schedule"):
        raise NomadDeployException(f"@schedule runs the flow with its parameters' defaults: give {required[0]} one")
    launchers = [d for node in obj.graph for d in node.decorators if d.name == "nomad"]
    return required, [p.name for p in params if p.name not in required], launchers


def _top_level_options(obj) -> list[str]:
    """The options each run of the deployed flow gets, as Metaflow's runtime and schedulers give a task
    theirs: the decorators ``--with`` attached at create, the flow decorators' own (``@project``'s branch),
    where its data and metadata go."""
    from metaflow.decorators import flow_decorators
    from metaflow.util import dict_to_cli_options

    attached = [
        deco.make_decorator_spec()
        for node in obj.graph
        for deco in node.decorators
        if not deco.statically_defined and deco.inserted_by is None
    ]
    options: dict = {"with": list(dict.fromkeys(attached))}  # (`--with` reaches every step: once each)
    for deco in flow_decorators(obj.flow):
        options.update(deco.get_top_level_options())
    store = obj.flow_datastore
    return [
        *shlex.split(" ".join(dict_to_cli_options(options))),  # (words: Metaflow quotes each for a shell)
        *("--datastore", store.TYPE, "--datastore-root", store.datastore_root, "--metadata", "service"),
        *("--event-logger", obj.event_logger.TYPE, "--monitor", obj.monitor.TYPE),
    ]


@nomad.command(
    help="Deploy the flow as a Nomad job: each dispatch (`nomad trigger`, `nomad job dispatch`) runs it, or "
    "each tick of its @schedule. Its steps run inside the job."
)
# (plain float and int, checked below: Metaflow's Deployer API maps each option's click type to a Python
# type, and knows neither ranges nor a type of ours)
@click.option("--cpu", default=1.0, show_default=True, type=float, help="Cores of the job that runs the flow.")
@click.option("--memory", default=4096, show_default=True, type=int, help="MB of the job that runs the flow.")
@click.option("--image", default=None, help="The job's image (default: the stack's base image).")
@click.option(
    "--env-var",
    multiple=True,
    help="Pass this variable of yours to the job (credentials the clients lack, say): kept out of the job's spec, "
    "in its own Nomad Variable, which its runs read as they start.",
)
@click.option("--deployer-attribute-file", default=None, hidden=True, help="For Metaflow's Deployer API.")
@click.pass_obj
def create(
    obj, cpu: float, memory: int, image: str | None, env_var: tuple[str, ...], deployer_attribute_file: str | None
):
    from metaflow import current
    from metaflow.package import MetaflowPackage

    from metaflow_stack.elsewhere import metaflow_settings
    from metaflow_stack.engines.nomad.client import NomadClient, NotFound, Settings
    from metaflow_stack.engines.nomad.image import stack_image
    from metaflow_stack.engines.nomad.jobspec import Placement
    from metaflow_stack.errors import StackError
    from metaflow_stack.nomad import deployment

    if not 0 < cpu < math.inf or memory < 1:
        raise NomadDeployException(f"--cpu {cpu} and --memory {memory} must be above 0 (fix: --cpu 2 --memory 4096)")
    flow, datastore = obj.flow.name, obj.flow_datastore
    required, optional, launchers = _deployable(obj)
    missing = [variable for variable in env_var if variable not in os.environ]
    if missing:
        raise NomadDeployException(f"--env-var {missing[0]}: no such variable here (set it, or leave it out)")
    name = obj.nomad_deployment or deployment.deployment_name(getattr(current, "project_flow_name", None) or flow)
    with _one_line():
        deployment.check_name(name)
    agent = Settings.from_env()
    schedules = obj.flow._flow_decorators.get("schedule") or []
    schedule = (schedules[0].schedule, schedules[0].timezone) if schedules and schedules[0].schedule else None
    with _one_line():
        placement = Placement(
            cpu=cpu, memory=memory, image=image or stack_image(agent, "--image"), namespace=agent.namespace
        )
        package = MetaflowPackage(obj.flow, obj.environment, obj.echo, suffixes=obj.package_suffixes)
        url, _ = datastore.save_data([package.blob], len_hint=1)[0]
        top = _top_level_options(obj)
        flow_file = os.path.basename(sys.argv[0])
        run = ["python", "-m", "metaflow_stack.nomad.dispatched", flow_file, *top, "--", *required, *optional]
        env = {**metaflow_settings(), **{v: os.environ[v] for v in env_var}, "METAFLOW_USER": _user()}
        secrets = deployment.secrets_of(env, env_var)
        package_at = (package.package_metadata, url)
        ready = image is None  # (the stack's image has what fetching the package needs)
        command = deployment.job_command(
            obj.environment,
            datastore.TYPE,
            package_at,
            run,
            task_api=bool(launchers),
            secrets=bool(secrets),
            ready=ready,
        )
        if launchers or secrets:  # (it reaches Nomad through its own agent, not at this machine's address)
            env.pop("METAFLOW_NOMAD_ADDR", None)
        if any(d.placement.driver == "docker" and d.placement.image is None for d in launchers):
            stack = placement.image if image is None else stack_image(agent, "@nomad(image=...)")
            env[deployment.STEP_IMAGE_VARIABLE] = stack
        meta = {"metaflow.parameters": json.dumps(deployment.parameter_info(obj.flow)), "metaflow.owner": _user()}
        if getattr(current, "project_name", None):  # (as Argo Workflows' annotations name them)
            meta |= {"metaflow.project_name": current.project_name, "metaflow.branch_name": current.branch_name}
        with NomadClient(agent) as client:
            reaches = [d.placement.namespace or client.namespace for d in launchers]
            if secrets:
                meta[deployment.VARIABLE_META] = deployment.variable_path(name)
            if reaches:
                meta[deployment.POLICY_META] = deployment.steps_policy(name, client.namespace, reaches)[0]
            parameters, identity = (required, optional), bool(launchers or secrets)
            job = deployment.deployed_job(name, flow, command, env, placement, parameters, schedule, meta, identity)
            try:
                existing = client.job(name)
            except NotFound:
                existing = None
            before = (existing or {}).get("Meta") or {}
            # (Before anything changes: a job Nomad refuses leaves the deployment it would replace as it was.)
            refused = client.validate(job)
            if refused:
                raise NomadDeployException(f"Nomad refuses the job {name}: {refused[0]} (the deployment is unchanged)")
            # (before the job: its first run reads them; an earlier deployment's, when it has none, removed)
            left = deployment.keep_secrets(client, name, secrets, deployment.VARIABLE_META in before)
            if existing is not None and bool(existing.get("Periodic")) != bool(job.get("Periodic")):
                client.deregister(name)  # Nomad will not turn a job periodic, or back: the old one goes
                obj.echo(
                    f"The Nomad job *{name}* was {'periodic' if existing.get('Periodic') else 'dispatched'}: replaced."
                )
            client.register(job)
            ungranted, failed = None, None
            try:
                ungranted = deployment.grant_steps(client, name, reaches, deployment.POLICY_META in before)
            except StackError as exc:  # (the job is registered: said so below, with what is left to do)
                failed = exc.message
    how = f"on `{schedule[0]}`" if schedule else "each time it is dispatched (`nomad trigger`)"
    obj.echo(f"Flow *{flow}* is deployed as the Nomad job *{name}*: it runs {how}.", bold=True)
    if ungranted and reaches:
        obj.echo(
            f"Its @nomad steps start jobs as the job's workload, which your token cannot let them do: unless an "
            f"operator has run `{ungranted}`, they fail with Nomad's `Permission denied`."
        )
    elif ungranted:
        obj.echo(f"It has no @nomad step now: the policy its steps had, if any, stays until `{ungranted}`.")
    if failed:
        done = "bound" if reaches else "removed"
        obj.echo(f"Its steps' policy was not {done}: {failed} (fix: `nomad create` again).")
    if left:
        obj.echo(f"It keeps no credentials now; those an earlier deployment kept stay until `{left}`.")
    if deployer_attribute_file:
        with open(deployer_attribute_file, "w", encoding="utf-8") as out:
            json.dump({"name": name, "flow_name": flow, "metadata": obj.metadata.metadata_str()}, out)


#: The longest ``trigger`` waits for its run to start: a week.
MAX_START_TIMEOUT_S = 7 * 24 * 3600


@parameters.add_custom_parameters(deploy_mode=False)
@nomad.command(help="Run the deployed flow once (a dispatch of its Nomad job, or a run of its schedule now).")
@click.option("--start-timeout", default=600, show_default=True, type=int, help="Seconds to wait for the run to start.")
@click.option("--run-id-file", default=None, help="Write the run's id to this file.")
@click.option("--deployer-attribute-file", default=None, hidden=True, help="For Metaflow's Deployer API.")
@click.pass_obj
def trigger(obj, start_timeout: int, run_id_file: str | None, deployer_attribute_file: str | None, **kwargs):
    from metaflow_stack.engines.nomad.client import NomadClient, NotFound
    from metaflow_stack.errors import StackError
    from metaflow_stack.nomad import deployment

    if not 1 <= start_timeout <= MAX_START_TIMEOUT_S:  # (past that, the wait's clock overflows)
        raise NomadDeployException(
            f"--start-timeout {start_timeout} must be 1 to {MAX_START_TIMEOUT_S} seconds (fix: --start-timeout 600)"
        )
    meta, changed = {}, []
    for _, param in obj.flow._get_parameters():
        value = kwargs.get(param.name.replace("-", "_").lower())
        if value is None:
            continue
        if value != param.kwargs.get("default"):  # (click gives every parameter, its default when not set)
            changed.append(param.name)
        if param.kwargs.get("type") == parameters.JSONType:
            value = json.dumps(value)
        elif isinstance(value, parameters.DelayedEvaluationParameter):  # an IncludeFile: uploaded, then named
            value = value(return_str=True)
        meta[param.name] = str(value)
    name = obj.nomad_deployment or deployment.deployment_name(obj.flow.name)
    with _one_line(), NomadClient() as client:
        try:
            job = client.job(name)
        except NotFound:
            raise NomadDeployException(f"no Nomad job {name}: deploy the flow first (`nomad create`)") from None
        if job.get("Periodic"):
            if changed:
                raise NomadDeployException(
                    f"a scheduled flow runs with its parameters' defaults: leave out --{changed[0]}"
                )
            eval_id = client.force_periodic(name)
            dispatched = client.evaluation(eval_id)[0]["JobID"]
        else:
            dispatched, eval_id = client.dispatch(name, meta)
        try:
            run_id = deployment.run_id_of(client, dispatched, eval_id, start_timeout)
        except StackError as exc:  # no run may start after a trigger that failed
            client.deregister(dispatched)
            raise StackError(f"{exc.message} (the job {dispatched} was purged)", fix=exc.fix) from None
    pathspec = f"{obj.flow.name}/{run_id}"
    if run_id_file:
        with open(run_id_file, "w", encoding="utf-8") as out:
            out.write(run_id)
    if deployer_attribute_file:
        with open(deployer_attribute_file, "w", encoding="utf-8") as out:
            json.dump({"name": dispatched, "metadata": obj.metadata.metadata_str(), "pathspec": pathspec}, out)
    obj.echo(f"Run *{pathspec}* started as the Nomad job *{dispatched}*.", bold=True)
