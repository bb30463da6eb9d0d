"""What a devcontainer.json asks of each task's container, in terms the sandbox can enforce.

Worked out once per run on the host (``from_config``) and handed to every task's trampoline as
JSON, so a task pays no parsing. ``runArgs`` are Docker CLI flags: the ones that size or describe
a container are honoured; any that would widen the sandbox (``--privileged``, ``--cap-add``,
``--network``, ``--volume``, ...) are refused by name, since ``network=`` and ``mounts`` say the
same things where the sandbox can see them. So are the values of allowed flags that would loosen it
(no limit on processes, a ``--ulimit`` raising scheduling priority) or mark the container as the
stack's own (a label in its namespace, which cleanup goes by).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from pydantic import BaseModel, Field

from metaflow_stack.devcontainer.lifecycle import shell_lines
from metaflow_stack.devcontainer.spec import IN_CONTAINER_COMMANDS, DevcontainerConfig, MountSpec, substitute
from metaflow_stack.engines import Mount, one_line
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
#: The ``--ulimit`` resources a file may set: not ``nice``, ``rtprio`` or ``rttime``, which would let the
#: step raise its scheduling priority (real-time scheduling, or a nice value below 0) without a capability.
ALLOWED_ULIMITS = (
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nofile",
    "nproc",
    "rss",
    "sigpending",
    "stack",
)
#: The prefix of the labels the stack sets (``engines.JOB_LABEL``, ``launch.LABEL``, ...): its cleanup and
#: sweeps find containers by them, so a file's labels stay out of it.
STACK_LABELS = "io.metaflow-stack."
#: The names ``remoteEnv``'s values travel under in the container's environment, numbered (``_remote_env``).
CARRIER = "METAFLOW_STACK_REMOTE_ENV_"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TaskContainer(BaseModel):
    """Settings every task container of one configuration gets."""

    env: dict[str, str] = Field(default_factory=dict)
    mounts: list[Mount] = Field(default_factory=list)
    #: The user inside, when the configuration pins one (``updateRemoteUserUID: false``); else the host's.
    user: str | None = None
    #: Shell statements setting ``remoteEnv`` from the ``CARRIER`` variables in ``env`` (and the container's own).
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


def _remote_env(entries: list[dict], where: str, workspace: Path) -> tuple[list[str], dict[str, str]]:
    """``remoteEnv`` of ``entries`` (the features', then the file's) as shell statements, and the variables
    they read.

    The statements hold names only: the container's command line is visible to every user of the machine
    (``ps``, ``docker inspect``), and a value may be a secret (``${localEnv:TOKEN}``). The values' text
    travels in the container's environment under ``CARRIER`` names, as ``containerEnv`` does, and is
    unset again before the lifecycle commands and the step; ``${containerEnv:X}`` stays a reference to
    the container's ``X``, read when its statement runs."""
    statements, carried = [], {}
    for entry in entries:
        for name, value in (entry.get("remoteEnv") or {}).items():
            if not _NAME.fullmatch(name):
                raise StackError(f"{where}: remoteEnv: {name!r} is not a variable name", fix="use letters, digits, _")
            if value is None:
                statements.append(f"unset {name}")
                continue
            names = []
            for i, part in enumerate(_CONTAINER_ENV.split(substitute(value, workspace))):
                if i % 2:  # a ${containerEnv:X}'s X
                    names.append(part)
                elif part:
                    names.append(f"{CARRIER}{len(carried)}")
                    carried[names[-1]] = one_line(f"{where}: remoteEnv.{name}", part)
            statements.append(f'export {name}="' + "".join(f"${{{n}}}" for n in names) + '"')
    if carried:
        statements.append(f"unset {' '.join(carried)}")
    return statements, carried


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


def _environment(items: list[str]) -> dict[str, str]:
    """``--env NAME=value`` flags; a bare ``NAME`` takes the host's value, as Docker's ``--env NAME`` does."""
    return dict(item.split("=", 1) if "=" in item else (item, os.environ.get(item, "")) for item in items)


def _labels(items: list[str], where: str) -> dict[str, str]:
    """``--label NAME=value`` flags; a bare ``NAME`` is an empty label, as Docker's ``--label NAME`` is (not
    the host's variable of that name, which could be a secret)."""
    for item in items:
        if item.startswith(STACK_LABELS):
            raise StackError(
                f"{where}: runArgs: --label {item} is in the stack's own namespace ({STACK_LABELS}...),"
                " which says which containers its cleanup removes",
                fix="name the label outside it",
            )
    return dict(item.split("=", 1) if "=" in item else (item, "") for item in items)


def _is_root(user: str) -> bool:
    """Whether ``user`` (Docker's ``name|uid[:group|gid]``) is root by its name or uid. A named user whose
    uid is 0 in the image cannot be told from here, without the image."""
    name = user.split(":", 1)[0]
    return name == "root" or (name.isdigit() and int(name) == 0)


def _run_args(run_args: list[str], where: str) -> argparse.Namespace:
    """The allowed ``runArgs``, refusing a flag not allowed and a value that would loosen the sandbox."""
    try:
        args, unknown = _run_args_parser().parse_known_args(run_args)
    except argparse.ArgumentError as exc:
        raise StackError(f"{where}: runArgs: {exc}", fix="correct the flag's value") from None
    if unknown:
        raise StackError(
            f"{where}: runArgs: {unknown[0]} is not allowed in a @devcontainer sandbox",
            fix=f"remove it; allowed: {', '.join(ALLOWED_RUN_ARGS)} (the network is set by @devcontainer(network=...))",
        )
    if args.pids_limit is not None and args.pids_limit < 1:
        raise StackError(
            f"{where}: runArgs: --pids-limit {args.pids_limit} lifts the limit on processes",
            fix="give a positive number, or leave it to @devcontainer(pids=...)",
        )
    for item in args.ulimit:
        if item.split("=", 1)[0] not in ALLOWED_ULIMITS:
            raise StackError(
                f"{where}: runArgs: --ulimit {item} is not allowed in a @devcontainer sandbox",
                fix=f"remove it; allowed: {', '.join(ALLOWED_ULIMITS)} (not a scheduling priority)",
            )
    return args


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
    args = _run_args(config.runArgs, where)
    user = None
    if not config.updateRemoteUserUID:
        user = config.remoteUser or config.containerUser
        if user is not None and _is_root(user):
            raise StackError(
                f"{where}: remoteUser {user!r} is root, and a @devcontainer sandbox runs as a non-root user",
                fix="name a non-root user, or drop updateRemoteUserUID so the step runs as you",
            )
    # The features' containerEnv is in the image already (the CLI bakes it in as ENV); the file's is set here.
    env = {}
    for field, variables in (("containerEnv.", config.containerEnv), ("runArgs: --env ", _environment(args.env))):
        env.update({k: one_line(f"{where}: {field}{k}", substitute(v, workspace)) for k, v in variables.items()})
    entries = [*image_metadata, config.model_dump()]
    exports, carried = _remote_env(entries, where, workspace)
    setup = [
        line
        for entry in entries
        for name in IN_CONTAINER_COMMANDS
        if entry.get(name)
        for line in shell_lines(entry[name])
    ]
    return TaskContainer(
        env={**env, **carried},
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
        labels=_labels(args.label, where),
    )
