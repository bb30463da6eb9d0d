"""``nomad step``: the trampoline Metaflow's runtime launches for a ``@nomad`` task.

It rebuilds the real step command from its own options (as Metaflow's ``kubernetes step`` does), runs
it as a Nomad batch job (``metaflow_stack.nomad.task``), passes the job's output on and exits with the
task's real exit code. A job Nomad cannot place, an agent that does not answer or refuses, or a task
whose command never ran (its image could not be pulled, say) exits 202, Metaflow's "do not retry", in
one line naming the fix; a lost node fails the attempt so ``@retry`` runs it again.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

from metaflow._vendor import click
from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY

from metaflow_stack.trampolines import step_parameters

#: Exit status when the node running the task was lost: a failed attempt, which ``@retry`` retries.
LOST = 75


@click.group()
def cli() -> None:
    pass


@cli.group(help="Run steps as Nomad batch jobs.")
def nomad() -> None:
    pass


@nomad.command(help="Run one task of a @nomad step as a Nomad job (Metaflow calls this).")
@step_parameters
@click.pass_context
def step(
    ctx, step_name: str, code_package_metadata: str, code_package_sha: str, code_package_url: str, **kwargs
) -> None:
    from metaflow.metadata_provider.util import sync_local_metadata_from_datastore
    from metaflow.metaflow_config import DATASTORE_LOCAL_DIR

    from metaflow_stack.elsewhere import metaflow_settings
    from metaflow_stack.errors import StackError
    from metaflow_stack.nomad import task
    from metaflow_stack.nomad.client import NomadClient, Settings
    from metaflow_stack.nomad.jobspec import Placement, job_id
    from metaflow_stack.trampolines import step_command

    from .nomad_decorator import PLACEMENT_VARIABLE

    obj = ctx.obj
    flow, datastore = obj.flow.name, obj.flow_datastore.TYPE
    run_id, task_id, attempt = kwargs["run_id"], kwargs["task_id"], int(kwargs["retry_count"])
    step_cli, env = step_command(ctx, step_name, kwargs)
    python = obj.environment.executable(step_name, "python")
    ids = {"flow": flow, "run_id": run_id, "step": step_name, "task_id": task_id, "attempt": attempt}
    node = obj.graph[step_name]
    environment = next((d.attributes["vars"] for d in node.decorators if d.name == "environment"), {})
    settings = json.loads(os.environ[PLACEMENT_VARIABLE])
    placement = Placement(**settings["placement"])
    env = {
        **metaflow_settings(),
        **{str(k): str(v) for k, v in environment.items()},  # @environment's, as @kubernetes passes them
        **env,
        "METAFLOW_CODE_METADATA": code_package_metadata,
        "METAFLOW_CODE_SHA": code_package_sha,
        "METAFLOW_CODE_URL": code_package_url,
        "METAFLOW_CODE_DS": datastore,
        "METAFLOW_USER": _user(),
        "METAFLOW_DEFAULT_DATASTORE": datastore,
        "METAFLOW_DEFAULT_METADATA": obj.metadata.TYPE,
        "METAFLOW_FLOW_FILENAME": os.path.basename(sys.argv[0]),
        task.WORKLOAD_VARIABLE: "1",
    }
    if settings["stack_image"]:
        env["METAFLOW_SKIP_INSTALL_DEPENDENCIES"] = "1"  # the stack's image has what fetching the package needs
    command = task.job_command(
        obj.environment, datastore, ids, (code_package_metadata, code_package_url), f"{python} -u {step_cli}"
    )
    meta = {"metaflow.flow": flow, "metaflow.run_id": str(run_id), "metaflow.step": step_name}
    meta |= {"metaflow.task_id": str(task_id), "metaflow.attempt": str(attempt)}
    name = job_id(flow, run_id, step_name, task_id, attempt)
    pathspec = f"{flow}/{run_id}/{step_name}/{task_id}"
    agent = Settings.from_env()  # the job's namespace and region, asked of on every call
    agent = replace(agent, namespace=placement.namespace or agent.namespace, region=placement.region or agent.region)
    try:
        with NomadClient(agent) as client:
            ending = task.run(client, name, command, env, placement, meta)
    except StackError as exc:
        click.echo(f"error: {exc.message}\nfix: {exc.fix}", err=True)
        sys.exit(METAFLOW_EXIT_DISALLOW_RETRY)
    except KeyboardInterrupt:
        click.echo(f"{pathspec}: stopped; its Nomad job {name} was purged", err=True)
        sys.exit(METAFLOW_EXIT_DISALLOW_RETRY)
    finally:
        if obj.metadata.TYPE == "local":  # the job wrote the task's metadata to the datastore: bring it here
            try:
                task_datastore = obj.flow_datastore.get_task_datastore(run_id, step_name, task_id)
                sync_local_metadata_from_datastore(DATASTORE_LOCAL_DIR, task_datastore)
            except Exception as exc:  # a job that never ran wrote none: its ending says why
                click.echo(f"{pathspec}: no metadata to bring back from the job ({type(exc).__name__})", err=True)
    if ending.code is not None:
        sys.exit(ending.code if not ending.signal else 128 + ending.signal)
    click.echo(f"{pathspec}: Nomad job {name} {ending.status}: {ending.reason}", err=True)
    sys.exit(LOST if ending.status == "lost" else METAFLOW_EXIT_DISALLOW_RETRY)


def _user() -> str:
    """Who runs the task, as Metaflow names the run's user."""
    from metaflow.util import get_username

    return get_username() or "unknown"
