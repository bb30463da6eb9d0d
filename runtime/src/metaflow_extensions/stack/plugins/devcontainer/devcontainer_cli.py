"""``devcontainer step``: the trampoline Metaflow's runtime launches for a ``@devcontainer`` task.

It rebuilds the real step command from its own options (as Metaflow's
``kubernetes step`` does), runs it in a container through
``metaflow_stack.devcontainer.launch`` and exits with the container's code;
202 (Metaflow's "do not retry") when the container could not start at all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from metaflow._vendor import click

from metaflow_stack.trampolines import step_parameters


@click.group()
def cli() -> None:
    pass


@cli.group(help="Run steps in Docker devcontainer sandboxes.")
def devcontainer() -> None:
    pass


@devcontainer.command(help="Run one task of a @devcontainer step in its container (Metaflow calls this).")
@step_parameters
@click.option("--image", default=None)
@click.option("--backend", default="docker")
@click.option("--provider", default=None)
@click.option("--config", default=None)
@click.option("--network", default="none")
@click.option("--cpu", type=float, default=None)
@click.option("--memory", default=None)
@click.option("--read-only/--no-read-only", default=True)
@click.option("--pids", type=int, default=512)
@click.pass_context
def step(
    ctx,
    step_name: str,
    code_package_metadata: str,
    code_package_sha: str,
    code_package_url: str,
    image: str | None,
    backend: str,
    provider: str | None,
    config: str | None,
    network: str,
    cpu: float | None,
    memory: str | None,
    read_only: bool,
    pids: int,
    **kwargs,
) -> None:
    from metaflow_stack import code_package as code
    from metaflow_stack.code_package import package_bytes
    from metaflow_stack.devcontainer import daytona_sandbox, devpod, stores
    from metaflow_stack.devcontainer.launch import CODE, job_spec, run_step
    from metaflow_stack.devcontainer.policy import SandboxPolicy
    from metaflow_stack.devcontainer.task_container import TaskContainer
    from metaflow_stack.elsewhere import step_environment
    from metaflow_stack.trampolines import exits_in_one_line, step_command

    from .devcontainer_decorator import TASK_CONTAINER_VARIABLE, container_env

    datastore, metadata = ctx.obj.flow_datastore.TYPE, ctx.obj.metadata.TYPE
    step_args, env = step_command(ctx, step_name, kwargs)
    env.update(step_environment(ctx.obj, step_name))  # (set for this process by Metaflow: the sandbox gets it too)
    env.update(container_env(code_package_metadata, code_package_sha, code_package_url, datastore))
    pathspec = f"{ctx.obj.flow.name}/{kwargs['run_id']}/{step_name}/{kwargs['task_id']}"
    with exits_in_one_line(f"{pathspec}: stopped; its container was removed"):
        env.update(stores.environment(datastore, metadata))  # the combination was checked at the run's start
        config_path = Path(config) if config else None
        flow_datastore = ctx.obj.flow_datastore
        if backend == "daytona":
            package = package_bytes(flow_datastore, code_package_url, code_package_sha)
            sizes = {"cpu": cpu, "memory": memory}
            code = daytona_sandbox.run_step(step_args, package, env, pathspec, config=config_path, image=image, **sizes)
        elif backend == "devpod":
            unpacked = code.unpacked_here(flow_datastore, code_package_url, code_package_sha)
            attempt = int(kwargs["retry_count"])
            code = devpod.run_step(
                step_args, unpacked, env, pathspec, attempt, config=config_path, image=image, provider=provider
            )
        else:
            policy = SandboxPolicy(network=network, read_only=read_only, cpu=cpu, memory=memory, pids=pids)
            mounts = stores.container_stores(flow_datastore, metadata, env)
            package = code.unpacked_here(flow_datastore, code_package_url, code_package_sha)
            container_json = os.environ.get(TASK_CONTAINER_VARIABLE)
            container = TaskContainer.model_validate_json(container_json) if container_json else None
            code = run_step(job_spec(image, f"{CODE}/{step_args}", package, mounts, env, policy, pathspec, container))
    sys.exit(code)
