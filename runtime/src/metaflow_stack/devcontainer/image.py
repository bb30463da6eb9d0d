"""The image a devcontainer.json describes, built once per run.

A configuration with features is built by the Dev Containers CLI (``devcontainer build``), which
knows how to install them; one without is built (``build.dockerfile``) or taken (``image``)
directly through the engine. Either way tasks then start plain containers of the result under the
sandbox policy: the CLI's ``up``/``exec`` cost about a second a task and cannot drop the
container's privileges. A Dockerfile that declares ``ARG BASE_IMAGE`` and is not given one gets the
stack's ``base`` image, the convention every image of the stack follows; a file can also name it
as ``${localEnv:METAFLOW_STACK_DEVCONTAINER_BASE}``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import deque
from pathlib import Path

from rich.console import Console

from metaflow_stack import builders, settings
from metaflow_stack.devcontainer.spec import FILE_NAMES, DevcontainerConfig, recorded_settings, substitute
from metaflow_stack.engines.docker import require_engine
from metaflow_stack.errors import ImageBuildError, StackError, ToolMissingError

#: The label the Dev Containers CLI stores merged feature and configuration settings under.
METADATA_LABEL = "devcontainer.metadata"
REPOSITORY = "metaflow-stack-devcontainer"
CLI_FIX = "npm install -g @devcontainers/cli (or ./just devcontainer-cli in this project)"
#: Names the stack's base image for configurations (``${localEnv:METAFLOW_STACK_DEVCONTAINER_BASE}``); not
#: ``METAFLOW_STACK_BASE_IMAGE``, the Python image the stack's base image is built on.
BASE_VARIABLE = "METAFLOW_STACK_DEVCONTAINER_BASE"
_BASE_ARG = re.compile(r"^\s*ARG\s+BASE_IMAGE\b", re.MULTILINE | re.IGNORECASE)
_TAIL = 25


def cli_binary() -> str | None:
    """The Dev Containers CLI: the ``STACK_DEVCONTAINER_CLI`` setting, else ``devcontainer`` on PATH."""
    from metaflow.metaflow_config_funcs import from_conf

    return from_conf("STACK_DEVCONTAINER_CLI", "") or shutil.which("devcontainer")


def _tag(config: DevcontainerConfig, workspace: Path, digest: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", (config.name or workspace.name).lower()).strip("-") or "config"
    return f"{REPOSITORY}/{slug}:{digest}"


def _base_image(wanted: bool) -> None:
    """Name the stack's base image in ``METAFLOW_STACK_DEVCONTAINER_BASE`` (built now if needed) when a
    configuration refers to it, so ``${localEnv:METAFLOW_STACK_DEVCONTAINER_BASE}`` works for the CLI too."""
    if wanted and not os.environ.get(BASE_VARIABLE):
        from metaflow_stack import images

        os.environ[BASE_VARIABLE] = images.resolve("base")


def _own_args(config: DevcontainerConfig, workspace: Path) -> dict[str, str]:
    """The file's ``build.args``, resolved: private, as any may hold a credential (``${localEnv:TOKEN}``)."""
    return {name: substitute(value, workspace) for name, value in (config.build.args if config.build else {}).items()}


def _build_args(config: DevcontainerConfig, dockerfile: Path, workspace: Path) -> dict[str, str]:
    args = _own_args(config, workspace)
    if "BASE_IMAGE" not in args and _BASE_ARG.search(dockerfile.read_text()):
        _base_image(True)
        args["BASE_IMAGE"] = os.environ[BASE_VARIABLE]
    return args


def _cli_docker() -> tuple[list[str], dict[str, str]]:
    """The docker client the CLI is to use, and what its environment needs.

    With no buildx plugin the CLI would fall back to the legacy builder, which cannot build the
    ``RUN --mount`` steps the stack's Dockerfiles (generated ones included) use; it gets the
    classic client that reaches the engine's BuildKit instead, as the stack's own builds do.
    """
    how = builders.route()
    if how.startswith("classic:"):
        return ["--docker-path", how.removeprefix("classic:")], {"DOCKER_BUILDKIT": "1"}
    configured = settings.load().docker_client
    return (["--docker-path", configured] if configured else []), {}


