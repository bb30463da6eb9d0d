"""What a devcontainer.json asks of each task's container, in terms the sandbox can enforce.

Worked out once per run on the host (``from_config``) and handed to every task's trampoline as
JSON, so a task pays no parsing. ``runArgs`` are Docker CLI flags: the ones that size or describe
a container are honoured; any that would widen the sandbox (``--privileged``, ``--cap-add``,
``--network``, ``--volume``, ...) are refused by name, since ``network=`` and ``mounts`` say the
same things where the sandbox can see them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from pathlib import Path

from pydantic import BaseModel, Field

from metaflow_stack.devcontainer.lifecycle import shell_lines
from metaflow_stack.devcontainer.spec import IN_CONTAINER_COMMANDS, DevcontainerConfig, MountSpec, substitute
from metaflow_stack.engines import Mount
from metaflow_stack.errors import StackError

#: The ``runArgs`` a sandboxed step may carry.
ALLOWED_RUN_ARGS = (
    "--cpus",
    "--memory",
    "-m",
    "--pids-limit",
    "--shm-size",
    "--env",
    "-e",
    "--label",
    "-l",
    "--hostname",
    "--init",
    "--ulimit",
)
_ROOT_USERS = ("root", "0", "0:0")


class TaskContainer(BaseModel):
    """Settings every task container of one configuration gets."""

    env: dict[str, str] = Field(default_factory=dict)
    mounts: list[Mount] = Field(default_factory=list)
    #: The user inside, when the configuration pins one (``updateRemoteUserUID: false``); else the host's.
    user: str | None = None
    #: Shell statements setting ``remoteEnv`` (which may refer to the container's own variables).
    exports: list[str] = Field(default_factory=list)
    #: Shell commands run before the step: the lifecycle commands of the image's features, then the file's.
    setup: list[str] = Field(default_factory=list)
    cpu: float | None = None
    memory: str | None = None
    pids: int | None = None
    shm_size: str | None = None
    hostname: str | None = None
    init: bool = False
    ulimits: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)

    def prelude(self) -> str:
        """What the container's shell runs before the step, each part joined on with ``&&``:
        ``remoteEnv`` exported in this shell, then every lifecycle command in a subshell."""
        return "".join(f" && {line}" for line in self.exports) + "".join(f" && ( {line} )" for line in self.setup)


_CONTAINER_ENV = re.compile(r"\$\{containerEnv:([A-Za-z_][A-Za-z0-9_]*)\}")


def _export(name: str, value: str | None) -> str:
    """``remoteEnv``'s ``NAME: value`` as a shell statement; ``${containerEnv:X}`` reads the container's ``X``."""
    if value is None:
        return f"unset {name}"
    parts, last = [], 0
    for match in _CONTAINER_ENV.finditer(value):
        parts += [shlex.quote(value[last : match.start()]), f'"${{{match.group(1)}}}"']
        last = match.end()
    parts.append(shlex.quote(value[last:]))
    empty = shlex.quote("")
    return f"export {name}=" + ("".join(p for p in parts if p != empty) or empty)


def _run_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--cpus", type=float)
    parser.add_argument("--memory", "-m")
    parser.add_argument("--pids-limit", type=int)
    parser.add_argument("--shm-size")
    parser.add_argument("--env", "-e", action="append", default=[])
    parser.add_argument("--label", "-l", action="append", default=[])
    parser.add_argument("--hostname")
    parser.add_argument("--init", action="store_true")
    parser.add_argument("--ulimit", action="append", default=[])
    return parser


def _key_values(items: list[str]) -> dict[str, str]:
    """``NAME=value`` flags; a bare ``NAME`` takes the host's value, as Docker's ``--env NAME`` does."""
    return dict(item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in items)


def _mount(entry: str | MountSpec, where: str, workspace: Path) -> Mount:
    """A ``mounts`` entry (Docker ``--mount`` syntax or the object form) as a mount the engine makes."""
    if isinstance(entry, str):
        fields = dict(part.split("=", 1) if "=" in part else (part, "true") for part in entry.split(","))
        kind = fields.get("type", "volume")
        source = fields.get("source", fields.get("src"))
        target = fields.get("target", fields.get("dst", fields.get("destination")))
        read_only = fields.get("readonly", fields.get("ro", "false")) in ("true", "1")
    else:
        kind, source, target, read_only = entry.type, entry.source, entry.target, False
    if kind not in ("bind", "volume") or not source or not target:
        raise StackError(
            f"{where}: a mount needs type=bind or type=volume, a source and a target",
            fix='write it as "source=/host/path,target=/in/container,type=bind"',
        )
    source = substitute(source, workspace)
    if kind == "bind" and not Path(source).is_absolute():
        raise StackError(f"{where}: bind source {source!r} is not absolute", fix="use ${localWorkspaceFolder}/...")
    return Mount(source=source, target=target, read_only=read_only)


def from_config(
    config: DevcontainerConfig, config_path: Path, workspace: Path, image_metadata: list[dict]
) -> TaskContainer:
    """The task settings of ``config``, with what the image's features added (``image_metadata``)."""
    where = str(config_path)
    try:
        args, unknown = _run_args_parser().parse_known_args(config.runArgs)
    except argparse.ArgumentError as exc:
        raise StackError(f"{where}: runArgs: {exc}", fix="correct the flag's value") from None
    if unknown:
        raise StackError(
            f"{where}: runArgs: {unknown[0]} is not allowed in a @devcontainer sandbox",
            fix=f"remove it; allowed: {', '.join(ALLOWED_RUN_ARGS)} (the network is set by @devcontainer(network=...))",
        )
    user = None
    if not config.updateRemoteUserUID:
        user = config.remoteUser or config.containerUser
        if user in _ROOT_USERS:
            raise StackError(
                f"{where}: remoteUser {user!r} is root, and a @devcontainer sandbox runs as a non-root user",
                fix="name a non-root user, or drop updateRemoteUserUID so the step runs as you",
            )
    # The features' containerEnv is in the image already (the CLI bakes it in as ENV); the file's is set here.
    env = {name: substitute(value, workspace) for name, value in config.containerEnv.items()}
    env.update({k: substitute(v, workspace) for k, v in _key_values(args.env).items()})
    exports = [
        _export(name, None if value is None else substitute(value, workspace))
        for entry in [*image_metadata, config.model_dump()]
        for name, value in (entry.get("remoteEnv") or {}).items()
    ]
    setup = [
        line
        for entry in [*image_metadata, config.model_dump()]
        for name in IN_CONTAINER_COMMANDS
        if entry.get(name)
        for line in shell_lines(entry[name])
    ]
    return TaskContainer(
        env=env,
        mounts=[_mount(m, f"{where}: mounts[{i}]", workspace) for i, m in enumerate(config.mounts)],
        user=user,
        exports=exports,
        setup=setup,
        cpu=args.cpus,
        memory=args.memory,
        pids=args.pids_limit,
        shm_size=args.shm_size,
        hostname=args.hostname,
        init=args.init,
        ulimits=args.ulimit,
        labels=_key_values(args.label),
    )
