"""The stack's Pulumi program run on a cluster through Pulumi's Automation API.

The program is ``infra/pulumi``'s (``stack_program.main``), the one a user
runs with ``pulumi up`` against any cluster; here it runs inline, with its
state in this machine's state folder (Pulumi's file backend) and its secrets
encrypted with a passphrase kept there (mode 0600). Pulumi's engine is its
CLI, so the CLI must be installed; nothing else of Pulumi's is asked for.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from metaflow_stack import local_secrets, settings
from metaflow_stack.deploy import infra_root
from metaflow_stack.deploy import require as extra_require
from metaflow_stack.errors import StackError, ToolMissingError

PROJECT = "metaflow-stack"
STACK = "dev"


def _home() -> Path:
    return settings.load().state_dir / "pulumi"


def require() -> Any:
    """Pulumi's CLI (its engine) and the SDKs the program needs, or one line naming what to install."""
    if shutil.which("pulumi") is None:
        raise ToolMissingError(
            "the Pulumi CLI is not installed (Pulumi's engine)",
            fix="install Pulumi (https://www.pulumi.com/docs/iac/download-install/)",
        )
    for module in ("pulumi_kubernetes", "pulumi_nomad"):
        extra_require(module, extra="cluster")
    return extra_require("pulumi.automation", extra="cluster")


def _stack() -> Any:
    """The dev stack of the inline program (made on first use)."""
    auto = require()
    program = str(infra_root() / "pulumi")
    if program not in sys.path:
        sys.path.insert(0, program)
    import stack_program  # infra/pulumi's, on the path just above

    home = _home()
    passphrase, _ = local_secrets.secret(home / "passphrase")
    (home / "state").mkdir(parents=True, exist_ok=True)
    env = {
        "PULUMI_BACKEND_URL": (home / "state").as_uri(),
        "PULUMI_CONFIG_PASSPHRASE": passphrase,
        "PULUMI_SKIP_UPDATE_CHECK": "true",
    }
    options = auto.LocalWorkspaceOptions(env_vars=env, work_dir=str(home))
    return auto.create_or_select_stack(STACK, project_name=PROJECT, program=stack_program.main, opts=options)


def up(config: Mapping[str, str], secrets: Mapping[str, str], say: Callable[[str], Any]) -> dict[str, Any]:
    """Set the stack's configuration (``secrets`` encrypted) and bring it up; its outputs."""
    auto = require()
    stack = _stack()
    stack.set_all_config({key: auto.ConfigValue(value=value) for key, value in config.items()})
    for key, value in secrets.items():
        _set_secret(stack.workspace, key, value)
    try:
        result = stack.up(on_output=say, color="never")
    except auto.CommandError as exc:
        raise StackError(
            f"pulumi up failed: {_last_error(str(exc))}",
            fix="read Pulumi's output above; `metaflow stack cluster up` again resumes where it stopped",
        ) from None
    say(changes(result.summary.resource_changes or {}))
    return {name: output.value for name, output in result.outputs.items()}


def _set_secret(workspace: Any, key: str, value: str) -> None:
    """``pulumi config set --secret KEY`` with the value on its standard input, which Pulumi's CLI reads when
    it is not a terminal: the Automation API's own calls put every value on the CLI's command line, which any
    user of this machine can read (``ps``)."""
    line = ["pulumi", "config", "set", "--secret", "--stack", STACK, key]
    env = {**os.environ, **workspace.env_vars}
    done = subprocess.run(line, input=value, text=True, capture_output=True, cwd=workspace.work_dir, env=env)
    if done.returncode != 0:
        raise StackError(
            f"pulumi could not keep the stack's secret {key}: {_last_error(done.stderr)}",
            fix="read Pulumi's message; `metaflow stack cluster up` again sets it",
        )


#: Pulumi's names for what an update did to a resource (its ``OpType``), in words; the rarer ones
#: (``create-replacement``, ``import``, ...) are said in Pulumi's own names.
_CHANGE_WORDS = {
    "same": "unchanged",
    "create": "created",
    "update": "updated",
    "delete": "deleted",
    "replace": "replaced",
}


def changes(counts: Mapping[str, int]) -> str:
    """One line of what ``up`` did to the stack's resources (Pulumi's ``resource_changes``), so a second
    ``up`` on the same cluster says it changed nothing."""
    done = [f"{count} {_CHANGE_WORDS.get(kind, kind)}" for kind, count in counts.items() if count]
    return "the stack's resources: " + (", ".join(done) or "none")


def outputs(missing_ok: bool = False) -> dict[str, Any]:
    """The outputs of the stack as last brought up (``{}`` when it never was and ``missing_ok``)."""
    if missing_ok and not (_home() / "state").is_dir():
        return {}
    return {name: output.value for name, output in _stack().outputs().items()}


def forget() -> None:
    """Forget the stack's state once its cluster is gone (deleting a kind cluster deleted all it held)."""
    if shutil.which("pulumi") is not None and (_home() / "state").is_dir():
        stack = _stack()
        stack.workspace.remove_stack(STACK, force=True)


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return lines[-1] if lines else (text.strip().splitlines() or ["no reason given"])[-1]