def _cli_build(config: DevcontainerConfig, config_path: Path, workspace: Path, tag: str, console: Console) -> None:
    """``devcontainer build``, its progress on one status line, its log tail on failure, the file's build
    args shown in neither (the CLI logs the docker commands it runs, ``--build-arg`` values and all).

    A lockfile pins published features; with local features only there is nothing to pin, and the
    CLI would still leave an empty ``devcontainer-lock.json`` in the user's folder, so it is told not to."""
    binary = cli_binary()
    if binary is None:
        raise ToolMissingError(f"{config_path}: features need the Dev Containers CLI (not installed)", fix=CLI_FIX)
    if config_path.name not in FILE_NAMES:
        raise StackError(
            f"{config_path}: the Dev Containers CLI reads only files named {' or '.join(FILE_NAMES)}",
            fix="rename the file",
        )
    docker_path, docker_env = _cli_docker()
    command = [
        binary,
        "build",
        *docker_path,
        "--workspace-folder",
        str(workspace),
        "--config",
        str(config_path),
        "--image-name",
        tag,
        "--log-format",
        "text",
        *(["--no-lockfile"] if all(ref.startswith(".") for ref in config.features) else []),
    ]
    private = _own_args(config, workspace).values()
    tail: deque[str] = deque(maxlen=_TAIL)
    with console.status(f"building {tag} with the Dev Containers CLI") as status:
        env = {**os.environ, **docker_env}
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip():
                tail.append(builders.redact(line.rstrip(), private))
                status.update(f"building {tag}: {tail[-1].strip()[:100]}")
        code = process.wait()
    if code != 0:
        outcome = next((line for line in reversed(tail) if line.startswith('{"outcome"')), "")
        step = json.loads(outcome).get("message", "devcontainer build") if outcome else "devcontainer build"
        raise ImageBuildError(tag, step, "\n".join(tail))


def _present(ref: str, config_path: Path) -> None:
    """Pull ``ref`` when it is not here, or say why it cannot be had."""
    docker = require_engine()
    if docker.image.exists(ref):
        return
    try:
        docker.image.pull(ref, quiet=True)
    except Exception as exc:  # python-on-whales raises DockerException for every pull failure
        raise StackError(
            f"{config_path}: image {ref} is not on this machine and could not be pulled",
            fix=f"build or pull {ref} first, or set METAFLOW_STACK_REGISTRY",
        ) from exc


def build(
    config: DevcontainerConfig, config_path: Path, workspace: Path, digest: str, console: Console | None = None
) -> tuple[str, list[dict]]:
    """The image to run ``config``'s tasks in, by its immutable ID, and the settings its features recorded
    in it. Not by its tag, which names the file's text alone (not the Dockerfile or the build context)
    and is moved by the next build of another project's file of that text, or a pull: a long run's later
    tasks would start another image. The tag stays for people (``docker images``)."""
    console = console or Console(stderr=True)
    tag = _tag(config, workspace, digest)
    _base_image(BASE_VARIABLE in config_path.read_text())
    built_by_cli = bool(config.features)
    if built_by_cli:
        _cli_build(config, config_path, workspace, tag, console)
    elif config.build is not None:
        dockerfile = (config_path.parent / config.build.dockerfile).resolve()
        context = (config_path.parent / config.build.context).resolve()
        if not dockerfile.is_file():
            raise StackError(f"{config_path}: build.dockerfile: no file {dockerfile}", fix="correct the path")
        request = builders.BuildRequest(
            context=context,
            tag=tag,
            build_args=_build_args(config, dockerfile, workspace),
            dockerfile=str(dockerfile),
            target=config.build.target,
            private_args=tuple(config.build.args),
        )
        with console.status(f"building {tag}"):
            builders.build(request, console)
    else:
        tag = substitute(config.image, workspace)
        _present(tag, config_path)
    found = require_engine().image.inspect(tag)
    metadata = recorded_settings((found.config.labels or {}).get(METADATA_LABEL, "[]"), f"image {tag}")
    if built_by_cli and metadata and "id" not in metadata[-1]:
        metadata = metadata[:-1]  # the CLI records the file's own settings last; they are read from the file
    return found.id, metadata
