"""One task's step in a Daytona sandbox, through Daytona's Python SDK: a sandbox from the step's image
(or its devcontainer.json's image or Dockerfile), the code package uploaded and unpacked, the step
run in a session whose output is relayed as it comes, the sandbox deleted whatever happens.

A Daytona sandbox runs in Daytona's cloud, so the step reaches its datastore and metadata over the
network (an S3 datastore and the metadata service). ``network="none"`` would cut it off from them;
the sandbox's size comes from ``cpu``/``memory`` (or the file's ``runArgs``). Features need the Dev
Containers CLI on this machine and host mounts a host, so a file with either is refused.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import sys
import uuid
from pathlib import Path

from metaflow_stack.errors import StackError, ToolMissingError
from metaflow_stack.trampolines import stopped_by_signals

INSTALL_FIX = "pip install 'metaflow-stack[daytona]' and set DAYTONA_API_KEY (https://www.daytona.io/docs)"
WORKDIR = "/tmp/metaflow"


def require() -> None:
    """Daytona's SDK and an API key, or the one-line error naming both."""
    if importlib.util.find_spec("daytona") is None:
        raise ToolMissingError("@devcontainer(backend='daytona') needs Daytona's SDK (not installed)", INSTALL_FIX)
    if not os.environ.get("DAYTONA_API_KEY"):
        raise ToolMissingError("@devcontainer(backend='daytona') needs DAYTONA_API_KEY", INSTALL_FIX)


def _gigabytes(memory: str | None) -> int | None:
    """Docker's memory notation (``512m``, ``2g``) in whole gigabytes, as Daytona sizes sandboxes."""
    if memory is None:
        return None
    units = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    value = memory.lower()
    number = float(value[:-1]) * units[value[-1]] if value[-1] in units else float(value)
    return max(1, math.ceil(number / 1024**3))


def sandbox_image(config_path: Path | None, image: str | None):
    """The image argument for the sandbox: the file's image or Dockerfile, or ``image``."""
    from daytona import Image

    from metaflow_stack.devcontainer import spec

    if config_path is None:
        return image, None
    config, _ = spec.load(config_path)
    if config.features or config.mounts:
        raise StackError(
            f"{config_path}: a Daytona sandbox cannot take features or host mounts",
            fix="bake them into the Dockerfile, or use the docker backend",
        )
    if config.build is not None:
        return Image.from_dockerfile(config_path.parent / config.build.dockerfile), config
    return spec.substitute(config.image, spec.workspace_folder(config_path)), config


def run_step(
    step_args: str,
    package: bytes,
    env: dict[str, str],
    pathspec: str,
    *,
    config: Path | None,
    image: str | None,
    cpu: float | None,
    memory: str | None,
) -> int:
    """Run ``step_args`` (the interpreter's arguments, relative to the code's folder) in a new Daytona
    sandbox; its exit code. The sandbox is deleted on exit, failure and SIGTERM/SIGINT."""
    from daytona import CreateSandboxFromImageParams, Daytona, Resources, SessionExecuteRequest

    from metaflow_stack.devcontainer import spec, task_container

    source, parsed = sandbox_image(config, image)
    settings = task_container.TaskContainer()
    if parsed is not None:
        settings = task_container.from_config(parsed, config, spec.workspace_folder(config), [])
        env = {**settings.env, **env}
        cpu, memory = cpu or settings.cpu, memory or settings.memory
    resources = Resources(cpu=math.ceil(cpu) if cpu else None, memory=_gigabytes(memory))
    client = Daytona()
    with stopped_by_signals():
        sandbox = client.create(
            CreateSandboxFromImageParams(
                image=source, env_vars=env, resources=resources, labels={"metaflow-pathspec": pathspec}
            ),
            timeout=0,
        )
        try:
            sandbox.fs.upload_file(package, f"{WORKDIR}.tgz")
            script = (
                f"mkdir -p {WORKDIR} && cd {WORKDIR} && tar -xzf {WORKDIR}.tgz{settings.prelude()}"
                f" && export PYTHONPATH={WORKDIR}/.mf_code METAFLOW_EXTRACTED_ROOT={WORKDIR}"
                f" && exec $(command -v python3 || command -v python) -u {step_args}"
            )
            session = f"mf-{uuid.uuid4().hex[:12]}"
            sandbox.process.create_session(session)
            command = sandbox.process.execute_session_command(
                session, SessionExecuteRequest(command=script, run_async=True)
            )
            asyncio.run(
                sandbox.process.get_session_command_logs_async(
                    session,
                    command.cmd_id,
                    lambda chunk: print(chunk, end="", flush=True),
                    lambda chunk: print(chunk, end="", file=sys.stderr, flush=True),
                )
            )
            code = sandbox.process.get_session_command(session, command.cmd_id).exit_code
            return 1 if code is None else int(code)
        finally:
            client.delete(sandbox)
