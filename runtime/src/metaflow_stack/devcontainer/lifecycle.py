"""devcontainer.json's lifecycle commands: ``initializeCommand`` runs on the host once per run, before
the image is built; the in-container ones run in each task's container before the step (see
``task_container``). A command is a shell string, an argument list, or named commands of either
form; named ones run one after another (the specification allows them to run in parallel)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from metaflow_stack.devcontainer.spec import Command, DevcontainerConfig
from metaflow_stack.errors import StackError

_TAIL_LINES = 20


def shell_lines(command: Command) -> list[str]:
    """``command`` as shell command lines."""
    if isinstance(command, str):
        return [command]
    if isinstance(command, list):
        return [shlex.join(command)]
    return [line for part in command.values() for line in shell_lines(part)]


def initialize(config: DevcontainerConfig, config_path: Path, workspace: Path) -> None:
    """Run ``initializeCommand`` on the host, in the workspace folder; its output tail when it fails."""
    if config.initializeCommand is None:
        return
    for line in shell_lines(config.initializeCommand):
        done = subprocess.run(line, shell=True, cwd=workspace, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-_TAIL_LINES:])
            raise StackError(
                f"{config_path}: initializeCommand `{line}` exited with {done.returncode}\n{tail}",
                fix="correct the command, or run it by hand in the workspace folder to see why",
            )
